"""Copying closures: ``tvix-store copy`` from binary caches and reference graphs, and the library.

The real Nix wrote the caches and the reference graph and judges the result
(``nix-store --dump`` of each path equals what the store renders).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.daemons import tvix_store
from tests.support.fixtures import Closure
from tests.support.nix import Nix
from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import IntegrityError
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.cli.common import local_store_urls
from tvix.nixcompat.signing import VerifyingKey
from tvix.nixcompat.storepath import StorePath
from tvix.store.composition import Composition
from tvix.store.copy import (
    BinaryCacheSource,
    StoreSource,
    copy_closure,
    leaves_first,
)
from tvix.store.errors import NotFoundError, UntrustedPathInfoError
from tvix.store.nar import render_nar
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.reference_graph import parse_reference_graph

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _sp(path: str) -> StorePath:
    return StorePath.from_absolute_path(path)


async def _assert_store_has_closure(
    closure: Closure, data_dir: Path, with_flat: bool = True, deriver: bool = True
) -> None:
    """Every path renders to the NAR Nix dumps; the metadata is Nix's (checked in-process)."""
    paths = closure.paths if with_flat else [closure.tree, closure.text, closure.built]
    async with Composition.from_urls(*local_store_urls(data_dir)) as composition:
        blobs, dirs, infos = composition.build_all()
        for path in paths:
            info = await infos.get(_sp(path).digest)
            assert info is not None, path
            nar = b"".join([p async for p in render_nar(blobs, dirs, info.node)])
            assert nar == closure.nix.dump(closure.nix.store_file(path)), path
            want = closure.nix.path_info_json(path)
            assert sorted(r.absolute_path for r in info.references) == sorted(want["references"])
            if deriver and "deriver" in want:
                assert info.deriver is not None
                assert info.deriver.absolute_path == want["deriver"]


async def test_copy_from_http_cache(closure: Closure, tmp_path: Path) -> None:
    data = tmp_path / "data"
    keys = closure.public
    proc = tvix_store(
        "copy", "--from", closure.cache_url("xz"), "--trusted-public-keys", keys,
        closure.built, closure.flat, "--data-dir", data,
    )  # fmt: skip
    assert "copied 4 store paths" in proc.stderr.decode()
    await _assert_store_has_closure(closure, data)
    assert (
        closure.public.split(":")[0] + ":"
        in tvix_store("path-info", closure.built, "--data-dir", data).stdout.decode()
    )
    # Everything is there: nothing is fetched again.
    again = tvix_store(
        "copy", "--from", closure.cache_url("xz"), "--trusted-public-keys", keys,
        closure.built, "--data-dir", data,
    )  # fmt: skip
    assert "copied 0 store paths" in again.stderr.decode()
    assert "3 already present" in again.stderr.decode()


