"""The exceptions of :mod:`tvix.store`.

::

    StoreError
    ├── InvalidPathInfoError   a PathInfo breaks a rule (also a castore ValidationError)
    ├── NarMismatchError       NAR hash or size differ from what was claimed
    └── ListNotSupportedError  the PathInfo service cannot enumerate

castore errors (:class:`~tvix.castore.errors.StorageError`,
:class:`~tvix.castore.errors.IntegrityError`) and nixcompat errors (a
malformed NAR: :class:`~tvix.nixcompat.errors.NARError`) pass through.
"""

from __future__ import annotations

from tvix.castore.errors import ValidationError

__all__ = ["InvalidPathInfoError", "ListNotSupportedError", "NarMismatchError", "StoreError"]


class StoreError(Exception):
    """Root of every error raised by :mod:`tvix.store`."""


class InvalidPathInfoError(StoreError, ValidationError):
    """A PathInfo is meaningless: the message names the rule it breaks."""


class NarMismatchError(StoreError, ValidationError):
    """A NAR's sha256 or size is not the one claimed for it."""


class ListNotSupportedError(StoreError):
    """The PathInfo service cannot list what it stores."""
