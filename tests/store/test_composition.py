"""Composition files: valid ones build what they say, invalid ones are rejected by name."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tvix.castore import blobservice
from tvix.castore.blobservice import BlobService, MemoryBlobService, read_all, write_all
from tvix.castore.blobservice.cache import CacheBlobService, CacheConfig
from tvix.castore.blobservice.objectstore import ObjectStoreBlobService
from tvix.castore.composition import EmptyConfig, Registry, ServiceConfig
from tvix.castore.directoryservice import MemoryDirectoryService, SQLiteDirectoryService
from tvix.castore.directoryservice.cache import CacheDirectoryService
from tvix.castore.errors import ValidationError
from tvix.castore.race import RaceConfig
from tvix.castore.testing.fixtures import BLOB_B, BLOB_B_DIGEST, DIRECTORY_WITH_KEEP
from tvix.nixcompat.signing import SigningKey
from tvix.store import pathinfoservice
from tvix.store.composition import KINDS, BuildContext, Composition, CompositionError
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.pathinfoservice.cache import CachePathInfoService
from tvix.store.pathinfoservice.lru import LRUPathInfoService
from tvix.store.pathinfoservice.signing import SigningPathInfoService
from tvix.store.pathinfoservice.sqlite import SQLitePathInfoService
from tvix.store.testing.fixtures import path_info

KEY = SigningKey.generate("composed-1")


def _write(tmp_path: Path, text: str, name: str = "store.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# -- valid compositions ----------------------------------------------------------------------

ALL_MEMORY = """
[blobservices.default]
type = "memory"
[directoryservices.default]
type = "memory"
[pathinfoservices.default]
type = "memory"
"""

URLS = """
[blobservices.default]
type = "url"
url = "objectstore+memory://?zstd=false"
[directoryservices.default]
type = "url"
url = "sqlite://"
[pathinfoservices.default]
type = "url"
url = "lru://?capacity=7"
"""

# Caches of embedded stores, relative paths next to the file, a signing PathInfo service.
CACHED_LOCAL = """
[blobservices.default]
type = "cache"
near = "mem"
far = "disk"
[blobservices.mem]
type = "memory"
[blobservices.disk]
type = "objectstore"
url = "objectstore+file://{tmp}/blobs"

[directoryservices.default]
type = "cache"
near = "mem"
far = "db"
[directoryservices.mem]
type = "memory"
[directoryservices.db]
type = "sqlite"
path = "data/directories.sqlite"

