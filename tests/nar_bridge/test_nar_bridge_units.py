"""nar-bridge's parts: NAR layout and ranges, NAR URLs, upload decoding, auth, the CLI."""

from __future__ import annotations

import asyncio
import base64
import bz2
import concurrent.futures
import gzip
import hashlib
import io
import lzma
import os
import random
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import zstandard

from tests.support.nix import Nix
from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.blobservice.base import BlobReader, ChunkMeta
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import IntegrityError
from tvix.castore.ingest import ingest_path
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.cli.common import CLIError
from tvix.cli.nar_bridge import ListenAddress
from tvix.nar_bridge import BasicAuth, decode_castore_nar, encode_castore_nar, load_credentials
from tvix.nar_bridge.errors import BadRequest, RangeNotSatisfiable, UnsupportedMediaType
from tvix.nar_bridge.server import parse_range
from tvix.nar_bridge.upload import NarBody
from tvix.nixcompat.signing import SigningKey
from tvix.store.nar import render_nar
from tvix.store.nar.seekable import LayoutCache, NarLayout, render_full, render_range


async def _layout(tree: Path) -> tuple[MemoryBlobService, NarLayout]:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    node = await ingest_path(blobs, dirs, tree)
    layout = await NarLayout.load(dirs, node)
    assert layout is not None
    return blobs, layout


async def _collect(pieces: object) -> bytes:
    return b"".join([p async for p in pieces])  # type: ignore[attr-defined]


