"""Known PathInfos for the conformance suites and tests."""

from __future__ import annotations

import hashlib

from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.castore.testing.fixtures import BLOB_A_DIGEST, DIRECTORY_WITH_KEEP
from tvix.nixcompat.cahash import CAHash, CAKind
from tvix.nixcompat.hashes import HashAlgo
from tvix.nixcompat.signing import SigningKey
from tvix.nixcompat.storepath import StorePath
from tvix.store.pathinfo import PathInfo

__all__ = ["DUMMY_KEY", "path_info", "store_path"]

DUMMY_KEY = SigningKey.generate("test-key-1")


def store_path(n: int, name: str = "dummy") -> StorePath:
    """A store path with a digest made from ``n``."""
    return StorePath(hashlib.sha256(b"%d" % n).digest()[:20], name)


def path_info(n: int, kind: str = "file", refs: tuple[int, ...] = ()) -> PathInfo:
    """A PathInfo for :func:`store_path` ``n``, root of ``kind`` file/directory/symlink."""
    sp = store_path(n, f"dummy-{kind}")
    name = sp.base_name.encode()
    nodes: dict[str, Node] = {
        "file": FileNode(name, BLOB_A_DIGEST, 12, True),
        "directory": DirectoryNode(name, DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size),
        "symlink": SymlinkNode(name, b"/nix/store/somewhere"),
    }
    node = nodes[kind]
    nar_sha256 = hashlib.sha256(b"nar %d" % n).digest()
    return PathInfo(
        store_path=sp,
        node=node,
        nar_size=100 + n,
        nar_sha256=nar_sha256,
        references=tuple(store_path(r, "dummy-ref") for r in refs),
        deriver=StorePath(hashlib.sha256(b"drv %d" % n).digest()[:20], f"dummy-{kind}.drv"),
        ca=CAHash(CAKind.NAR, HashAlgo.SHA256, nar_sha256),
    )
