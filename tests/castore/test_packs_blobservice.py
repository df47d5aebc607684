"""PacksBlobService on local files: the conformance suite, crash safety, verify, locality, URLs."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tvix.castore.blobservice import BlobService, from_url, read_all, write_all
from tvix.castore.blobservice.packs import PacksBlobService, PacksFileConfig, PacksS3Config
from tvix.castore.blobservice.packs._format import HEADER_SIZE, MAGIC, coalesce
from tvix.castore.errors import IntegrityError, InvalidURLError
from tvix.castore.testing import BlobServiceTests
from tvix.castore.testing.fixtures import BLOB_A, BLOB_A_DIGEST, BLOB_B, BLOB_B_DIGEST, b3, big_blob
from tvix.castore.url import ServiceURL

MIB = 1 << 20


@pytest.mark.parametrize("zstd", ["true", "false"])
class TestPacksFile(BlobServiceTests):
    @pytest.fixture
    async def blob_service(self, tmp_path: Path, zstd: str) -> AsyncIterator[BlobService]:
        svc = from_url(f"packs+file://{tmp_path}/store?zstd={zstd}")
        yield svc
        await svc.close()


class TestPacksSmallChunksSmallPacks(BlobServiceTests):
    """Many chunks per blob and many packs, so reads cross chunks and packs."""

    @pytest.fixture
    async def blob_service(self, tmp_path: Path) -> AsyncIterator[BlobService]:
        svc = from_url(f"packs+file://{tmp_path}?avg_chunk_size=16384&pack_size=1048576")
        yield svc
        await svc.close()


def _open(path: Path, query: str = "") -> PacksBlobService:
    svc = from_url(f"packs+file://{path}{query}")
    assert isinstance(svc, PacksBlobService)
    return svc


def _packs(root: Path) -> list[Path]:
    return sorted((root / "packs").glob("*.pack"))


def _index(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "index.sqlite")


async def test_persists_and_stays_few_files(tmp_path: Path) -> None:
    svc = _open(tmp_path)
    files = [big_blob(1000 + i, seed=i) for i in range(500)]
    for data in files:
        await write_all(svc, data)
    await write_all(svc, BLOB_B)
    await svc.close()
    assert len(_packs(tmp_path)) == 1
    svc = _open(tmp_path)
    try:
        assert await read_all(svc, BLOB_B_DIGEST) == BLOB_B
        got = await svc.read_many([b3(d) for d in files])
        assert got == files
        assert await svc.verify_storage() == []
    finally:
        await svc.close()


async def test_many_small_writes_share_commits(tmp_path: Path) -> None:
    """Blobs closed together are appended, synced and indexed together."""
    import asyncio

    svc = _open(tmp_path)
    commits = 0
    inner = svc.index.commit_sync

    def counting(*args: object) -> None:
        nonlocal commits
        commits += 1
        inner(*args)  # type: ignore[arg-type]

    svc.index.commit_sync = counting  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(write_all(svc, b"file %d" % i) for i in range(200)))
        assert commits <= 2
    finally:
        await svc.close()


async def test_live_bytes_accounting(tmp_path: Path) -> None:
    svc = _open(tmp_path)
    await write_all(svc, BLOB_A)
    await write_all(svc, BLOB_B)
    await write_all(svc, BLOB_A)  # nothing new
    packs = await svc.index.packs()
    await svc.close()
    (pack,) = packs
    assert pack.size == os.path.getsize(_packs(tmp_path)[0])
    assert pack.live == pack.size - len(MAGIC)


async def test_torn_tail_ignored_then_reclaimed(tmp_path: Path) -> None:
    svc = _open(tmp_path)
    await write_all(svc, BLOB_A)
    await svc.close()
    (pack,) = _packs(tmp_path)
    committed = pack.stat().st_size
    # A crash mid-append: bytes past the committed size, never indexed.
    with pack.open("ab") as f:
        f.write(b"\x00" * 1000 + b"torn")
    svc = _open(tmp_path)
    try:
        assert await read_all(svc, BLOB_A_DIGEST) == BLOB_A
        assert await svc.verify_storage() == []
        # The next writer takes the pack over and cuts the tail off first.
        await write_all(svc, BLOB_B)
        assert _packs(tmp_path) == [pack]
        (info,) = await svc.index.packs()
        assert info.size == pack.stat().st_size
        assert info.live == info.size - len(MAGIC)
        with pack.open("rb") as f:
            f.seek(committed)
            assert f.read(HEADER_SIZE)[:32] != b"\x00" * 32
        assert await read_all(svc, BLOB_B_DIGEST) == BLOB_B
        assert await svc.verify_storage() == []
    finally:
        await svc.close()


async def test_orphan_pack_reclaimed(tmp_path: Path) -> None:
    svc = _open(tmp_path)
    await write_all(svc, BLOB_A)
    await svc.close()
    orphan = tmp_path / "packs" / "dead-beef.pack"
    orphan.write_bytes(MAGIC + b"a crashed writer never committed this")
    svc = _open(tmp_path)
    try:
        assert await svc.verify_storage() == []  # unreferenced bytes are not damage
        await write_all(svc, BLOB_B)
        assert not orphan.exists()
        assert await read_all(svc, BLOB_A_DIGEST) == BLOB_A
    finally:
        await svc.close()


async def test_pack_held_by_another_writer_is_left_alone(tmp_path: Path) -> None:
    first = _open(tmp_path)
    second = _open(tmp_path)
    try:
        await write_all(first, BLOB_A)
        await write_all(second, BLOB_B)
        # Each appends to its own pack: the other's is locked.
        assert len(_packs(tmp_path)) == 2
        assert await read_all(first, BLOB_B_DIGEST) == BLOB_B
        assert await read_all(second, BLOB_A_DIGEST) == BLOB_A
    finally:
        await first.close()
        await second.close()


_WRITER = """
import asyncio, sys
from tvix.castore.blobservice import from_url, write_all
async def main():
    svc = from_url(sys.argv[1])
    for i in range(300):
        await write_all(svc, b"%s %d " % (sys.argv[2].encode(), i) * 50)
    await write_all(svc, bytes(range(256)) * 8000 + sys.argv[2].encode())
    await svc.close()
