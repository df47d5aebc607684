"""Directory sizes: upstream's rule is written, every known rule is read.

Closures written before this project adopted upstream's size rule (and by
pre-2024 tvix) give each DirectoryNode the documented size (``entries + Σ``).
They stay valid: stored, fetched (recursively, also over gRPC), rendered,
verified, and referred to by new Directories that use upstream's rule.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tvix.castore import directoryservice
from tvix.castore.blobservice import MemoryBlobService, write_all
from tvix.castore.directory import Directory
from tvix.castore.errors import ValidationError
from tvix.castore.grpc import build_server, castore_servicers
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.castore.testing.fixtures import EMPTY_BLOB_DIGEST
from tvix.nixcompat.storepath import StorePath
from tvix.store.nar import calculate_nar
from tvix.store.pathinfo import PathInfo
from tvix.store.verify import verify_path_info

# A tree written under the documented rule: inner holds one empty file (size 1),
# outer holds inner and a file (size 2 + 1).
INNER = Directory(files=[FileNode(b".keep", EMPTY_BLOB_DIGEST, 0)])
OUTER_OLD = Directory(
    directories=[DirectoryNode(b"inner", INNER.digest, 1)],
    files=[FileNode(b"f", EMPTY_BLOB_DIGEST, 0)],
)
OLD_ROOT_SIZE = 2 + 1


async def test_old_closure_stays_valid_everywhere(tmp_path: Path) -> None:
    dirs = directoryservice.from_url(f"sqlite://{tmp_path}/dirs.sqlite")
    blobs = MemoryBlobService()
    assert await write_all(blobs, b"") == EMPTY_BLOB_DIGEST
    putter = dirs.put_multiple_start()
    await putter.put(INNER)
    await putter.put(OUTER_OLD)
    assert await putter.close() == OUTER_OLD.digest
    assert [d async for d in dirs.get_recursive(OUTER_OLD.digest)] == [OUTER_OLD, INNER]

    # Over gRPC too: the client checks every size it receives.
    server = build_server(f"unix://{tmp_path}/s.sock", castore_servicers(blobs, dirs))
    await server.start()
    try:
        client = directoryservice.from_url(server.url)
        got = [d async for d in client.get_recursive(OUTER_OLD.digest)]
        assert got == [OUTER_OLD, INNER]
        await client.close()
    finally:
        await server.stop(0)

    root = DirectoryNode(b"00000000000000000000000000000000-x", OUTER_OLD.digest, OLD_ROOT_SIZE)
    nar_size, nar_sha256 = await calculate_nar(blobs, dirs, root)
    info = PathInfo(
        store_path=StorePath.from_base_name("00000000000000000000000000000000-x"),
        node=root,
        nar_size=nar_size,
        nar_sha256=nar_sha256,
    )
    assert [p async for p in verify_path_info(blobs, dirs, info)] == []
    await dirs.close()


async def test_new_directory_may_refer_to_an_old_one(tmp_path: Path) -> None:
    """A copy of a partial closure: a new parent, the stored child sized by either rule."""
    dirs = directoryservice.from_url(f"sqlite://{tmp_path}/dirs.sqlite")
    await dirs.put(INNER)
    for size in (1, INNER.size):  # the documented rule, upstream's
        parent = Directory(directories=[DirectoryNode(b"inner", INNER.digest, size)])
        putter = dirs.put_multiple_start()
        await putter.put(parent)
        assert await putter.close() == parent.digest
    liar = Directory(directories=[DirectoryNode(b"inner", INNER.digest, 5)])
    putter = dirs.put_multiple_start()
    await putter.put(liar)
    with pytest.raises(ValidationError, match="gives size 5"):
        await putter.close()
    await dirs.close()
