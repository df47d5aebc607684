"""The store as a read-only filesystem that fetches on demand.

One core, :class:`tvix.fs.core.StoreFs`, answers the filesystem questions over
any BlobService, DirectoryService and PathInfoService (see there for what a
client sees, and :mod:`tvix.fs.inodes` for how inode numbers are chosen);
transports beside it carry the requests. :func:`mount` mounts a
:class:`TvixStoreFs` (the core through pyfuse3 and the kernel's FUSE device)
and serves it until stopped (:func:`serve` does the same for a filesystem
built by the caller); :mod:`tvix.fs.virtiofs` serves the core to VMs.

The FUSE parts are imported on first use: pyfuse3 is an optional extra, and
the virtio-fs backend does not need it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tvix.fs.core import XATTR_BLOB_DIGEST, XATTR_DIRECTORY_DIGEST, StoreFs
from tvix.fs.requests import FsError, FsOptions

if TYPE_CHECKING:
    from tvix.fs.filesystem import TvixStoreFs
    from tvix.fs.mount import MountError, MountOptions, mount, serve

__all__ = [
    "XATTR_BLOB_DIGEST",
    "XATTR_DIRECTORY_DIGEST",
    "FsError",
    "FsOptions",
    "MountError",
    "MountOptions",
    "StoreFs",
    "TvixStoreFs",
    "mount",
    "serve",
]

_NEEDS_PYFUSE3 = {
    "TvixStoreFs": "tvix.fs.filesystem",
    "MountError": "tvix.fs.mount",
    "MountOptions": "tvix.fs.mount",
    "mount": "tvix.fs.mount",
    "serve": "tvix.fs.mount",
}


def __getattr__(name: str) -> Any:
    module = _NEEDS_PYFUSE3.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