asyncio.run(main())
"""


def _run_writers(url: str, n: int) -> list[int]:
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, url, f"w{i}"]) for i in range(n)]
    return [p.wait() for p in procs]


async def test_processes_append_concurrently(tmp_path: Path) -> None:
    url = f"packs+file://{tmp_path}"
    assert _run_writers(url, 3) == [0, 0, 0]
    svc = _open(tmp_path)
    try:
        for n in range(3):
            for i in range(300):
                data = b"w%d %d " % (n, i) * 50
                assert await read_all(svc, b3(data)) == data
            big = bytes(range(256)) * 8000 + b"w%d" % n
            assert await read_all(svc, b3(big)) == big
        assert await svc.verify_storage() == []
    finally:
        await svc.close()


async def test_damaged_payload_detected(tmp_path: Path) -> None:
    svc = _open(tmp_path, "?zstd=false")
    victim = b"this chunk will be damaged" * 10
    await write_all(svc, victim)
    await write_all(svc, BLOB_B)
    loc = (await svc.index.locate([b3(victim)]))[b3(victim)]
    await svc.close()
    (pack,) = _packs(tmp_path)
    with pack.open("r+b") as f:
        f.seek(loc.offset + 5)
        f.write(b"XYZ")
    svc = _open(tmp_path)
    try:
        problems = await svc.verify_storage()
        assert len(problems) == 1
        assert b3(victim).hex() in problems[0]
        with pytest.raises(IntegrityError, match="hash"):
            await read_all(svc, b3(victim))
        # The read dropped the damaged chunk's row: absent now, and stored again by a writer.
        assert await svc.read_many([b3(victim)]) == [None]
        assert not await svc.has(b3(victim))
        assert await svc.verify_storage() == []
        assert await read_all(svc, BLOB_B_DIGEST) == BLOB_B
        await write_all(svc, victim)
        assert await read_all(svc, b3(victim)) == victim
    finally:
        await svc.close()


async def test_verify_storage_repair_drops_damaged_chunks_and_their_records(
    tmp_path: Path,
) -> None:
    svc = _open(tmp_path, "?zstd=false&avg_chunk_size=16384")
    big = big_blob(200_000, seed=5)
    digest = await write_all(svc, big)
    chunks = await svc.chunks(digest)
    assert chunks is not None
    assert len(chunks) > 2
    loc = (await svc.index.locate([chunks[1].digest]))[chunks[1].digest]
    await svc.close()
    (pack,) = _packs(tmp_path)
    with pack.open("r+b") as f:
        f.seek(loc.offset + 100)
        f.write(b"XYZ")
    svc = _open(tmp_path)
    try:
        problems = await svc.verify_storage(repair=True)
        assert f"removed chunk {chunks[1].digest.hex()} (damaged)" in problems
        assert f"removed blob record {digest.hex()}" in problems
        assert not await svc.has(digest)
        assert not await svc.has(chunks[1].digest)
        assert await svc.has(chunks[0].digest)  # intact chunks stay
        assert await svc.verify_storage() == []
        assert await write_all(svc, big) == digest
        assert await read_all(svc, digest) == big
    finally:
        await svc.close()


async def test_index_mismatch_detected(tmp_path: Path) -> None:
    svc = _open(tmp_path)
    await write_all(svc, BLOB_A)
    await write_all(svc, b"another blob" * 100)
    await svc.close()
    db = _index(tmp_path)
    db.execute("UPDATE chunks SET offset = offset + 1 WHERE digest = ?", (bytes(BLOB_A_DIGEST),))
    db.execute("UPDATE packs SET live = live + 7")
    db.commit()
    db.close()
    svc = _open(tmp_path)
    try:
        problems = await svc.verify_storage()
        assert any("does not match the index" in p for p in problems), problems
        assert any("live bytes" in p for p in problems), problems
    finally:
        await svc.close()


@pytest.mark.parametrize("how", ["read", "readinto"])
async def test_reading_front_to_back_reads_each_chunk_once(tmp_path: Path, how: str) -> None:
    svc = _open(tmp_path, "?avg_chunk_size=16384&zstd=false")
    data = os.urandom(6 * MIB)
    digest = await write_all(svc, data)
    chunks = await svc.chunks(digest)
    assert chunks is not None
    assert len(chunks) > 3 * 32  # several windows of chunks
    read_bytes = 0
    storage_read = svc.storage.read

    def counted(pack: str, start: int, end: int) -> bytes | memoryview:
        nonlocal read_bytes
        read_bytes += end - start
        return storage_read(pack, start, end)

    svc.storage.read = counted  # type: ignore[method-assign]
    try:
        reader = await svc.open_read(digest)
        assert reader is not None
        parts = []
        buffer = bytearray(100_000)  # not a multiple of anything
        while True:
            if how == "read":
                part = await reader.read(100_000)
            else:
                part = bytes(buffer[: await reader.readinto(buffer)])
            if not part:
                break
            parts.append(part)
        await reader.close()
        assert b"".join(parts) == data
        # Each chunk's payload once (raw: as many bytes as the blob), plus the entry
        # headers between neighbours, which are read along with them.
        assert len(data) <= read_bytes < len(data) + len(chunks) * HEADER_SIZE + 1
    finally:
        await svc.close()


@pytest.mark.parametrize("how", ["read", "readinto"])
async def test_a_record_listing_another_blobs_chunks_is_caught(tmp_path: Path, how: str) -> None:
    """Every chunk verifies, yet they are not the blob: the whole blob's digest says so."""
    svc = _open(tmp_path, "?avg_chunk_size=16384")
    one, other = os.urandom(3 * MIB), os.urandom(3 * MIB)
    one_digest, other_digest = await write_all(svc, one), await write_all(svc, other)
    await svc.close()
    db = _index(tmp_path)
    db.execute(
        "UPDATE blobs SET chunks = (SELECT chunks FROM blobs WHERE digest = ?) WHERE digest = ?",
        (bytes(other_digest), bytes(one_digest)),
    )
    db.commit()
    db.close()
    svc = _open(tmp_path)
    try:
        reader = await svc.open_read(one_digest)
        assert reader is not None
        got = 0
        buffer = bytearray(MIB)

        async def read_to_the_end() -> None:
            nonlocal got
            while True:
                n = len(await reader.read(MIB)) if how == "read" else await reader.readinto(buffer)
                assert n, "read to the end without the mismatch being noticed"
                got += n

        with pytest.raises(IntegrityError, match="hashing to"):
            await read_to_the_end()
        assert got < len(other)  # the last bytes were never handed out
        await reader.close()
    finally:
        await svc.close()


