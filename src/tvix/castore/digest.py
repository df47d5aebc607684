"""The blake3 digest that addresses every blob and directory."""

from __future__ import annotations

import base64
from typing import Self

from tvix.castore.errors import ValidationError

__all__ = ["B3_LEN", "EMPTY_BLOB_DIGEST", "B3Digest"]

B3_LEN = 32


class B3Digest(bytes):
    """A blake3 digest: exactly 32 bytes.

    A ``bytes`` subclass, so it hashes, compares and serialises as the raw
    digest; constructing one from anything that is not 32 bytes raises
    :class:`ValidationError`.
    """

    __slots__ = ()

    def __new__(cls, value: bytes | bytearray | memoryview) -> Self:
        """Check that ``value`` is 32 bytes (else :class:`ValidationError`) and wrap it."""
        if len(value) != B3_LEN:
            raise ValidationError(f"invalid digest length: {len(value)} bytes, expected {B3_LEN}")
        return super().__new__(cls, value)

    @classmethod
    def from_hex(cls, text: str) -> Self:
        """Parse 64 hex digits; raises :class:`ValidationError` otherwise."""
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValidationError(f"invalid hex digest: {text!r}") from None
        return cls(raw)

    @classmethod
    def from_str(cls, text: str) -> Self:
        """Parse ``b3:<base64>`` (the form upstream prints) or 64 hex digits."""
        if text.startswith("b3:"):
            try:
                raw = base64.b64decode(text[3:], validate=True)
            except ValueError:
                raise ValidationError(f"invalid base64 digest: {text!r}") from None
            return cls(raw)
        return cls.from_hex(text)

    def __str__(self) -> str:
        """``b3:<base64>``, as upstream renders digests (also the xattr value)."""
        return "b3:" + base64.b64encode(self).decode()

    def __repr__(self) -> str:
        return f"B3Digest({self.hex()!r})"


EMPTY_BLOB_DIGEST = B3Digest(
    bytes.fromhex("af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
)
"""The digest of the empty blob (blake3 of no bytes): the only one a file of size 0 has."""
