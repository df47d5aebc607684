"""The PathInfo race combinator (wrong answers skipped, the check) and race in composition files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvix.castore.blobservice import read_all, write_all
from tvix.castore.blobservice.race import RaceBlobService
from tvix.castore.directoryservice.race import RaceDirectoryService
from tvix.castore.errors import IntegrityError
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST
from tvix.store.composition import Composition, CompositionError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.pathinfoservice.race import RacePathInfoService
from tvix.store.testing.fixtures import path_info


class _Other(MemoryPathInfoService):
    async def get(self, digest: bytes) -> PathInfo | None:
        return path_info(999)


async def test_path_info_wrong_answer_skipped_and_check() -> None:
    info = path_info(1)
    good = MemoryPathInfoService()
    await good.put(info)
    assert await RacePathInfoService([_Other(), good]).get(info.store_path.digest) == info

    async def refuse(i: PathInfo) -> None:
        raise IntegrityError(f"refused {i.store_path}")

    with pytest.raises(IntegrityError, match="refused"):
        await RacePathInfoService([good, MemoryPathInfoService()], refuse).get(
            info.store_path.digest
        )


# -- composition ---------------------------------------------------------------------------


async def test_composition(tmp_path: Path) -> None:
    text = """
    [blobservices.default]
    type = "race"
    sources = ["a", "b"]
    [blobservices.a]
    type = "memory"
    [blobservices.b]
    type = "memory"
    [directoryservices.default]
    type = "race"
    sources = ["one"]
    [directoryservices.one]
    type = "memory"
    [pathinfoservices.default]
    type = "race"
    sources = ["x", "y"]
    [pathinfoservices.x]
    type = "memory"
    [pathinfoservices.y]
    type = "sqlite"
    path = "p.sqlite"
    """
    async with Composition.from_toml(text, base_dir=tmp_path) as comp:
        blobs, dirs, infos = comp.build_all()
        assert isinstance(blobs, RaceBlobService)
        assert blobs.sources == [comp.blob_service("a"), comp.blob_service("b")]
        assert isinstance(dirs, RaceDirectoryService)
        assert isinstance(infos, RacePathInfoService)
        await write_all(comp.blob_service("b"), BLOB_A)
        assert await read_all(blobs, BLOB_A_DIGEST) == BLOB_A
    with pytest.raises(CompositionError, match=r"blobservices.default: 'sources' must name"):
        Composition.from_toml(
            '[blobservices.default]\ntype = "race"\nsources = []\n'
        ).blob_service()
    with pytest.raises(CompositionError, match="refers to 'nope'"):
        Composition.from_toml('[blobservices.default]\ntype = "race"\nsources = ["nope"]\n')
