"""``GET /<hash>.ls``: the NAR listing, byte for byte as the real Nix 2.8 writes it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.nar_bridge.nar_bridge_support import StartBridge
from tests.support.nix import Nix
from tests.support.services import Run
from tests.support.trees import make_tree

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url) as r:
        assert r.headers["Content-Type"].startswith("application/json")
        body: bytes = r.read()
        return body


def test_listing_matches_nix(
    tvix_store: Run, start_bridge: StartBridge, nix: Nix, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "ls-tree", big_size=70_000)
    (tree / 'quote"back\\slash\ttab\x01').write_bytes(b"escaped names")
    (tree / "<b>html&amp;").write_bytes(b"")
    single = tmp_path / "ls-file"
    single.write_bytes(b"a single file")
    paths = [nix.add(tree), nix.add(single)]
    for source, path in zip((tree, single), paths, strict=True):
        assert tvix_store("import", source).stdout.decode().strip() == path
    cache = tmp_path / "cache"
    for path in paths:
        nix.run(
            "nix", "copy", "--to", f"file://{cache}?compression=none&write-nar-listing=true", path
        )
    bridge = start_bridge()
    for path in paths:
        hash_part = path.removeprefix("/nix/store/")[:32]
        want = (cache / f"{hash_part}.ls").read_bytes()
        got = _get(f"{bridge.url}/{hash_part}.ls")
        assert got == want
    listing = json.loads(got)
    assert listing["root"]["type"] == "regular"

    with pytest.raises(urllib.error.HTTPError) as e:
        _get(f"{bridge.url}/{'0' * 32}.ls")
    assert e.value.code == 404


def test_nix_store_ls_through_the_bridge(
    tvix_store: Run, start_bridge: StartBridge, nix: Nix, tmp_path: Path
) -> None:
    # Nix 2.8's `nix store ls` on an HTTP cache fetches the NAR (it reads a
    # .ls only from its local-nar-cache), so this checks the bridge serves what
    # it needs; test_listing_matches_nix is what proves the .ls itself.
    tree = make_tree(tmp_path / "ls-tree2", big_size=1000)
    path = tvix_store("import", tree).stdout.decode().strip()
    assert path == nix.add(tree)
    bridge = start_bridge()
    for sub in ("", "/nested", "/link", "/exec.sh"):
        args = ("nix", "store", "ls", "-lR", "--store")
        want = nix.run(*args, nix.store, path + sub).stdout
        got = nix.run(*args, bridge.url, path + sub).stdout
        assert got == want
