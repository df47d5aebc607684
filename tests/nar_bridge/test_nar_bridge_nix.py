"""nar-bridge end to end: separate processes on one store, judged by the real Nix 2.8."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.nar_bridge.nar_bridge_support import Closure, StartBridge
from tests.support.daemons import daemon
from tests.support.nix import Nix
from tests.support.services import Run
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.parametrize("where", ["data-dir", "daemon"])
def test_uploaded_nar_urls_served_after_restart(
    where: str, start_bridge: StartBridge, nix: Nix, closure: Closure, tmp_path: Path
) -> None:
    """``nix copy --to``, restart, ``nix copy --from``: Nix asks for the URLs it uploaded."""
    # Nix as one user: one narinfo cache kept across commands (the session's Nix keeps none).
    cache = tmp_path / "nix-cache"
    env = dict(nix.env, XDG_CACHE_HOME=str(cache))
    keep = ("--option", "narinfo-cache-positive-ttl", "3600")

    def nix_copy(*args: str) -> subprocess.CompletedProcess[bytes]:
        proc = subprocess.run(
            ["nix", "copy", *keep, *args], env=env, capture_output=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")
        return proc

    with contextlib.ExitStack() as stack:
        data_dir = tmp_path / "data"
        if where == "daemon":
            _proc, url = stack.enter_context(daemon(data_dir=data_dir))
            store = ["--store", url]
        else:
            store = ["--store", str(data_dir)]
        listen = ("--listen-address", f"127.0.0.1:{_free_port()}")
        bridge = start_bridge("--allow-upload", *listen, store=store)
        nix_copy("--to", bridge.url, closure.built)  # xz, Nix's default
        uploaded = re.findall(r"PUT /(nar/\w+\.nar\.xz) 200", bridge.logged())
        assert len(uploaded) == len(closure.paths)
        assert bridge.stop() == 0
        state = data_dir if where == "data-dir" else tmp_path / "xdg-state/tvix-store/nar-bridge"
        assert (state / "nar-bridge-uploads.sqlite").exists()

        # Restarted, uploads off: the URLs in Nix's cached narinfos are served.
        again = start_bridge(*listen, store=store)
        dest = tmp_path / "dest"
        nix_copy(
            "--no-check-sigs", "--from", again.url, "--to", f"local?root={dest}", closure.built
        )
        log = again.logged()
        for nar_url in uploaded:
            assert f"GET /{nar_url} 200" in log
        assert ".narinfo" not in log  # every narinfo came from Nix's cache
        for path in closure.paths:
            assert nix.dump(dest / path.lstrip("/")) == nix.dump(nix.store_file(path)), path

        # The client's narinfo cache cleared: the bridge's own narinfos and URLs.
        shutil.rmtree(cache)
        fresh = tmp_path / "fresh"
        before = len(again.log)
        nix_copy(
            "--no-check-sigs", "--from", again.url, "--to", f"local?root={fresh}", closure.built
        )
        log = "".join(again.log[before:])
        assert "GET /nar/tvix-castore/" in log
        assert "nar.xz" not in log
        for path in closure.paths:
            assert nix.dump(fresh / path.lstrip("/")) == nix.dump(nix.store_file(path)), path
        again.stop()
