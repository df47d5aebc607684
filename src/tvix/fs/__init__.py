"""The store as a read-only filesystem that fetches on demand.

One core, :class:`tvix.fs.core.StoreFs`, answers the filesystem questions over
any BlobService, DirectoryService and PathInfoService (see there for what a
client sees, and :mod:`tvix.fs.inodes` for how inode numbers are chosen);
transports beside it carry the requests. :func:`mount` mounts a
:class:`TvixStoreFs` (the core through pyfuse3 and the kernel's FUSE device)
and serves it until stopped (:func:`serve` does the same for a filesystem
built by the caller).
"""

from __future__ import annotations

from tvix.fs.filesystem import XATTR_BLOB_DIGEST, XATTR_DIRECTORY_DIGEST, FsOptions, TvixStoreFs
from tvix.fs.mount import MountError, MountOptions, mount, serve

__all__ = [
    "XATTR_BLOB_DIGEST",
    "XATTR_DIRECTORY_DIGEST",
    "FsOptions",
    "MountError",
    "MountOptions",
    "TvixStoreFs",
    "mount",
    "serve",
]