async def test_missing_pack_and_record_chunk_detected(tmp_path: Path) -> None:
    svc = _open(tmp_path, "?pack_size=1048576&avg_chunk_size=16384")
    await write_all(svc, BLOB_B)
    chunks = await svc.chunks(BLOB_B_DIGEST)
    await svc.close()
    assert chunks
    assert len(chunks) > 1
    db = _index(tmp_path)
    db.execute("DELETE FROM chunks WHERE digest = ?", (bytes(chunks[3].digest),))
    db.commit()
    db.close()
    _packs(tmp_path)[-1].unlink()
    svc = _open(tmp_path)
    try:
        problems = await svc.verify_storage()
        assert any("is indexed but missing" in p for p in problems), problems
        assert any("is not indexed" in p for p in problems), problems
    finally:
        await svc.close()


async def test_neighbouring_chunks_read_at_once(tmp_path: Path) -> None:
    svc = _open(tmp_path)
    files = [big_blob(3000, seed=i) for i in range(100)]
    for data in files:
        await write_all(svc, data)
    reads: list[tuple[int, int]] = []
    inner = svc.storage.read

    def counting(pack: str, start: int, end: int) -> bytes | memoryview:
        reads.append((start, end))
        return inner(pack, start, end)

    svc.storage.read = counting  # type: ignore[method-assign]
    try:
        assert await svc.read_many([b3(d) for d in reversed(files)]) == files[::-1]
        assert len(reads) == 1
        reads.clear()
        await write_all(svc, BLOB_B)
        assert await read_all(svc, BLOB_B_DIGEST) == BLOB_B
        chunks = await svc.chunks(BLOB_B_DIGEST)
        assert chunks is not None
        assert len(reads) < len(chunks)
    finally:
        await svc.close()


