"""Nix's ed25519 keys and signatures in their ``name:base64`` text forms.

- secret key: ``name:base64(64 bytes)`` (32-byte seed then 32-byte public
  key, libsodium's layout), as ``nix key generate-secret`` writes it;
- public key: ``name:base64(32 bytes)``;
- signature: ``name:base64(64 bytes)``, the ed25519 signature of a
  fingerprint (see :func:`tvix.nixcompat.narinfo.fingerprint`) by the key
  called ``name``.

Ed25519 is deterministic, so signing the same fingerprint with the same key
gives the same signature as Nix.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tvix.nixcompat.errors import InvalidKeyError, SignatureError

__all__ = [
    "Signature",
    "SigningKey",
    "VerifyingKey",
    "parse_public_keys",
    "verify_any",
]

_SIGNATURE_SIZE = 64
_PUBLIC_SIZE = 32
_SECRET_SIZE = 64


def _split(text: str, what: str, error: type[ValueError]) -> tuple[str, bytes]:
    """Split ``name:base64`` at the first colon and decode the base64."""
    name, colon, b64 = text.partition(":")
    if not colon or not name:
        raise error(f"{what} {text[:40]!r} is not of the form 'name:base64'")
    try:
        return name, base64.b64decode(b64, validate=True)
    except binascii.Error as e:
        raise error(f"{what} named {name!r} has invalid base64: {e}") from None


def _check_name(name: str, error: type[ValueError]) -> str:
    if not name or ":" in name or any(c.isspace() for c in name):
        raise error(f"key name {name!r} must be non-empty, without ':' or whitespace")
    return name


def _to_bytes(message: bytes | str) -> bytes:
    return message.encode() if isinstance(message, str) else message


@dataclass(frozen=True, slots=True)
class Signature:
    """A signature: the signing key's *name* and the 64-byte ed25519 signature *data*."""

    name: str
    data: bytes

    def __post_init__(self) -> None:
        if not self.name or ":" in self.name:
            raise SignatureError(f"signature key name {self.name!r} must be non-empty, no ':'")
        if len(self.data) != _SIGNATURE_SIZE:
            raise SignatureError(
                f"signature by {self.name!r} is {len(self.data)} bytes, expected {_SIGNATURE_SIZE}"
            )

    @classmethod
    def parse(cls, text: str) -> Signature:
        """Parse ``name:base64(64 bytes)``.

        Raises:
            SignatureError: not that form, or not 64 bytes.
        """
        name, data = _split(text, "signature", SignatureError)
        return cls(name, data)

    def __str__(self) -> str:
        """``name:base64``, as in a narinfo ``Sig:`` line."""
        return f"{self.name}:{base64.b64encode(self.data).decode()}"


@dataclass(frozen=True, slots=True)
class VerifyingKey:
    """An ed25519 public key with its Nix *name*."""

    name: str
    key: bytes

    def __post_init__(self) -> None:
        _check_name(self.name, InvalidKeyError)
        if len(self.key) != _PUBLIC_SIZE:
            raise InvalidKeyError(
                f"public key {self.name!r} is {len(self.key)} bytes, expected {_PUBLIC_SIZE}"
            )

    @classmethod
    def parse(cls, text: str) -> VerifyingKey:
        """Parse ``name:base64(32 bytes)`` (surrounding whitespace is ignored).

        Raises:
            InvalidKeyError: not that form, or not 32 bytes.
        """
        name, key = _split(text.strip(), "public key", InvalidKeyError)
        return cls(name, key)

    def verify(self, message: bytes | str, signature: Signature) -> bool:
        """Return whether *signature* is this key's valid signature of *message*.

        A signature under another key name is simply not valid (``False``).
        """
        if signature.name != self.name:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(self.key).verify(signature.data, _to_bytes(message))
        except InvalidSignature:
            return False
        return True

    def __str__(self) -> str:
        """``name:base64``, as in ``trusted-public-keys``."""
        return f"{self.name}:{base64.b64encode(self.key).decode()}"


@dataclass(frozen=True, slots=True)
class SigningKey:
    """An ed25519 secret key with its Nix *name*; *seed* is the 32-byte private seed.

    ``str()`` gives the secret in Nix's format; ``repr()`` hides it.
    """

    name: str
    seed: bytes

    def __post_init__(self) -> None:
        _check_name(self.name, InvalidKeyError)
        if len(self.seed) != 32:
            raise InvalidKeyError(f"secret key seed {self.name!r} must be 32 bytes")

    @classmethod
    def generate(cls, name: str) -> SigningKey:
        """Return a new random key called *name*.

        Raises:
            InvalidKeyError: *name* is empty or has ``:`` or whitespace.
        """
        return cls(name, os.urandom(32))

    @classmethod
    def parse(cls, text: str) -> SigningKey:
        """Parse ``name:base64(64 bytes)``.

        Surrounding whitespace, such as a final newline, is ignored.

        Raises:
            InvalidKeyError: not that form, not 64 bytes, or the public half
                does not belong to the seed.
        """
        name, raw = _split(text.strip(), "secret key", InvalidKeyError)
        if len(raw) != _SECRET_SIZE:
            raise InvalidKeyError(
                f"secret key {name!r} is {len(raw)} bytes, expected {_SECRET_SIZE}"
            )
        key = cls(name, raw[:32])
        if key.to_public().key != raw[32:]:
            raise InvalidKeyError(f"secret key {name!r} is corrupt: its public half does not match")
        return key

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SigningKey:
        """Read a secret key file (``nix key generate-secret`` output).

        Raises:
            InvalidKeyError: the content is not a valid secret key.
            OSError: the file cannot be read.
        """
        with open(path, encoding="ascii", errors="replace") as f:
            return cls.parse(f.read())

    def _private(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.seed)

    def to_public(self) -> VerifyingKey:
        """Return the matching public key, with the same name."""
        raw = self._private().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return VerifyingKey(self.name, raw)

    def sign(self, message: bytes | str) -> Signature:
        """Return this key's signature of *message* (a fingerprint; str is UTF-8 encoded)."""
        return Signature(self.name, self._private().sign(_to_bytes(message)))

    def __str__(self) -> str:
        """The secret key in Nix's ``name:base64(seed + public)`` format."""
        raw = self.seed + self.to_public().key
        return f"{self.name}:{base64.b64encode(raw).decode()}"

    def __repr__(self) -> str:
        return f"SigningKey(name={self.name!r}, seed=<hidden>)"


def parse_public_keys(text: str) -> dict[str, VerifyingKey]:
    """Parse a whitespace-separated list of public keys (Nix's ``trusted-public-keys``).

    Returns the keys by name; a later key with the same name wins, as in Nix.

    Raises:
        InvalidKeyError: an item is not a valid public key.
    """
    keys = [VerifyingKey.parse(item) for item in text.split()]
    return {key.name: key for key in keys}


def verify_any(
    message: bytes | str,
    signatures: Iterable[Signature],
    keys: Mapping[str, VerifyingKey] | Iterable[VerifyingKey],
) -> bool:
    """Return whether any of *signatures* is a valid signature of *message* by *keys*.

    At least one valid signature by one of *keys*: Nix's rule for trusting a
    path.
    """
    by_name = keys if isinstance(keys, Mapping) else {k.name: k for k in keys}
    data = _to_bytes(message)
    for signature in signatures:
        key = by_name.get(signature.name)
        if key is not None and key.verify(data, signature):
            return True
    return False
