"""Many clients at once through one daemon: no call is lost (issue 13, item 1).

A NAR render of a tree of small files asks the daemon for thousands of blobs;
with several renders (or a nar-bridge with many clients) at once, a daemon
used to end the excess with ``CANCELLED`` (or refuse the HTTP/2 stream).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.daemons import TVIX_STORE, cli_env, daemon, tvix_store
from tests.support.processes import Server, start_process
from tvix.nixcompat.narinfo import NarInfo

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _small_files_tree(root: Path, dirs: int = 40, files: int = 100) -> Path:
    for d in range(dirs):
        sub = root / f"d{d:02}"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub / f"f{f:03}").write_bytes(f"{d}-{f}\n".encode())
    return root


@pytest.fixture(scope="module")
def loaded_daemon(tmp_path_factory: pytest.TempPathFactory) -> object:
    tmp = tmp_path_factory.mktemp("load")
    with daemon(data_dir=tmp / "data") as (_proc, url):
        env = cli_env(url)
        stored = {}
        for name, dirs in (("big", 40), ("small", 5)):
            tree = _small_files_tree(tmp / name, dirs=dirs)
            store_path = tvix_store("import", tree, env=env).stdout.decode().strip()
            stored[name] = store_path, tvix_store("dump-path", store_path, env=env).stdout
        yield url, stored


Loaded = tuple[str, dict[str, tuple[str, bytes]]]


def test_concurrent_renders_through_a_daemon(loaded_daemon: Loaded) -> None:
    # 4,000 files of a few bytes: each render asks for thousands of blobs at once.
    url, stored = loaded_daemon
    store_path, nar = stored["big"]
    procs = [
        subprocess.Popen(
            [*TVIX_STORE, "dump-path", store_path],
            env=cli_env(url),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(8)
    ]
    results = [p.communicate(timeout=280) for p in procs]
    failures = [
        (p.returncode, err.decode(errors="replace")[-300:])
        for p, (_out, err) in zip(procs, results, strict=True)
        if p.returncode != 0
    ]
    assert not failures
    assert all(out == nar for out, _err in results)


def _start_bridge(url: str) -> Server:
    argv = [sys.executable, "-m", "tvix.cli.nar_bridge", "--listen-address", "127.0.0.1:0"]
    for kind in ("blob", "directory", "path-info"):
        argv += [f"--{kind}-service-addr", url]
    return start_process("nar-bridge", argv, r"listening on (http://\S+)", cli_env())


def test_nar_bridge_over_a_daemon_under_load(loaded_daemon: Loaded) -> None:
    # 16 clients of one nar-bridge, each NAR 500 small files: one gRPC client
    # (nar-bridge's) asks for thousands of blobs at once.
    url, stored = loaded_daemon
    store_path, nar = stored["small"]
    bridge = _start_bridge(url)
    base = bridge.address
    try:
        hash_part = store_path.removeprefix("/nix/store/")[:32]
        narinfo = NarInfo.parse(urllib.request.urlopen(f"{base}/{hash_part}.narinfo").read())
        nar_url = f"{base}/{narinfo.url}"
        deadline = time.monotonic() + 20
        sha256 = hashlib.sha256(nar).digest()

        def client() -> tuple[int, list[str]]:
            served, errors = 0, []
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(f"{base}/{hash_part}.narinfo", timeout=60) as r:
                        r.read()
                    with urllib.request.urlopen(nar_url, timeout=60) as r:
                        body = r.read()
                    if hashlib.sha256(body).digest() != sha256:
                        errors.append(f"NAR of {len(body)} bytes differs")
                    else:
                        served += 1
                except Exception as e:
                    errors.append(repr(e))
            return served, errors

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda _: client(), range(16)))
        served = sum(s for s, _ in results)
        errors = [e for _, errs in results for e in errs]
        print(f"nar-bridge over a daemon, 16 clients, 20 s: {served} NARs served")
        assert not errors, (errors[:5], bridge.logged()[-2000:])
        assert served >= 16
    finally:
        bridge.stop()