async def test_copy_checks_signatures(closure: Closure, tmp_path: Path) -> None:
    data = tmp_path / "data"
    url = f"file://{closure.caches['zstd']}"
    proc = tvix_store("copy", "--from", url, closure.built, "--data-dir", data, check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert closure.built in err
    assert "no valid signature" in err or "no signature" in err
    # Nothing of the refused path was registered.
    assert tvix_store("path-info", closure.built, "--data-dir", data, check=False).returncode == 1
    # Content-addressed paths need no signature (as in Nix).
    tvix_store("copy", "--from", url, closure.text, "--data-dir", data)
    tvix_store("copy", "--from", url, "--no-check-sigs", closure.built, "--data-dir", data)
    await _assert_store_has_closure(closure, data, with_flat=False)


def test_copy_usage_errors(closure: Closure, tmp_path: Path) -> None:
    # Options that do not go together exit 2 (as argparse's own errors); bad values 1.
    cases = [
        (["copy", closure.built], "exactly one of", 2),
        (["copy", "--from", "ftp://x", closure.built], "expected a binary cache", 1),
        (["copy", "--from", closure.cache_url("none")], "no STOREPATH", 2),
        (["copy", "--from", closure.cache_url("none"), closure.built + "/sub"], "inside", 2),
        (
            [
                "copy",
                "--from",
                closure.cache_url("none"),
                "--trusted-public-keys",
                "x",
                closure.built,
            ],
            "trusted-public-keys",
            1,
        ),
        (["copy", "--reference-graph", "/nonexistent", closure.built], "no STOREPATHs", 2),
    ]
    for args, message, code in cases:
        proc = tvix_store(*args, "--data-dir", tmp_path, check=False)
        assert proc.returncode == code, args
        assert message in proc.stderr.decode(), (args, proc.stderr)
    missing = "/nix/store/" + "0" * 32 + "-missing"
    proc = tvix_store(
        "copy", "--from", closure.cache_url("none"), missing, "--data-dir", tmp_path, check=False
    )
    assert proc.returncode == 1
    assert "is not in the binary cache" in proc.stderr.decode()


async def test_copy_reference_graph(closure: Closure, tmp_path: Path) -> None:
    data = tmp_path / "data"
    entries = parse_reference_graph(closure.reference_graph.read_bytes())
    assert {e.path.absolute_path for e in entries} == {closure.tree, closure.text, closure.built}
    proc = tvix_store(
        "copy", "--reference-graph", closure.reference_graph,
        "--store-root", closure.nix.store_root, "--data-dir", data,
    )  # fmt: skip
    assert "copied 3 store paths" in proc.stderr.decode()
    # (exportReferencesGraph does not list derivers)
    await _assert_store_has_closure(closure, data, with_flat=False, deriver=False)
    # Input-addressed paths keep their store path; content-addressed keep their CA.
    tree = json.loads(tvix_store("path-info", "--json", closure.tree, "--data-dir", data).stdout)
    assert tree[0]["ca"].startswith("fixed:r:sha256:")
    again = tvix_store(
        "copy", "--reference-graph", closure.reference_graph,
        "--store-root", closure.nix.store_root, "--data-dir", data,
    )  # fmt: skip
    assert "3 already present" in again.stderr.decode()


def test_copy_reference_graph_wrong_hash(closure: Closure, tmp_path: Path) -> None:
    doc = json.loads(closure.reference_graph.read_bytes())
    for item in doc["closure"]:
        if item["path"] == closure.tree:
            item["narSize"] += 8
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    data = tmp_path / "data"
    proc = tvix_store(
        "copy", "--reference-graph", bad, "--store-root", closure.nix.store_root,
        "--data-dir", data, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "the reference graph says" in proc.stderr.decode()
    # The tree was refused, and whatever refers to it was not registered either.
    for path in (closure.tree, closure.built):
        assert tvix_store("path-info", path, "--data-dir", data, check=False).returncode == 1


# -- the library -------------------------------------------------------------------------------


class _Recording(MemoryPathInfoService):
    """Remembers the order of puts."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list[StorePath] = []

    async def put(self, info: PathInfo) -> PathInfo:
        for ref in info.references:
            assert ref == info.store_path or ref in self.order, "reference put later"
        self.order.append(info.store_path)
        return await super().put(info)


async def _from_cache(
    closure: Closure,
) -> tuple[MemoryBlobService, MemoryDirectoryService, _Recording]:
    blobs, dirs, infos = MemoryBlobService(), MemoryDirectoryService(), _Recording()
    source = BinaryCacheSource(
        closure.cache_url("bzip2"),
        blobs,
        dirs,
        trusted_keys=[VerifyingKey.parse(closure.public)],
    )
    try:
        result = await copy_closure(source, infos, [_sp(closure.built)], jobs=2)
    finally:
        await source.close()
    assert {i.store_path for i in result.copied} == {
        _sp(p) for p in (closure.tree, closure.text, closure.built)
    }
    return blobs, dirs, infos


async def test_dependencies_registered_first(closure: Closure) -> None:
    _blobs, _dirs, infos = await _from_cache(closure)
    assert infos.order[-1] == _sp(closure.built)


class _Observer:
    """Records what a copy tells its observer, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.moved_bytes = 0

    def discovered(self, path: StorePath) -> None:
        self.events.append("discovered")

    def closure_known(self) -> None:
        self.events.append("closure_known")

    def moved(self, nbytes: int) -> None:
        self.moved_bytes += nbytes

    def done(self, info: PathInfo, copied: bool) -> None:
        self.events.append("done")


async def _blob_bytes(dirs: MemoryDirectoryService, infos: list[PathInfo]) -> int:
    """The bytes of the distinct blobs the paths' files hold."""
    sizes: dict[object, int] = {}
    for info in infos:
        if isinstance(info.node, FileNode):
            sizes[info.node.digest] = info.node.size
        elif isinstance(info.node, DirectoryNode):
            async for d in dirs.get_recursive(info.node.digest):
                sizes.update((f.digest, f.size) for f in d.files)
    return sum(sizes.values())


async def test_copy_between_stores(closure: Closure) -> None:
    blobs, dirs, infos = await _from_cache(closure)
    dest = MemoryBlobService(), MemoryDirectoryService(), _Recording()
    key = VerifyingKey.parse(closure.public)
    observer = _Observer()
    source = StoreSource(
        blobs, dirs, infos, dest[0], dest[1], trusted_keys=[key], progress=observer.moved
    )
    result = await copy_closure(source, dest[2], [_sp(closure.built)], observer=observer)
    assert len(result.copied) == 3
    # Every byte of every blob copied was counted as it streamed; the closure was
    # known (all 3 discovered) before the last path was done.
    assert observer.moved_bytes == await _blob_bytes(dest[1], result.copied)
    assert observer.moved_bytes > 0
    assert observer.events.count("closure_known") == 1
    known_at = observer.events.index("closure_known")
    assert observer.events[:known_at].count("discovered") == 3
    assert observer.events[-1] == "done"
    for path in (closure.tree, closure.text, closure.built):
        info = await dest[2].get(_sp(path).digest)
        assert info is not None
        nar = b"".join([p async for p in render_nar(dest[0], dest[1], info.node)])
        assert nar == closure.nix.dump(closure.nix.store_file(path))
    # Without a trusted key, the input-addressed path is refused.
    source = StoreSource(
        blobs, dirs, infos, MemoryBlobService(), MemoryDirectoryService(), trusted_keys=[]
    )
    with pytest.raises(UntrustedPathInfoError):
        await copy_closure(source, MemoryPathInfoService(), [_sp(closure.built)])
    with pytest.raises(NotFoundError):
        await copy_closure(source, MemoryPathInfoService(), [StorePath(b"\x07" * 20, "nope")])


async def test_store_source_checks_the_root_node(closure: Closure) -> None:
    # A validly signed PathInfo whose root node points at other content: the
    # signature covers the NAR hash, so the copy must compare the content with it.
    blobs, dirs, infos = await _from_cache(closure)
    built = await infos.get(_sp(closure.built).digest)
    text = await infos.get(_sp(closure.text).digest)
    assert built is not None
    assert text is not None
    swapped = PathInfo(
        built.store_path,
        text.node.renamed(built.store_path.base_name.encode()),
        built.nar_size,
        built.nar_sha256,
        built.references,
        built.signatures,
        built.deriver,
    )
    await infos.put(swapped)
    dest = MemoryBlobService(), MemoryDirectoryService(), MemoryPathInfoService()
    source = StoreSource(
        blobs, dirs, infos, dest[0], dest[1], trusted_keys=[VerifyingKey.parse(closure.public)]
    )
    with pytest.raises(IntegrityError, match="not the NAR"):
        await copy_closure(source, dest[2], [_sp(closure.built)])
    assert await dest[2].get(_sp(closure.built).digest) is None


def test_leaves_first_with_shared_subtrees() -> None:
    from tvix.castore.directory import Directory
    from tvix.castore.nodes import DirectoryNode

    x = Directory()
    a = Directory(directories=[DirectoryNode(b"x", x.digest, x.size)])
    root = Directory(
        directories=[
            DirectoryNode(b"a", a.digest, a.size),
            DirectoryNode(b"b", x.digest, x.size),
        ]
    )
    tree = {d.digest: d for d in (root, a, x)}
    order = leaves_first(tree, root.digest)
    assert order.index(x) < order.index(a) < order.index(root)
    assert len(order) == 3


def test_copy_from_a_local_nix_store(nix: Nix, tmp_path: Path) -> None:
    """``--from local?root=DIR``: the store's database says what, its disk has the contents."""
    tree = make_tree(tmp_path / "tree")
    base = nix.add(tree)
    text = nix.add_text("refers", f"see {base}\n", references=[base])
    data = tmp_path / "data"
    tvix_store("copy", "--from", nix.store, text, "--data-dir", data)
    for path in (base, text):
        got = json.loads(tvix_store("path-info", "--json", path, "--data-dir", data).stdout)[0]
        want = nix.path_info_json(path)
        assert (got["narHash"], got["narSize"]) == (want["narHash"], want["narSize"])
        assert got["references"] == sorted(want["references"])
        dumped = tvix_store("dump-path", path, "--data-dir", data).stdout
        assert dumped == nix.dump(nix.store_file(path))
    # The closure as `nix path-info --json -r` prints it is a reference graph too.
    graph = tmp_path / "graph.json"
    graph.write_bytes(
        nix.run("nix", "path-info", "--store", nix.store, "--json", "-r", text).stdout
    )
    other = tmp_path / "other"
    tvix_store(
        "copy", "--reference-graph", graph, "--store-root", nix.store_root, "--data-dir", other
    )
    assert tvix_store("dump-path", text, "--data-dir", other).stdout == nix.dump(
        nix.store_file(text)
    )
    proc = tvix_store(
        "copy", "--from", nix.store, "/nix/store/" + "0" * 32 + "-x", "--data-dir", data,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "is not in the Nix store at" in proc.stderr.decode()
