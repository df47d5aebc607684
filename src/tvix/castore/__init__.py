"""The content-addressed layer: blobs, Directories and the nodes linking them.

Nothing here knows about Nix. See :mod:`tvix.castore.blobservice`,
:mod:`tvix.castore.directoryservice` and :mod:`tvix.castore.ingest`.
"""

from tvix.castore.digest import B3_LEN, B3Digest
from tvix.castore.directory import Directory
from tvix.castore.errors import (
    CastoreError,
    IntegrityError,
    InvalidURLError,
    StorageError,
    ValidationError,
)
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode, validate_name

__all__ = [
    "B3_LEN",
    "B3Digest",
    "CastoreError",
    "Directory",
    "DirectoryNode",
    "FileNode",
    "IntegrityError",
    "InvalidURLError",
    "Node",
    "StorageError",
    "SymlinkNode",
    "ValidationError",
    "validate_name",
]
