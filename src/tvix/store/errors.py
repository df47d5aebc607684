"""The exceptions of :mod:`tvix.store`.

::

    StoreError
    ├── InvalidPathInfoError         a PathInfo breaks a rule (also a castore ValidationError)
    ├── NarMismatchError             NAR hash or size differ from what was claimed
    │                                (also a castore ValidationError)
    ├── ListNotSupportedError        the PathInfo service cannot enumerate
    ├── UntrustedPathInfoError       a PathInfo (or narinfo) is refused by the trust policy
    │                                (also a castore IntegrityError)
    ├── NotFoundError                a store path, or a path inside one, does not exist
    ├── ExtractError                 an extraction's destination cannot be used
    ├── ImportPathError              a local path cannot become a store path
    ├── GCError                      a garbage collection or deletion cannot be done
    │   └── GCBusyError              another garbage collection holds the store's GC lock
    └── InvalidReferenceGraphError   a reference graph file is not what Nix writes

castore errors (:class:`~tvix.castore.errors.StorageError`,
:class:`~tvix.castore.errors.IntegrityError`) and nixcompat errors (a
malformed NAR: :class:`~tvix.nixcompat.errors.NARError`) pass through.
Damaged stored data is an :class:`~tvix.castore.errors.IntegrityError` in
both layers.
"""

from __future__ import annotations

from tvix.castore.errors import IntegrityError, ValidationError

__all__ = [
    "ExtractError",
    "GCBusyError",
    "GCError",
    "ImportPathError",
    "InvalidPathInfoError",
    "InvalidReferenceGraphError",
    "ListNotSupportedError",
    "NarMismatchError",
    "NotFoundError",
    "StoreError",
    "UntrustedPathInfoError",
]


class StoreError(Exception):
    """Root of every error raised by :mod:`tvix.store`."""


class InvalidPathInfoError(StoreError, ValidationError):
    """A PathInfo is meaningless: the message names the rule it breaks."""


class NarMismatchError(StoreError, ValidationError):
    """A NAR's sha256 or size is not the one claimed for it."""


class ListNotSupportedError(StoreError):
    """The PathInfo service cannot list what it stores."""


class UntrustedPathInfoError(StoreError, IntegrityError):
    """A PathInfo was refused by the trust policy (:class:`~tvix.store.trust.TrustPolicy`).

    It carries no signature by a trusted key (and, where content-addressed
    paths are accepted, is not one), or the NAR of its contents is not the
    signed one. It is an :class:`~tvix.castore.errors.IntegrityError`: the
    source offered data that does not hold up.
    """


class NotFoundError(StoreError):
    """A store path or a path inside one does not exist."""


class ExtractError(StoreError):
    """The destination cannot be used (it exists, or its parent is not a directory)."""


class ImportPathError(StoreError):
    """A path cannot become a store path (for example its name is not a valid store path name)."""


class GCError(StoreError):
    """A garbage collection or deletion cannot be done (nothing was changed)."""


class GCBusyError(GCError):
    """Another garbage collection holds the store's GC lock."""


class InvalidReferenceGraphError(StoreError):
    """A reference graph file is not what ``exportReferencesGraph`` writes."""