@pytest.mark.nix
async def test_layout_size_and_every_range_start(tmp_path: Path, nix: Nix) -> None:
    tree = make_tree(tmp_path / "tree", big_size=1000)
    dump = nix.dump(tree)
    blobs, layout = await _layout(tree)
    assert layout.size == len(dump)
    assert await _collect(render_full(blobs, layout)) == dump
    # Every start and a spread of ends, assembled from the segments with the
    # blob bytes at hand (the async rendering is checked on a sample below).
    contents = {}
    for node in _files(layout):
        reader = await blobs.open_read(node.digest)
        assert reader is not None
        contents[node.digest] = await reader.read()
    ends = sorted({1, 8, 9, 100, len(dump) // 2, len(dump) - 1, len(dump)})
    for start in range(len(dump)):
        for end in (e for e in ends if e > start):
            got = b"".join(
                seg if isinstance(seg, bytes) else contents[seg[0].digest][seg[1] : seg[1] + seg[2]]
                for seg in layout.segments(start, end)
            )
            assert got == dump[start:end], (start, end)
    rng = random.Random(1)
    for _ in range(50):
        start = rng.randrange(len(dump))
        end = rng.randrange(start + 1, len(dump) + 1)
        assert await _collect(render_range(blobs, layout, start, end)) == dump[start:end]


def _files(layout: NarLayout) -> list[FileNode]:
    found = [n for d in layout.closure.values() for n in d.files]
    return found + ([layout.root] if isinstance(layout.root, FileNode) else [])


async def test_range_skips_blobs_before_the_start(tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "a").write_bytes(b"a" * 5000)
    (tree / "b").write_bytes(b"b" * 5000)
    blobs, layout = await _layout(tree)
    full = await _collect(render_full(blobs, layout))
    opened: list[B3Digest] = []
    real_open = blobs.open_read

    async def spy(digest: B3Digest) -> object:
        opened.append(digest)
        return await real_open(digest)

    blobs.open_read = spy  # type: ignore[method-assign]
    tail = await _collect(render_range(blobs, layout, layout.size - 200, layout.size))
    assert tail == full[-200:]
    directory = next(iter(layout.closure.values()))
    assert opened == [directory.files[1].digest]  # "a" was skipped by its size


async def test_deep_and_single_node_layouts() -> None:
    blobs, dirs = MemoryBlobService(), MemoryDirectoryService()
    async with blobs.open_write() as w:
        await w.write(b"leaf")
    leaf = FileNode(b"f", await w.close(), 4, executable=True)
    directory = Directory(files=[leaf])
    async with dirs.put_multiple_start() as putter:
        await putter.put(directory)
        for _ in range(1500):  # deeper than Python's recursion limit
            node = DirectoryNode(b"d", directory.digest, directory.size)
            directory = Directory(directories=[node], symlinks=[SymlinkNode(b"s", b"../x")])
            await putter.put(directory)
    root = DirectoryNode(b"root", directory.digest, directory.size)
    roots: list[Node] = [root, leaf.renamed(b"root"), SymlinkNode(b"root", b"/target")]
    for node in roots:
        layout = await NarLayout.load(dirs, node)
        assert layout is not None
        want = await _collect(render_nar(blobs, dirs, node))
        assert layout.size == len(want)
        assert await _collect(render_range(blobs, layout, 0, layout.size)) == want
        assert await _collect(render_range(blobs, layout, 3, layout.size - 5)) == want[3:-5]
    missing = DirectoryNode(b"root", B3Digest(bytes(32)), 1)
    assert await NarLayout.load(dirs, missing) is None

    cache = LayoutCache(dirs, max_directories=2000)
    first, second = await asyncio.gather(cache.get(root), cache.get(root.renamed(b"other")))
    assert first is not None
    assert second is not None
    assert first.size == second.size
    assert first.closure is second.closure  # loaded once
    assert await cache.get(missing) is None


def test_castore_nar_urls() -> None:
    digest = B3Digest(hashlib.sha256(b"x").digest())
    for node in (
        DirectoryNode(b"a", digest, 7),
        FileNode(b"b", digest, 12, executable=True),
        SymlinkNode(b"c", b"/some/target"),
    ):
        encoded = encode_castore_nar(node)
        assert not set(encoded) & set("=/+")
        decoded = decode_castore_nar(encoded)
        assert decoded == node.renamed(decoded.name)
        # The name is left out: equal trees under different names share the URL.
        assert encode_castore_nar(node.renamed(b"other")) == encoded
    for bad in ("", "!!", "A" * 9000, "CgA", "/w"):
        with pytest.raises(BadRequest):
            decode_castore_nar(bad)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-", 100, (0, 100)),
        ("bytes=10-19", 100, (10, 20)),
        ("bytes=90-200", 100, (90, 100)),
        ("bytes=-30", 100, (70, 100)),
        ("bytes=-300", 100, (0, 100)),
        (" bytes=5-5 ", 100, (5, 6)),
        ("bytes=0-1,4-5", 100, None),
        ("lines=0-1", 100, None),
        ("bytes=9-3", 100, None),
        ("bytes=-", 100, None),
        ("bytes=100-", 100, RangeNotSatisfiable),
        ("bytes=100-150", 100, RangeNotSatisfiable),
        ("bytes=-0", 100, RangeNotSatisfiable),
    ],
)
def test_parse_range(header: str | None, size: int, expected: object) -> None:
    if expected is RangeNotSatisfiable:
        with pytest.raises(RangeNotSatisfiable) as e:
            parse_range(header, size)
        assert e.value.headers == {"Content-Range": f"bytes */{size}"}
    else:
        assert parse_range(header, size) == expected


def _chunked_reader(data: bytes, seed: int) -> object:
    rng = random.Random(seed)
    pos = 0

    async def read(n: int) -> bytes:
        nonlocal pos
        take = min(n, rng.randint(1, 70_000))
        piece = data[pos : pos + take]
        pos += len(piece)
        return piece

    return read


@pytest.mark.parametrize(
    ("compression", "compress", "ext"),
    [
        ("none", lambda b: b, ""),
        ("xz", lzma.compress, ".xz"),
        ("bzip2", bz2.compress, ".bz2"),
        ("gzip", gzip.compress, ""),  # Nix 2.8 names gzip NARs plain .nar
        ("zstd", lambda b: zstandard.ZstdCompressor().compress(b), ".zst"),
        # Two zstd frames, as a parallel compressor writes.
        ("zstd", lambda b: b"".join(zstandard.compress(p) for p in (b[:999], b[999:])), ".zst"),
    ],
)
async def test_nar_body_decoding(compression: str, compress: object, ext: str) -> None:
    nar = os.urandom(300_000) + bytes(2_000_000)
    body = compress(nar)  # type: ignore[operator]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reader = NarBody(_chunked_reader(body, 7), ext, pool)  # type: ignore[arg-type]
        await reader.start()
        assert reader.compression == compression
        out = []
        while chunk := await reader.read(1 << 16):
            # Bounded: never more than asked for, however well the data compresses.
            assert len(chunk) <= 1 << 16
            out.append(chunk)
        assert b"".join(out) == nar
        assert await reader.finish() == (len(body), hashlib.sha256(body).digest())


