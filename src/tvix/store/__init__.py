"""The Nix layer: PathInfo, PathInfo services, NAR rendering and ingestion, import.

Builds on :mod:`tvix.castore` and :mod:`tvix.nixcompat`.
"""

from tvix.store.errors import (
    InvalidPathInfoError,
    ListNotSupportedError,
    NarMismatchError,
    StoreError,
)
from tvix.store.pathinfo import PathInfo

__all__ = [
    "InvalidPathInfoError",
    "ListNotSupportedError",
    "NarMismatchError",
    "PathInfo",
    "StoreError",
]
