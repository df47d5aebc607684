"""Content addresses (Nix's ``ca`` field) of store paths."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tvix.nixcompat.errors import InvalidCAHashError, InvalidHashError
from tvix.nixcompat.hashes import HashAlgo, decode_digest, format_hash

__all__ = ["CAHash", "CAKind"]


class CAKind(enum.Enum):
    """How the content of a content-addressed store path was hashed."""

    #: The hash of the NAR serialisation (``fixed:r:<algo>:…``, ``nix-store --add``).
    NAR = "nar"
    #: The hash of a single regular file's bytes (``fixed:<algo>:…``, ``--add-fixed``).
    FLAT = "flat"
    #: The sha256 of a file's bytes, may have references (``text:sha256:…``, ``builtins.toFile``).
    TEXT = "text"


@dataclass(frozen=True, slots=True)
class CAHash:
    """A content address: the kind of hashing, the algorithm and the digest.

    Invariants (checked on construction, raising :class:`InvalidCAHashError`):
    the digest has the algorithm's length, and ``TEXT`` uses sha256.
    """

    kind: CAKind
    algo: HashAlgo
    digest: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.kind, CAKind):
            raise InvalidCAHashError(f"content address kind must be a CAKind, not {self.kind!r}")
        if not isinstance(self.algo, HashAlgo):
            raise InvalidCAHashError(f"hash algorithm must be a HashAlgo, not {self.algo!r}")
        if len(self.digest) != self.algo.digest_size:
            raise InvalidCAHashError(
                f"{self.algo} digest must be {self.algo.digest_size} bytes, not {len(self.digest)}"
            )
        if self.kind is CAKind.TEXT and self.algo is not HashAlgo.SHA256:
            raise InvalidCAHashError(f"text content addresses use sha256, not {self.algo}")

    @classmethod
    def parse(cls, text: str) -> CAHash:
        """Parse Nix's spelling of a content address.

        ``fixed:r:<algo>:<hash>``, ``fixed:<algo>:<hash>`` or
        ``text:sha256:<hash>``, the hash in nixbase32, base16 or base64.

        Raises:
            InvalidCAHashError: any other form, an unknown algorithm or a bad digest.
        """
        if text.startswith("text:"):
            kind, rest = CAKind.TEXT, text[5:]
        elif text.startswith("fixed:r:"):
            kind, rest = CAKind.NAR, text[8:]
        elif text.startswith("fixed:"):
            kind, rest = CAKind.FLAT, text[6:]
        else:
            raise InvalidCAHashError(
                f"content address {text!r} does not start with 'text:' or 'fixed:'"
            )
        algo_name, colon, digest_text = rest.partition(":")
        if not colon:
            raise InvalidCAHashError(f"content address {text!r} lacks '<algo>:<hash>'")
        try:
            algo = HashAlgo.parse(algo_name)
            digest = decode_digest(digest_text, algo)
        except InvalidHashError as e:
            raise InvalidCAHashError(f"content address {text!r}: {e}") from None
        return cls(kind, algo, digest)

    def __str__(self) -> str:
        """Return Nix's spelling, the hash in nixbase32 (as in narinfo ``CA:`` lines)."""
        prefix = {CAKind.NAR: "fixed:r:", CAKind.FLAT: "fixed:", CAKind.TEXT: "text:"}[self.kind]
        return prefix + format_hash(self.algo, self.digest)
