"""Known blobs and Directories used by the conformance suites and tests."""

from __future__ import annotations

import blake3

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.nodes import DirectoryNode, FileNode, SymlinkNode

__all__ = [
    "BLOB_A",
    "BLOB_A_DIGEST",
    "BLOB_B",
    "BLOB_B_DIGEST",
    "DIRECTORY_A",
    "DIRECTORY_B",
    "DIRECTORY_C",
    "DIRECTORY_COMPLICATED",
    "DIRECTORY_WITH_KEEP",
    "EMPTY_BLOB_DIGEST",
    "b3",
    "big_blob",
]


def b3(data: bytes) -> B3Digest:
    """blake3 of ``data``."""
    return B3Digest(blake3.blake3(data).digest())


def big_blob(size: int, seed: int = 0) -> bytes:
    """Deterministic, incompressible-looking bytes (a blake3 XOF stream)."""
    return blake3.blake3(seed.to_bytes(8, "little")).digest(length=size)


EMPTY_BLOB_DIGEST = b3(b"")
BLOB_A = b"Hello World!"
BLOB_A_DIGEST = b3(BLOB_A)
BLOB_B = big_blob(3 * 1024 * 1024 + 17, seed=1)
BLOB_B_DIGEST = b3(BLOB_B)

DIRECTORY_WITH_KEEP = Directory(files=[FileNode(b".keep", EMPTY_BLOB_DIGEST, 0)])
DIRECTORY_A = Directory()
DIRECTORY_B = Directory(
    directories=[DirectoryNode(b"a", DIRECTORY_A.digest, DIRECTORY_A.size)],
)
DIRECTORY_C = Directory(
    directories=[
        DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size),
        DirectoryNode(b"keep2", DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size),
    ],
)
# Shares DIRECTORY_WITH_KEEP twice (a diamond), mixes all three kinds and a non-UTF-8 name.
DIRECTORY_COMPLICATED = Directory(
    directories=[
        DirectoryNode(b"c", DIRECTORY_C.digest, DIRECTORY_C.size),
        DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size),
    ],
    files=[
        FileNode(b".keep", EMPTY_BLOB_DIGEST, 0),
        FileNode(b"\xff\xfe", BLOB_A_DIGEST, 12, True),
    ],
    symlinks=[SymlinkNode(b"aa", b"/nix/store/somewhere")],
)
