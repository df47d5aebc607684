"""The packed blob stores in composition files: every URL option as a table key, strictly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvix.castore.blobservice import read_all, write_all
from tvix.castore.blobservice.packs import PacksBlobService
from tvix.castore.testing.fixtures import BLOB_B, BLOB_B_DIGEST
from tvix.store.composition import Composition, CompositionError

_REST = """
[directoryservices.default]
type = "memory"
[pathinfoservices.default]
type = "memory"
"""


async def test_packs_table(tmp_path: Path) -> None:
    text = (
        '[blobservices.default]\ntype = "packs"\npath = "blobs"\nzstd = false\n'
        "avg_chunk_size = 65536\npack_size = 2097152\n" + _REST
    )
    async with Composition.from_toml(text, base_dir=tmp_path) as c:
        blobs = c.blob_service()
        assert isinstance(blobs, PacksBlobService)
        await write_all(blobs, BLOB_B)
        assert await read_all(blobs, BLOB_B_DIGEST) == BLOB_B
        chunks = await blobs.chunks(BLOB_B_DIGEST)
        assert chunks is not None
        assert max(c.size for c in chunks) <= 131072
    assert (tmp_path / "blobs" / "index.sqlite").exists()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('type = "packs"\npath = "x"\ncolour = "red"', "unknown key 'colour'"),
        ('type = "packs"', "path"),
        ('type = "packs"\npath = "x"\npack_size = 10', "pack_size must be at least"),
        ('type = "packs_s3"\nbucket = "b"', "index"),
        (
            'type = "packs_s3"\nbucket = "b"\nindex = "postgresql://h/db?bogus=1"',
            "unknown option.*bogus",
        ),
    ],
)
async def test_packs_table_rejected(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(CompositionError, match=message):
        async with Composition.from_toml(
            "[blobservices.default]\n" + table + "\n" + _REST, base_dir=tmp_path
        ) as c:
            c.blob_service()
