"""The store as a read-only filesystem that fetches on demand (FUSE, via pyfuse3).

:func:`mount` mounts a :class:`TvixStoreFs` over any BlobService,
DirectoryService and PathInfoService and serves it until stopped
(:func:`serve` does the same for a filesystem built by the caller). The root
holds store paths by base name; see :mod:`tvix.fs.filesystem` for what the
kernel sees and :mod:`tvix.fs.inodes` for how inode numbers are chosen.
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