def test_coalesce_limits() -> None:
    from tvix.castore.blobservice.packs._format import Location

    locs = [
        Location("a", 100, 50, 50, 0),
        Location("b", 0, 10, 10, 0),
        Location("a", 200, 50, 50, 0),
        Location("a", 10_000_000, 50, 50, 0),
    ]
    runs = coalesce(locs)
    assert [(r.pack, r.start, r.end, sorted(r.members)) for r in runs] == [
        ("a", 100, 250, [0, 2]),
        ("a", 10_000_000, 10_000_050, [3]),
        ("b", 0, 10, [1]),
    ]
    assert len(coalesce(locs, max_run=120)) == 4


# -- URLs and configs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("packs+file:///d", PacksFileConfig("/d")),
        ("packs+file:///d/", PacksFileConfig("/d")),
        (
            "packs+file:///d?zstd=false&avg_chunk_size=65536&pack_size=8388608",
            PacksFileConfig("/d", zstd=False, avg_chunk_size=65536, pack_size=8388608),
        ),
        (
            "packs+s3://bkt/a/b?index=postgresql://u@h/db&endpoint=http://x:1&region=r",
            PacksS3Config(
                "bkt", "postgresql://u@h/db", prefix="a/b", endpoint="http://x:1", region="r"
            ),
        ),
        (
            "packs+s3://bkt?index=postgresql%3A%2F%2Fh%2Fdb%3Fschema%3Ds&allow_http=true&zstd=0",
            PacksS3Config("bkt", "postgresql://h/db?schema=s", allow_http=True, zstd=False),
        ),
    ],
)
def test_valid_urls(url: str, expected: object) -> None:
    parsed = ServiceURL.parse(url)
    config = (PacksFileConfig if parsed.scheme == "packs+file" else PacksS3Config).from_url(parsed)
    assert config == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("packs+file:///d?colour=red", "unknown option.*colour"),
        ("packs+file:///d?endpoint=http://x", "unknown option.*endpoint"),
        ("packs+file://host/d", "no host"),
        ("packs+file://", "path is required"),
        ("packs+file:///", "path is required"),
        ("packs+file:///d?zstd=maybe", "zstd must be true or false"),
        ("packs+file:///d?avg_chunk_size=lots", "avg_chunk_size must be an integer"),
        ("packs+file:///d?avg_chunk_size=100", "avg_chunk_size must be within"),
        ("packs+file:///d?pack_size=1000", "pack_size must be at least"),
        ("packs+s3://bkt/p", "index=postgresql://... is required"),
        ("packs+s3://bkt/p?index=sqlite:///x", "not postgresql"),
        ("packs+s3://bkt/p?index=postgresql://h/db%3Fbogus%3D1", "unknown option.*bogus"),
        ("packs+s3://bkt/p?index=postgresql://h/db&colour=red", "unknown option.*colour"),
        ("packs+s3://?index=postgresql://h/db", "expected packs\\+s3://BUCKET"),
        ("packs+s3://b/a//c?index=postgresql://h/db", "empty segment"),
        ("packs+s3://b?index=postgresql://h/db&endpoint=ftp://x", "endpoint must be"),
        ("packs+s3://b?index=postgresql://h/db&allow_http=perhaps", "allow_http must be"),
    ],
)
def test_invalid_urls(url: str, message: str) -> None:
    with pytest.raises(InvalidURLError, match=message):
        from_url(url)


