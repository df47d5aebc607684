"""The store as a read-only filesystem that fetches on demand.

One core, :class:`tvix.fs.core.StoreFs`, answers the filesystem questions over
any BlobService, DirectoryService and PathInfoService (see there for what a
client sees, and :mod:`tvix.fs.inodes` for how inode numbers are chosen); one
codec, :mod:`tvix.fs.fusewire`, speaks the FUSE wire format for it; two
transports carry the requests: :func:`mount` mounts the core on the host
through ``/dev/fuse`` (:mod:`tvix.fs.fusedev`) and serves it until stopped
(:func:`serve` does the same for a core built by the caller), and
:mod:`tvix.fs.virtiofs` serves it to VMs.
"""

from __future__ import annotations

from tvix.fs.core import XATTR_BLOB_DIGEST, XATTR_DIRECTORY_DIGEST, StoreFs
from tvix.fs.mount import MountError, MountOptions, mount, serve
from tvix.fs.requests import FsError, FsOptions

__all__ = [
    "XATTR_BLOB_DIGEST",
    "XATTR_DIRECTORY_DIGEST",
    "FsError",
    "FsOptions",
    "MountError",
    "MountOptions",
    "StoreFs",
    "mount",
    "serve",
]