[pathinfoservices.default]
type = "signing"
inner = "cached"
key_file = "secret.key"
[pathinfoservices.cached]
type = "cache"
near = "recent"
far = "db"
[pathinfoservices.recent]
type = "lru"
capacity = 100
[pathinfoservices.db]
type = "sqlite"
path = "{tmp}/pathinfo.sqlite"
"""


@pytest.mark.parametrize(
    ("text", "types"),
    [
        (ALL_MEMORY, (MemoryBlobService, MemoryDirectoryService, MemoryPathInfoService)),
        (URLS, (ObjectStoreBlobService, SQLiteDirectoryService, LRUPathInfoService)),
        (CACHED_LOCAL, (CacheBlobService, CacheDirectoryService, SigningPathInfoService)),
    ],
    ids=["memory", "urls", "cached-local"],
)
async def test_valid(tmp_path: Path, text: str, types: tuple[type, ...]) -> None:
    (tmp_path / "secret.key").write_text(str(KEY) + "\n")
    path = _write(tmp_path, text.replace("{tmp}", str(tmp_path)))
    async with Composition.from_file(path) as composition:
        services = composition.build_all()
        assert tuple(type(s) for s in services) == types
        assert composition.build_all() == services, "built once"
        blobs, directories, infos = services
        assert await write_all(blobs, BLOB_B) == BLOB_B_DIGEST
        assert await directories.put(DIRECTORY_WITH_KEEP) == DIRECTORY_WITH_KEEP.digest
        await infos.put(path_info(1))
        assert await infos.get(path_info(1).store_path.digest) is not None


async def test_cached_local_wiring_and_persistence(tmp_path: Path) -> None:
    (tmp_path / "secret.key").write_text(str(KEY))
    text = CACHED_LOCAL.replace("{tmp}", str(tmp_path))
    # Loaded from elsewhere: relative paths follow the file, not the working directory.
    path = _write(tmp_path, text)
    async with Composition.from_file(path) as composition:
        blobs, directories, infos = composition.build_all()
        assert isinstance(directories, CacheDirectoryService)
        assert isinstance(directories.far, SQLiteDirectoryService)
        assert isinstance(infos, SigningPathInfoService)
        assert isinstance(infos.inner, CachePathInfoService)
        assert isinstance(infos.inner.near, LRUPathInfoService)
        assert composition.path_info_service("cached") is infos.inner
        await write_all(blobs, BLOB_B)
        await directories.put(DIRECTORY_WITH_KEEP)
        stored = await infos.put(path_info(2))
        assert stored.verify([KEY.to_public()])
    assert (tmp_path / "data" / "directories.sqlite").is_file()
    assert (tmp_path / "pathinfo.sqlite").is_file()

    # A new composition from the same file: near is empty, far has everything.
    async with Composition.from_file(path) as composition:
        blobs, directories, infos = composition.build_all()
        assert isinstance(blobs, CacheBlobService)
        assert not await blobs.near.has(BLOB_B_DIGEST)
        assert await read_all(blobs, BLOB_B_DIGEST) == BLOB_B
        assert await blobs.near.has(BLOB_B_DIGEST)
        assert await directories.get(DIRECTORY_WITH_KEEP.digest) == DIRECTORY_WITH_KEEP
        got = await infos.get(path_info(2).store_path.digest)
        assert got is not None
        assert got.verify([KEY.to_public()])


@contextmanager
def _registered(registry: Registry, name: str, config: type[ServiceConfig]) -> Iterator[None]:
    registry.register(name, config)
    try:
        yield
    finally:
        registry.unregister(name)


async def test_shared_service_built_once_and_closed_once() -> None:
    closed: list[str] = []

    class Recording(MemoryBlobService):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        async def close(self) -> None:
            closed.append(self.name)

    class RecordingCache(CacheBlobService):
        def __init__(self, name: str, near: BlobService, far: BlobService) -> None:
            super().__init__(near, far)
            self.name = name

        async def close(self) -> None:
            closed.append(self.name)

    @dataclass(frozen=True)
    class RecordingConfig(EmptyConfig):
        def build(self, ctx: BuildContext) -> BlobService:
            return Recording(ctx.name)

    @dataclass(frozen=True)
    class RecordingCacheConfig(CacheConfig):
        def build(self, ctx: BuildContext) -> BlobService:
            return RecordingCache(ctx.name, ctx.service(self.near), ctx.service(self.far))

    with (
        _registered(blobservice.registry, "recording", RecordingConfig),
        _registered(blobservice.registry, "recording-cache", RecordingCacheConfig),
    ):
        composition = Composition.from_dict(
            {
                "blobservices": {
                    "default": {"type": "recording-cache", "near": "n1", "far": "shared"},
                    "other": {"type": "recording-cache", "near": "n2", "far": "shared"},
                    "shared": {"type": "recording"},
                    "n1": {"type": "recording"},
                    "n2": {"type": "recording"},
                }
            }
        )
        default = composition.blob_service()
        other = composition.blob_service("other")
    assert isinstance(default, CacheBlobService)
    assert isinstance(other, CacheBlobService)
    assert default.far is other.far
    await composition.close()
    assert sorted(closed) == ["default", "n1", "n2", "other", "shared"]
    # Dependents first: each cache before what it wraps.
    assert closed.index("default") < closed.index("n1")
    assert closed.index("other") < closed.index("shared")
    assert closed.index("default") < closed.index("shared")
    await composition.close()
    assert len(closed) == 5, "close is idempotent"


def test_extension_types_with_name_lists_and_other_kinds() -> None:
    """What later types need: a list of names (race) and the default blob service (nix)."""
    seen: dict[str, Any] = {}

    @dataclass(frozen=True)
    class ListConfig(RaceConfig):
        def build(self, ctx: BuildContext) -> BlobService:
            seen["sources"] = self.source_services(ctx)
            return MemoryBlobService()

    @dataclass(frozen=True)
    class IngestingConfig(EmptyConfig):
        def build(self, ctx: BuildContext) -> MemoryPathInfoService:
            seen["blobs"] = ctx.blob_service()
            seen["directories"] = ctx.directory_service()
            return MemoryPathInfoService()

    with (
        _registered(blobservice.registry, "list", ListConfig),
        _registered(pathinfoservice.registry, "ingesting", IngestingConfig),
    ):
        composition = Composition.from_toml(
            """
            [blobservices.default]
            type = "list"
            sources = ["a", "b"]
            [blobservices.a]
            type = "memory"
            [blobservices.b]
            type = "memory"
            [directoryservices.default]
            type = "memory"
            [pathinfoservices.default]
            type = "ingesting"
            """.replace("\n            ", "\n")
        )
        infos = composition.path_info_service()
        assert isinstance(infos, MemoryPathInfoService)
        assert seen["sources"] == [composition.blob_service("a"), composition.blob_service("b")]
        assert seen["blobs"] is composition.blob_service()
        assert seen["directories"] is composition.directory_service()

        with pytest.raises(CompositionError, match=r"blobservices\.default: sources refers to 'c'"):
            Composition.from_dict(
                {
                    "blobservices": {
                        "default": {"type": "list", "sources": ["a", "c"]},
                        "a": {"type": "memory"},
                    }
                }
            )
        with pytest.raises(
            CompositionError, match=r"^cycle: blobservices\.a -> blobservices\.default -> "
        ):
            Composition.from_dict(
                {
                    "blobservices": {
                        "default": {"type": "list", "sources": ["x", "a"]},
                        "a": {"type": "cache", "near": "x", "far": "default"},
                        "x": {"type": "memory"},
                    }
                }
            )


async def test_from_urls() -> None:
    composition = Composition.from_urls("memory://", "sqlite://", "lru://?capacity=3")
    blobs, directories, infos = composition.build_all()
    assert isinstance(blobs, MemoryBlobService)
    assert isinstance(directories, SQLiteDirectoryService)
    assert isinstance(infos, LRUPathInfoService)
    await composition.close()
    with pytest.raises(CompositionError, match=r"^blobservices\.default: .*unknown scheme"):
        Composition.from_urls("nope://", "memory://", "memory://").build_all()


def test_relative_paths_against_base_dir(tmp_path: Path) -> None:
    composition = Composition.from_toml(
        '[pathinfoservices.default]\ntype = "sqlite"\npath = "sub/p.sqlite"\n',
        base_dir=tmp_path,
    )
    infos = composition.path_info_service()
    assert isinstance(infos, SQLitePathInfoService)
    assert (tmp_path / "sub").is_dir()


# -- invalid compositions, found when loading ------------------------------------------------

INVALID = [
    ("unknown-section", '[foo.default]\ntype = "memory"', r"unknown section\(s\) 'foo'"),
    ("section-not-table", "blobservices = 3", r"^blobservices: must be a table, not integer"),
    (
        "service-not-table",
        '[blobservices]\ndefault = "memory"',
        r"^blobservices\.default: must be a table, not string",
    ),
    ("missing-type", "[blobservices.default]\nurl = 'memory://'", "missing key 'type'"),
    ("type-not-string", "[blobservices.default]\ntype = 1", "key 'type' must be a string"),
    (
        "unknown-type",
        '[blobservices.default]\ntype = "lru"\ncapacity = 3',
        r"^blobservices\.default: unknown type 'lru' \(known: cache, grpc, memory, objectstore, "
        r"packs, packs_s3, race, url\)",
    ),
    (
        "sqlite-blobs",
        '[blobservices.default]\ntype = "sqlite"\npath = "x"',
        r"blobservices\.default: unknown type 'sqlite'",
    ),
    (
        "unknown-key",
        '[blobservices.default]\ntype = "memory"\nfoo = 1',
        r"^blobservices\.default: unknown key 'foo' for type 'memory' \(allowed: none\)",
    ),
    (
        "unknown-key-lists-allowed",
        '[pathinfoservices.x]\ntype = "lru"\ncapacity = 1\nsize = 2',
        r"^pathinfoservices\.x: unknown key 'size' for type 'lru' \(allowed: capacity\)",
    ),
    (
        "missing-key",
        '[directoryservices.default]\ntype = "url"',
        r"^directoryservices\.default: missing key 'url' for type 'url'",
    ),
    (
        "missing-ref",
        '[blobservices.default]\ntype = "cache"\nnear = "a"\n[blobservices.a]\ntype = "memory"',
        r"^blobservices\.default: missing key 'far'",
    ),
    (
        "int-as-string",
        '[pathinfoservices.default]\ntype = "lru"\ncapacity = "10"',
        r"^pathinfoservices\.default: key 'capacity' must be an integer, not string",
    ),
    (
        "bool-as-int",
        '[pathinfoservices.default]\ntype = "lru"\ncapacity = true',
        r"key 'capacity' must be an integer, not boolean",
    ),
    (
        "url-not-string",
        '[blobservices.default]\ntype = "url"\nurl = 5',
        r"^blobservices\.default: key 'url' must be a string, not integer",
    ),
    (
        "ref-not-string",
        '[blobservices.default]\ntype = "cache"\nnear = ["a"]\nfar = "a"',
        r"key 'near' must be a string \(a service name\), not array",
    ),
    (
        "empty-path",
        '[directoryservices.default]\ntype = "sqlite"\npath = ""',
        r"key 'path' must not be empty",
    ),
    (
        "dangling",
        '[blobservices.default]\ntype = "cache"\nnear = "a"\nfar = "nope"\n'
        '[blobservices.a]\ntype = "memory"',
        r"^blobservices\.default: far refers to 'nope', which is not defined in \[blobservices\]",
    ),
    (
        "cross-kind-name",
        '[blobservices.default]\ntype = "cache"\nnear = "a"\nfar = "b"\n'
        '[blobservices.a]\ntype = "memory"\n[directoryservices.b]\ntype = "memory"',
        r"far refers to 'b', which is not defined in \[blobservices\] \(defined: a, default\)",
    ),
    (
        "cycle",
        '[blobservices.a]\ntype = "cache"\nnear = "m"\nfar = "b"\n'
        '[blobservices.b]\ntype = "cache"\nnear = "m"\nfar = "a"\n'
        '[blobservices.m]\ntype = "memory"',
        r"^cycle: blobservices\.a -> blobservices\.b -> blobservices\.a$",
    ),
    (
        "self-cycle",
        '[pathinfoservices.default]\ntype = "signing"\ninner = "default"\nkey_file = "/k"',
        r"^cycle: pathinfoservices\.default -> pathinfoservices\.default$",
    ),
    ("invalid-toml", "[blobservices.default\n", r"^invalid TOML"),
]


@pytest.mark.parametrize(
    ("text", "message"), [(t, m) for _, t, m in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_invalid(text: str, message: str) -> None:
    with pytest.raises(CompositionError, match=message):
        Composition.from_toml(text)


def test_invalid_file_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[blobservices.default]\ntype = "memory"\nfoo = 1\n')
    with pytest.raises(CompositionError, match=rf"^{path}: blobservices\.default: unknown key"):
        Composition.from_file(path)


def test_composition_error_is_a_validation_error() -> None:
    assert issubclass(CompositionError, ValidationError)


# -- invalid compositions, found when building -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[blobservices.default]\ntype = "url"\nurl = "memory://?x=1"',
            r"^blobservices\.default: invalid service URL 'memory://\?x=1': unknown option",
        ),
        (
            '[blobservices.default]\ntype = "objectstore"\nurl = "memory://"',
            r"^blobservices\.default: type 'objectstore' needs a URL starting with 'objectstore\+'",
        ),
        (
            '[directoryservices.default]\ntype = "grpc"\nurl = "sqlite://"',
            r"^directoryservices\.default: type 'grpc' needs a URL starting with 'grpc\+'",
        ),
        (
            '[pathinfoservices.default]\ntype = "lru"\ncapacity = 0',
            r"^pathinfoservices\.default: LRU capacity must be a positive integer",
        ),
        (
            '[pathinfoservices.default]\ntype = "signing"\ninner = "m"\nkey_file = "absent.key"\n'
            '[pathinfoservices.m]\ntype = "memory"',
            r"^pathinfoservices\.default: cannot use key_file .*absent\.key",
        ),
        (
            '[pathinfoservices.default]\ntype = "signing"\ninner = "m"\nkey_file = "bad.key"\n'
            '[pathinfoservices.m]\ntype = "memory"',
            r"^pathinfoservices\.default: cannot use key_file .*bad\.key: .*name:base64",
        ),
        (
            '[pathinfoservices.default]\ntype = "cache"\nnear = "m"\nfar = "bad"\n'
            '[pathinfoservices.m]\ntype = "memory"\n'
            '[pathinfoservices.bad]\ntype = "url"\nurl = "lru://"',
            r"^pathinfoservices\.bad: .*capacity is required",
        ),
    ],
)
def test_invalid_when_built(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.key").write_text("not a key\n")
    composition = Composition.from_toml(text, base_dir=tmp_path)
    (kind,) = (k for k in KINDS if composition.names(k))
    with pytest.raises(CompositionError, match=message):
        composition.build(kind)


def test_default_missing() -> None:
    composition = Composition.from_toml('[blobservices.other]\ntype = "memory"')
    with pytest.raises(CompositionError, match=r"^blobservices\.default: not defined"):
        composition.blob_service()
    with pytest.raises(CompositionError, match=r"^directoryservices\.default: not defined"):
        composition.directory_service()
    assert composition.names("blobservices") == ["other"]


def test_module_docs_example_is_valid() -> None:
    import tvix.store.composition as module

    doc = module.__doc__
    assert doc is not None
    example = doc[doc.index("    # A local cache") : doc.index("Types (see")]
    composition = Composition.from_toml(textwrap.dedent(example))
    assert composition.names("pathinfoservices") == ["cached", "db", "default", "recent"]


# -- one config per backend: a URL's options are keys of its table ---------------------------


async def test_url_options_as_keys(tmp_path: Path) -> None:
    """``objectstore`` takes its URL's options as keys: the same service either way."""
    by_keys = Composition.from_toml(
        f'[blobservices.default]\ntype = "objectstore"\nurl = "objectstore+file://{tmp_path}/a"\n'
        "zstd = false\navg_chunk_size = 65536\n"
    )
    by_url = Composition.from_toml(
        '[blobservices.default]\ntype = "url"\n'
        f'url = "objectstore+file://{tmp_path}/b?zstd=false&avg_chunk_size=65536"\n'
    )
    compressible = b"tvix " * 100_000
    for composition, where in ((by_keys, "a"), (by_url, "b")):
        async with composition:
            blobs = composition.blob_service()
            assert isinstance(blobs, ObjectStoreBlobService)
            digest = await write_all(blobs, compressible)
            chunks = await blobs.chunks(digest)
            assert chunks is not None
            assert len(chunks) >= 3, "64 KiB chunks (at most 128 KiB), not the default 256 KiB"
        # zstd = false: the chunks are stored as they are, not compressed.
        stored = sum(
            p.stat().st_size for p in (tmp_path / where / "chunks").rglob("*") if p.is_file()
        )
        assert stored >= len(compressible)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            'type = "objectstore"\nurl = "objectstore+memory://?zstd=true"\nzstd = false',
            r"^blobservices\.default: invalid service URL .*option\(s\) zstd given both",
        ),
        (
            'type = "objectstore"\nurl = "objectstore+memory://"\navg_chunk_size = 10',
            r"^blobservices\.default: invalid service URL .*avg_chunk_size must be within",
        ),
        (
            'type = "objectstore"\nurl = "objectstore+memory://"\nendpoint = "http://x"',
            r"^blobservices\.default: invalid service URL .*unknown option\(s\) endpoint",
        ),
    ],
    ids=["twice", "out-of-range", "option-of-another-flavour"],
)
def test_url_options_as_keys_checked_when_built(table: str, message: str) -> None:
    composition = Composition.from_toml(f"[blobservices.default]\n{table}\n")
    with pytest.raises(CompositionError, match=message):
        composition.blob_service()