def test_invalid_url_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(InvalidURLError):
        from_url(f"packs+file://{tmp_path}/new?bogus=1")
    assert not (tmp_path / "new").exists()


def test_config_settings() -> None:
    """The composition table of each type: every URL option, the required ones required."""
    file_keys = PacksFileConfig.settings()
    assert set(file_keys) == {"path", "zstd", "avg_chunk_size", "pack_size"}
    assert [k for k, v in file_keys.items() if v.required] == ["path"]
    s3_keys = PacksS3Config.settings()
    assert set(s3_keys) == {
        "bucket",
        "index",
        "prefix",
        "endpoint",
        "region",
        "allow_http",
        "zstd",
        "avg_chunk_size",
        "pack_size",
    }
    assert sorted(k for k, v in s3_keys.items() if v.required) == ["bucket", "index"]
    assert PacksFileConfig.from_settings({"path": "/d", "zstd": False}) == PacksFileConfig(
        "/d", zstd=False
    )
    with pytest.raises(InvalidURLError, match="pack_size must be at least"):
        PacksFileConfig.from_settings({"path": "/d", "pack_size": 10})


async def test_large_blob_across_packs_is_synced_before_each_pack_is_let_go(
    tmp_path: Path,
) -> None:
    """The middle of a large blob is appended lazily; every pack it leaves behind
    is durable and indexed up to its end, so nobody taking it over cuts anything."""
    svc = _open(tmp_path, "?pack_size=1048576&zstd=false")
    data = big_blob(5 * MIB + 123, seed=11)
    try:
        await write_all(svc, data)
        for info in await svc.index.packs():
            assert info.size == (tmp_path / "packs" / f"{info.name}.pack").stat().st_size
            assert info.live == info.size - len(MAGIC)
        assert len(await svc.index.packs()) >= 2  # a pack is let go at an append boundary
    finally:
        await svc.close()
    other = _open(tmp_path)
    try:
        await write_all(other, BLOB_A)  # takes a pack over
        assert await read_all(other, b3(data)) == data
        assert await other.verify_storage() == []
    finally:
        await other.close()


async def test_aborted_large_blob_leaves_nothing_visible(tmp_path: Path) -> None:
    svc = _open(tmp_path, "?zstd=false")
    data = big_blob(12 * MIB, seed=5)
    writer = svc.open_write()
    await writer.write(data[: 9 * MIB])
    await writer.abort()
    try:
        chunks_seen = await svc.index.locate([b3(data)])
        assert chunks_seen == {}
        assert not await svc.has(b3(data))
        # A later small write syncs and indexes what was appended (valid chunks).
        await write_all(svc, BLOB_A)
        assert await svc.verify_storage() == []
    finally:
        await svc.close()


async def test_a_damaged_blob_fails_only_its_own_readers(tmp_path: Path) -> None:
    """Blobs opened together are read together; damage in one fails only that one."""
    import asyncio

    svc = _open(tmp_path, "?zstd=false")
    files = [big_blob(2000, seed=i) for i in range(20)]
    for data in files:
        await write_all(svc, data)
    loc = (await svc.index.locate([b3(files[7])]))[b3(files[7])]
    with (tmp_path / "packs" / f"{loc.pack}.pack").open("r+b") as f:
        f.seek(loc.offset + 10)
        f.write(b"!!!")
    try:
        got = await asyncio.gather(*(read_all(svc, b3(d)) for d in files), return_exceptions=True)
        assert isinstance(got[7], IntegrityError)
        assert [g for i, g in enumerate(got) if i != 7] == files[:7] + files[8:]
    finally:
        await svc.close()
