"""The exceptions of :mod:`tvix.castore`.

::

    CastoreError
    ├── ValidationError        invalid input: a malformed digest, Directory, URL, closure
    │   └── InvalidURLError    a service URL that no backend accepts
    ├── StorageError           a backend failed (I/O, database, remote unavailable)
    └── IntegrityError         data read back does not match its digest

Absence is not an error: lookups return ``None`` for what is not stored.
"""

from __future__ import annotations

__all__ = ["CastoreError", "IntegrityError", "InvalidURLError", "StorageError", "ValidationError"]


class CastoreError(Exception):
    """Root of every error raised by :mod:`tvix.castore`."""


class ValidationError(CastoreError, ValueError):
    """Input breaks a rule of the data model or of a service contract."""


class InvalidURLError(ValidationError):
    """A service URL names an unknown scheme or carries options its backend rejects."""


class StorageError(CastoreError):
    """A backend failed to store or fetch something."""


class IntegrityError(CastoreError):
    """Data from a backend or a remote does not hash to the digest it was asked for."""
