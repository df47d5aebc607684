"""The exceptions of :mod:`tvix.nixcompat`.

Every error raised for malformed Nix data derives from :class:`NixCompatError`,
so a boundary (gRPC, HTTP, CLI) can translate the whole family in one place.
The validation errors also derive from :class:`ValueError`, because they are
raised for bad input values::

    NixCompatError
    ├── Nixbase32Error            (also ValueError)
    ├── InvalidHashError          (also ValueError)
    ├── InvalidStorePathError     (also ValueError)
    ├── InvalidCAHashError        (also ValueError)
    ├── NARError                  (also ValueError)
    ├── NarInfoError              (also ValueError)
    ├── InvalidKeyError           (also ValueError)
    ├── SignatureError            (also ValueError)
    └── CompressionError          (also ValueError) damaged or unsupported compressed data
"""

from __future__ import annotations

__all__ = [
    "CompressionError",
    "InvalidCAHashError",
    "InvalidHashError",
    "InvalidKeyError",
    "InvalidStorePathError",
    "NARError",
    "NarInfoError",
    "NixCompatError",
    "Nixbase32Error",
    "SignatureError",
]


class NixCompatError(Exception):
    """Root of all errors raised by :mod:`tvix.nixcompat`."""


class Nixbase32Error(NixCompatError, ValueError):
    """A string is not valid nixbase32 (bad character, length or leftover bits)."""


class InvalidHashError(NixCompatError, ValueError):
    """A hash algorithm name or a textual hash (``sha256:…``, SRI) is malformed."""


class InvalidStorePathError(NixCompatError, ValueError):
    """A store path, base name or store path name is malformed."""


class InvalidCAHashError(NixCompatError, ValueError):
    """A content address (``fixed:…``/``text:…``) is malformed or unsupported."""


class NARError(NixCompatError, ValueError):
    """A NAR is malformed, or a NAR writer was driven in an invalid order."""


class NarInfoError(NixCompatError, ValueError):
    """A narinfo text is malformed or lacks a required field."""


class InvalidKeyError(NixCompatError, ValueError):
    """A signing or verifying key in Nix's ``name:base64`` form is malformed."""


class SignatureError(NixCompatError, ValueError):
    """A signature in Nix's ``name:base64`` form is malformed."""


class CompressionError(NixCompatError, ValueError):
    """Compressed data is damaged or truncated, or its compression method is not supported."""