def test_url_option_keys_are_typed_and_listed() -> None:
    with pytest.raises(CompositionError, match=r"key 'zstd' must be a boolean, not string"):
        Composition.from_toml(
            '[blobservices.default]\ntype = "objectstore"\nurl = "objectstore+memory://"\n'
            'zstd = "no"\n'
        )
    with pytest.raises(
        CompositionError,
        match=r"unknown key 'zstandard' for type 'objectstore' \(allowed: allow_http, "
        r"avg_chunk_size, endpoint, region, url, zstd\)",
    ):
        Composition.from_toml(
            '[blobservices.default]\ntype = "objectstore"\nurl = "objectstore+memory://"\n'
            "zstandard = false\n"
        )


def test_one_registry_per_kind_serves_urls_and_types() -> None:
    """Every URL scheme belongs to a composition type of the same registry."""
    for kind, registry in Composition.REGISTRIES.items():
        assert registry.kind == kind
        for scheme in registry.schemes:
            assert scheme in registry.type_schemes(registry.type_for_scheme(scheme)), scheme
        assert {"memory", "grpc", "cache", "race"} <= set(registry.types), kind
    assert Composition.REGISTRIES["pathinfoservices"].types == [
        "cache",
        "grpc",
        "lru",
        "memory",
        "nix",
        "postgresql",
        "race",
        "signing",
        "sqlite",
        "trusted",
    ]
