"""Hash algorithms and the textual hash spellings Nix accepts.

Nix writes a hash as ``<algo>:<nixbase32>`` (narinfo, content addresses) or
as SRI ``<algo>-<base64>`` (JSON), and reads ``<algo>:`` followed by base16,
nixbase32 or base64 — told apart by length — as well as SRI.
"""

from __future__ import annotations

import base64
import binascii
import enum

from tvix.nixcompat import nixbase32
from tvix.nixcompat.errors import InvalidHashError

__all__ = ["HashAlgo", "decode_digest", "format_hash", "parse_hash"]


class HashAlgo(enum.StrEnum):
    """A hash algorithm Nix knows, valued by its Nix spelling."""

    MD5 = "md5"
    SHA1 = "sha1"
    SHA256 = "sha256"
    SHA512 = "sha512"

    @property
    def digest_size(self) -> int:
        """The digest length in bytes."""
        return _SIZES[self]

    @classmethod
    def parse(cls, name: str) -> HashAlgo:
        """Return the algorithm called *name*.

        Raises:
            InvalidHashError: *name* is not ``md5``, ``sha1``, ``sha256`` or ``sha512``.
        """
        try:
            return cls(name)
        except ValueError:
            raise InvalidHashError(f"unknown hash algorithm {name!r}") from None


_SIZES = {HashAlgo.MD5: 16, HashAlgo.SHA1: 20, HashAlgo.SHA256: 32, HashAlgo.SHA512: 64}


def decode_digest(text: str, algo: HashAlgo) -> bytes:
    """Decode an unprefixed *algo* digest written in base16, nixbase32 or base64.

    The encoding is recognised by length, as Nix does.

    Raises:
        InvalidHashError: the length fits no encoding, or the text is not valid in
            the encoding its length implies.
    """
    size = algo.digest_size
    length = len(text)
    try:
        if length == size * 2:
            digest = bytes.fromhex(text)
            # fromhex skips whitespace, which would shorten the result.
            if len(digest) == size:
                return digest
            raise ValueError("not hexadecimal")
        if length == nixbase32.encoded_len(size):
            return nixbase32.decode(text)
        if length == 4 * ((size + 2) // 3):
            digest = base64.b64decode(text, validate=True)
            if len(digest) == size:
                return digest
    except (ValueError, binascii.Error) as e:
        raise InvalidHashError(f"invalid {algo} hash {text!r}: {e}") from None
    raise InvalidHashError(f"invalid {algo} hash {text!r}: wrong length {length}")


def parse_hash(text: str) -> tuple[HashAlgo, bytes]:
    """Parse ``<algo>:<base16|nixbase32|base64>`` or SRI ``<algo>-<base64>``.

    Returns the algorithm and the digest bytes.

    Raises:
        InvalidHashError: no known algorithm prefix, or a malformed digest.
    """
    colon = text.find(":")
    dash = text.find("-")
    if colon != -1 and (dash == -1 or colon < dash):
        algo = HashAlgo.parse(text[:colon])
        return algo, decode_digest(text[colon + 1 :], algo)
    if dash != -1:
        algo = HashAlgo.parse(text[:dash])
        b64 = text[dash + 1 :]
        try:
            digest = base64.b64decode(b64, validate=True)
        except binascii.Error as e:
            raise InvalidHashError(f"invalid SRI hash {text!r}: {e}") from None
        if len(digest) != algo.digest_size:
            raise InvalidHashError(f"invalid SRI hash {text!r}: wrong length")
        return algo, digest
    raise InvalidHashError(f"hash {text!r} lacks an '<algo>:' or SRI '<algo>-' prefix")


def format_hash(algo: HashAlgo, digest: bytes) -> str:
    """Return ``<algo>:<nixbase32 digest>``, the spelling Nix writes in narinfo and CA fields."""
    return f"{algo}:{nixbase32.encode(digest)}"