async def test_nar_body_refusals() -> None:
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        for body, ext, error in (
            (b"\x04\x22\x4d\x18rest", ".lz4", UnsupportedMediaType),
            (b"LZIP\x01rest", ".lzip", UnsupportedMediaType),
            (b"anything", ".br", UnsupportedMediaType),
        ):
            with pytest.raises(error):
                await NarBody(_chunked_reader(body, 1), ext, pool).start()  # type: ignore[arg-type]
        reader = NarBody(_chunked_reader(b"BZh9garbage" * 10, 1), ".bz2", pool)  # type: ignore[arg-type]
        await reader.start()
        with pytest.raises(BadRequest, match="corrupt bzip2 data"):
            await reader.read(100)


def test_credentials(tmp_path: Path) -> None:
    f = tmp_path / "auth"
    f.write_text("# comment\n\nalice:pa:ss\nbob:x\n")
    creds = load_credentials(f)
    assert creds == {"alice": "pa:ss", "bob": "x"}
    auth = BasicAuth(creds)

    def header(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert auth.check(header("alice", "pa:ss")) == "alice"
    assert auth.check(header("alice", "pa")) is None
    assert auth.check(header("carol", "x")) is None
    assert auth.check("Basic !!!") is None
    assert auth.check(None) is None
    f.write_text("no-colon\n")
    with pytest.raises(ValueError, match="line 1"):
        load_credentials(f)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[::1]:9000", ListenAddress(host="::1", port=9000)),
        ("127.0.0.1:0", ListenAddress(host="127.0.0.1", port=0)),
        ("localhost:8080", ListenAddress(host="localhost", port=8080)),
        ("unix:///run/nb.sock", ListenAddress(unix_path="/run/nb.sock")),
        ("::1:9000", CLIError),
        ("9000", CLIError),
        ("host:99999", CLIError),
        ("unix://relative", CLIError),
    ],
)
def test_listen_address(text: str, expected: object) -> None:
    if expected is CLIError:
        with pytest.raises(CLIError):
            ListenAddress.parse(text)
    else:
        assert ListenAddress.parse(text) == expected


@pytest.mark.e2e
def test_cli_help_and_unix_socket(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    out = subprocess.run(
        [sys.executable, "-m", "tvix.cli.nar_bridge", "--help"],
        capture_output=True,
        check=True,
        env=env,
    ).stdout.decode()
    for option in (
        "--listen-address",
        "--priority",
        "--signing-key-file",
        "--allow-upload",
        "--upload-auth-file",
        "--blob-service-addr",
        "PATH_INFO_SERVICE_ADDR",
    ):
        assert option in out
    bad = subprocess.run(
        [sys.executable, "-m", "tvix.cli.nar_bridge", "--listen-address", "nonsense"],
        capture_output=True,
        env=env,
    )
    assert bad.returncode == 1
    assert bad.stderr.decode().startswith("nar-bridge: error: --listen-address 'nonsense'")

    sock = tmp_path / "nb.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvix.cli.nar_bridge",
            "--listen-address",
            f"unix://{sock}",
            "--blob-service-addr",
            "memory://",
            "--directory-service-addr",
            "memory://",
            "--path-info-service-addr",
            "memory://",
            "--priority",
            "7",
        ],
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert line == f"nar-bridge: listening on unix://{sock}\n"
        # Then what it serves, and who may upload.
        assert proc.stderr.readline().decode() == (
            "nar-bridge: serving memory://: narinfos unsigned, NARs compressed: none\n"
        )
        assert proc.stderr.readline().decode() == (
            "nar-bridge: uploads: off (--allow-upload turns them on)\n"
        )

        async def get() -> str:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s,
                s.get("http://localhost/nix-cache-info") as r,
            ):
                return await r.text()

        assert asyncio.run(get()).endswith("Priority: 7\n")
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


