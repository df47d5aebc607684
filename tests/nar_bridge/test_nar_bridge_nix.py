"""nar-bridge end to end: separate processes on one store, judged by the real Nix 2.8."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.nar_bridge.nar_bridge_support import Closure, Run, StartBridge
from tests.support.nix import Nix
from tests.support.trees import make_tree

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def _copy_from(nix: Nix, url: str, dest: Path, path: str, *options: str) -> None:
    nix.run("nix", "copy", *options, "--from", url, "--to", f"local?root={dest}", path)


def test_nix_copy_from_imported_path(
    tvix_store: Run, start_bridge: StartBridge, nix: Nix, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    store_path = tvix_store("import", tree).stdout.decode().strip()
    assert store_path == nix.add(tree)
    bridge = start_bridge()

    dest = tmp_path / "dest"
    _copy_from(nix, bridge.url, dest, store_path, "--no-check-sigs")
    got = nix.path_info_json(store_path, store=f"local?root={dest}")
    want = nix.path_info_json(store_path)
    assert (got["narHash"], got["narSize"], got["ca"]) == (
        want["narHash"],
        want["narSize"],
        want["ca"],
    )
    # Nix checked the NAR hash while importing; check the unpacked tree, too.
    assert nix.dump(dest / store_path.lstrip("/")) == nix.dump(tree)
    log = bridge.logged()
    assert "GET /nix-cache-info 200" in log
    assert "GET /nar/tvix-castore/" in log

    # The NAR URL is self-contained: a fresh process that never served the
    # narinfo serves it, ranges included.
    hash_part = store_path.removeprefix("/nix/store/")[:32]
    with urllib.request.urlopen(f"{bridge.url}/{hash_part}.narinfo") as r:
        lines = r.read().decode().splitlines()
    nar_url = next(line for line in lines if line.startswith("URL: ")).removeprefix("URL: ")
    bridge.stop()
    again = start_bridge()
    dump = nix.dump(tree)
    request = urllib.request.Request(f"{again.url}/{nar_url}", headers={"Range": "bytes=1000-"})
    with urllib.request.urlopen(request) as r:
        assert r.status == 206
        assert r.read() == dump[1000:]
    assert ".narinfo" not in again.logged()


def test_signatures_required(
    start_bridge: StartBridge, nix: Nix, closure: Closure, tmp_path: Path
) -> None:
    secret, public = nix.generate_key("nb-test-1")
    key_file = tmp_path / "sk"
    key_file.write_text(secret)
    _, wrong = nix.generate_key("nb-test-1")
    bridge = start_bridge("--allow-upload", "--signing-key-file", key_file)
    # Uploaded unsigned; nar-bridge signs as it serves.
    nix.run("nix", "copy", "--to", f"{bridge.url}?compression=none", closure.built)

    ok = tmp_path / "ok"
    _copy_from(nix, bridge.url, ok, closure.built, "--option", "trusted-public-keys", public)
    info = nix.path_info_json(closure.built, store=f"local?root={ok}")
    assert any(s.startswith("nb-test-1:") for s in info["signatures"])

    refused = nix.run(
        "nix",
        "copy",
        "--option",
        "trusted-public-keys",
        wrong,
        "--from",
        bridge.url,
        "--to",
        f"local?root={tmp_path / 'refused'}",
        closure.built,
        check=False,
    )
    assert refused.returncode != 0
    assert b"lacks a valid signature" in refused.stderr


@pytest.mark.parametrize("compression", ["xz", "none", "zstd", "bzip2", "gzip"])
def test_upload_and_download_closure(
    compression: str,
    tvix_store: Run,
    start_bridge: StartBridge,
    nix: Nix,
    closure: Closure,
    tmp_path: Path,
) -> None:
    bridge = start_bridge("--allow-upload")
    nix.run("nix", "copy", "--to", f"{bridge.url}?compression={compression}", closure.built)
    log = bridge.logged()
    assert f"({'none' if compression == 'none' else compression}," in log  # ingested as

    dest = tmp_path / "dest"
    _copy_from(nix, bridge.url, dest, closure.built, "--no-check-sigs")
    for path in closure.paths:
        got = nix.path_info_json(path, store=f"local?root={dest}")
        want = nix.path_info_json(path)
        assert got["narHash"] == want["narHash"], path
        assert got["narSize"] == want["narSize"], path
        assert got["references"] == want["references"], path

    # The store itself, read by another process, has the metadata Nix uploaded.
    infos = json.loads(tvix_store("path-info", "--json", *closure.paths).stdout)
    by_path = {i["path"]: i for i in infos}
    built = by_path[closure.built]
    assert built["references"] == sorted(closure.paths)
    assert built["deriver"] == nix.path_info_json(closure.built)["deriver"]
    assert by_path[closure.text]["ca"].startswith("text:sha256:")
    assert tvix_store("dump-path", closure.tree).stdout == nix.dump(nix.store_file(closure.tree))

    # Uploading again finds everything there: no PUT of a NAR or narinfo.
    before = len(bridge.log)
    nix.run("nix", "copy", "--to", f"{bridge.url}?compression={compression}", closure.built)
    assert not [line for line in bridge.log[before:] if "PUT /" in line]


def test_upload_with_basic_auth(
    start_bridge: StartBridge, nix: Nix, closure: Closure, tmp_path: Path
) -> None:
    auth = tmp_path / "auth"
    auth.write_text("# uploaders\nalice:s3cret\n")
    bridge = start_bridge("--allow-upload", "--upload-auth-file", auth)
    port = bridge.url.rsplit(":", 1)[1]
    wrong = tmp_path / "netrc-wrong"
    wrong.write_text(f"machine 127.0.0.1 login alice password nope\n# port {port}\n")
    proc = nix.run(
        "nix",
        "copy",
        "--option",
        "netrc-file",
        wrong,
        "--to",
        bridge.url,
        closure.tree,
        check=False,
    )
    assert proc.returncode != 0
    assert b"401" in proc.stderr

    right = tmp_path / "netrc"
    right.write_text("machine 127.0.0.1 login alice password s3cret\n")
    nix.run("nix", "copy", "--option", "netrc-file", right, "--to", bridge.url, closure.tree)
    # Reads need no credentials.
    hash_part = closure.tree.removeprefix("/nix/store/")[:32]
    with urllib.request.urlopen(f"{bridge.url}/{hash_part}.narinfo") as r:
        assert r.read().startswith(f"StorePath: {closure.tree}\n".encode())
    assert bridge.stop() == 0
