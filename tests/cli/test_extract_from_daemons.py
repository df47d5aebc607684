"""Stores talking to stores: two daemons holding halves of a closure and a slow third
source, raced by ``extract --closure`` with signature checks, in separate processes."""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.support.daemons import (
    EXTRACT,
    Memory,
    cli_env,
    daemon,
    diff,
    fake_store_path,
    relocated,
    serve,
    tvix_store,
)
from tests.support.trees import make_tree
from tvix.nixcompat.signing import SigningKey
from tvix.nixcompat.storepath import StorePath
from tvix.store import pathinfoservice
from tvix.store.importer import import_path
from tvix.store.pathinfo import PathInfo

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

KEY = SigningKey.generate("cache.test-1")
STRANGER = SigningKey.generate("stranger.test-1")


def _composition(path: Path, urls: dict[str, str]) -> Path:
    """A race over the named gRPC sources, for all three kinds."""
    lines = []
    for kind in ("blobservices", "directoryservices", "pathinfoservices"):
        names = ", ".join(f'"{n}"' for n in urls)
        lines += [f"[{kind}.default]", 'type = "race"', f"sources = [{names}]"]
        for name, url in urls.items():
            lines += [f"[{kind}.{name}]", 'type = "grpc"', f'url = "{url}"']
    path.write_text("\n".join(lines) + "\n")
    return path


async def _extract(*args: str | Path) -> tuple[int, str, str, float]:
    """Run the command without blocking this loop (it serves the slow source)."""
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *EXTRACT,
        *map(str, args),
        env=cli_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode(), time.monotonic() - start


async def _put(url: str, info: PathInfo) -> None:
    client = pathinfoservice.from_url(url)
    await client.put(info)
    await client.close()


async def _imported(url: str, tree: Path) -> PathInfo:
    store_path = tvix_store("import", tree, env=cli_env(url)).stdout.decode().strip()
    client = pathinfoservice.from_url(url)
    info = await client.get(StorePath.from_absolute_path(store_path).digest)
    await client.close()
    assert info is not None
    return info


async def test_closure_from_two_daemons_and_a_slow_source(tmp_path: Path) -> None:
    tree_a = make_tree(tmp_path / "a", big_size=(2 << 20) + 5)
    tree_b = tmp_path / "b"
    (tree_b / "lib").mkdir(parents=True)
    (tree_b / "lib" / "libdep.so").write_bytes(b"\x7fELF" + bytes(5000))
    top, dep = fake_store_path("top"), fake_store_path("dep")
    trusted = str(KEY.to_public())
    with ExitStack() as stack:
        _, url1 = stack.enter_context(
            daemon(f"unix://{tmp_path}/d1.sock", data_dir=tmp_path / "d1")
        )
        _, url2 = stack.enter_context(
            daemon(f"unix://{tmp_path}/d2.sock", data_dir=tmp_path / "d2")
        )
        # Each daemon holds half of the closure: top (tree a) refers to dep (tree b).
        info_a, info_b = await _imported(url1, tree_a), await _imported(url2, tree_b)
        info_top = relocated(info_a, top, (dep,)).with_signature(KEY)
        info_dep = relocated(info_b, dep).with_signature(KEY)
        await _put(url1, info_top)
        await _put(url2, info_dep)
        # The slow source holds everything, and never answers a read.
        slow_store = Memory()
        for tree, info in ((tree_a, info_top), (tree_b, info_dep)):
            await import_path(slow_store.blobs, slow_store.dirs, slow_store.infos, tree)
            await slow_store.infos.put(info)
        never = asyncio.Event()
        async with serve(f"unix://{tmp_path}/slow.sock", slow_store, never) as (slow, calls):
            three = _composition(tmp_path / "three.toml", {"d1": url1, "d2": url2, "slow": slow})
            dest = tmp_path / "store"
            rc, out, err, elapsed = await _extract(
                "--store-composition", three, "--trusted-public-keys", trusted,
                "--closure", top.absolute_path, dest,
            )  # fmt: skip
            assert rc == 0, err
            assert out.split() == sorted([top.absolute_path, dep.absolute_path])
            diff(tree_a, dest / top.base_name)
            diff(tree_b, dest / dep.base_name)
            # Nobody waited for the slow source: its calls were cancelled, none finished.
            assert elapsed < 10
            assert calls.cancelled > 0
            assert calls.finished == 0
            # (the blob server asks `has` (Stat) first, before it would open the blob)
            assert {"get pathinfo", "get_recursive", "has"} <= set(calls.events)

        two = _composition(tmp_path / "two.toml", {"d1": url1, "d2": url2})

        # Signed by a key nobody trusts: refused, nothing written.
        untrusted = fake_store_path("untrusted")
        await _put(url1, relocated(info_a, untrusted).with_signature(STRANGER))
        rc, _, err, _ = await _extract(
            "--store-composition", two, "--trusted-public-keys", trusted,
            untrusted.absolute_path, tmp_path / "u",
        )  # fmt: skip
        assert rc == 1
        assert "is not signed by a trusted key (signed by stranger.test-1" in err
        assert not (tmp_path / "u").exists()

        # A validly signed PathInfo whose root node was swapped (the signature does not
        # cover it): the extracted tree's NAR is checked against the claim (issue 13,
        # item 10); --verify-nar refuses it before extracting anything.
        swapped = fake_store_path("swapped")
        honest = relocated(info_b, swapped).with_signature(KEY)
        forged = PathInfo(
            store_path=swapped,
            node=info_a.node.renamed(swapped.base_name.encode()),
            nar_size=honest.nar_size,
            nar_sha256=honest.nar_sha256,
            signatures=honest.signatures,
        )
        await _put(url1, forged)
        common = ("--store-composition", two, "--trusted-public-keys", trusted)
        rc, _, err, _ = await _extract(*common, swapped.absolute_path, tmp_path / "gullible")
        assert rc == 1
        assert "its PathInfo claims" in err
        assert not (tmp_path / "gullible").exists()
        rc, _, err, _ = await _extract(
            *common, "--verify-nar", swapped.absolute_path, tmp_path / "careful"
        )
        assert rc == 1
        assert "not the signed" in err
        assert not (tmp_path / "careful").exists()
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("careful")) == []