def _first_lines(args: list[str], count: int) -> list[str]:
    """The first ``count`` lines ``nar-bridge ARGS`` (memory services) writes to stderr."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    services = [f"--{kind}-service-addr=memory://" for kind in ("blob", "directory", "path-info")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvix.cli.nar_bridge", *services, *args],
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stderr is not None
        return [proc.stderr.readline().decode().rstrip("\n") for _ in range(count)]
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0


@pytest.mark.e2e
def test_start_up_says_who_may_upload(tmp_path: Path) -> None:
    key = tmp_path / "key.sec"
    key.write_text(str(SigningKey.generate("cache.example.org-1")))
    users = tmp_path / "users"
    users.write_text("alice:secret\n")
    # Open uploads on every interface: a warning.
    lines = _first_lines(["--listen-address", "0.0.0.0:0", "--allow-upload"], 4)
    assert lines[0].startswith("nar-bridge: listening on http://0.0.0.0:")
    assert lines[1] == "nar-bridge: serving memory://: narinfos unsigned, NARs compressed: zstd"
    assert lines[2] == "nar-bridge: uploads: on, without authentication"
    assert lines[3].startswith("nar-bridge: warning: anyone who can reach this address")
    # With a password and a key: the key's name and the users' file, no warning.
    args = ["--listen-address", "0.0.0.0:0", "--allow-upload", "--upload-auth-file", str(users)]
    lines = _first_lines([*args, "--signing-key-file", str(key), "-v"], 3)
    assert lines[1] == (
        "nar-bridge: serving memory://: narinfos signed by cache.example.org-1, "
        "NARs compressed: zstd"
    )
    assert lines[2] == f"nar-bridge: uploads: on, HTTP basic auth with the users of {users}"
    # Open uploads on loopback only: no warning (the next line would be a request's).
    lines = _first_lines(["--listen-address", "127.0.0.1:0", "--allow-upload"], 3)
    assert lines[2] == "nar-bridge: uploads: on, without authentication"


class _UnsizedBlobs(MemoryBlobService):
    """Readers that cannot seek to their end, blobs without chunks: the size is unknown."""

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        reader = await super().open_read(digest)
        return None if reader is None else _NoSeekEnd(reader)

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        return [] if await self.has(digest) else None


class _NoSeekEnd(BlobReader):
    def __init__(self, inner: BlobReader) -> None:
        self.inner = inner

    async def read(self, n: int = -1) -> bytes:
        return await self.inner.read(n)

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            raise ValueError("unsupported whence")
        return await self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()


@pytest.mark.parametrize("blobs_kind", [MemoryBlobService, _UnsizedBlobs])
@pytest.mark.parametrize("real_size", [3000, 5000])
async def test_range_refuses_a_blob_of_another_size_as_the_full_get(
    blobs_kind: type[MemoryBlobService], real_size: int
) -> None:
    # A node claiming 4000 bytes of a blob that has 3000 or 5000: the full
    # render refuses the NAR, and so must every range touching that file.
    blobs, dirs = blobs_kind(), MemoryDirectoryService()
    async with blobs.open_write() as w:
        await w.write(b"x" * real_size)
    liar = FileNode(b"liar", await w.close(), 4000)
    directory = Directory(files=[liar])
    async with dirs.put_multiple_start() as putter:
        await putter.put(directory)
    layout = await NarLayout.load(dirs, DirectoryNode(b"r", directory.digest, directory.size))
    assert layout is not None
    with pytest.raises(IntegrityError):
        await _collect(render_full(blobs, layout))
    # The contents end before the closing ")" of file, entry and directory.
    start = layout.size - 3 * 16 - 4000 + 100  # inside the file's contents
    for lo, hi in ((start, start + 10), (start + 10, start + 3990), (0, layout.size)):
        with pytest.raises(IntegrityError):
            await _collect(render_range(blobs, layout, lo, hi))
