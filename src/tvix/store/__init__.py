"""The Nix layer: PathInfo, PathInfo services, NAR rendering and ingestion, import.

Builds on :mod:`tvix.castore` and :mod:`tvix.nixcompat`.
"""

from tvix.store.errors import (
    ExtractError,
    ImportPathError,
    InvalidPathInfoError,
    InvalidReferenceGraphError,
    ListNotSupportedError,
    NarMismatchError,
    NotFoundError,
    StoreError,
    UntrustedPathInfoError,
)
from tvix.store.pathinfo import PathInfo

__all__ = [
    "ExtractError",
    "ImportPathError",
    "InvalidPathInfoError",
    "InvalidReferenceGraphError",
    "ListNotSupportedError",
    "NarMismatchError",
    "NotFoundError",
    "PathInfo",
    "StoreError",
    "UntrustedPathInfoError",
]
