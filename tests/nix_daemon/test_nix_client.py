"""``tvix-store nix-daemon`` judged by the real Nix 2.8 client (protocol 1.34).

Nix's ``unix://`` store is a LocalFSStore: it asks the daemon about paths
and sends it uploads, but reads store *files* from the local file system
(``ROOT/nix/store``). So the reading commands run twice: with
``unix://S?root=MNT`` over a ``tvix-store mount`` of the same store, and
with ``ssh-ng://`` (a remote store: Nix asks the daemon for each NAR,
NarFromPath) through a stand-in ``ssh``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.nix_daemon.daemon_support import (
    OP_QUERY_PATH_INFO,
    Daemon,
    RawClient,
    StartDaemon,
    clean_env,
    ssh_ng,
)
from tests.support.nix import Nix
from tests.support.services import Run
from tests.support.trees import make_tree
from tvix.nix_daemon import wire
from tvix.nixcompat import nixbase32

pytestmark = pytest.mark.nix

OP_QUERY_VALID_DERIVERS = 33
OP_QUERY_MISSING = 40
OP_QUERY_DERIVATION_OUTPUT_MAP = 41


class Closure:
    """Paths made by the real Nix: a tree, a text referring to it, a build referring to both."""

    def __init__(self, nix: Nix, root: Path) -> None:
        self.tree = nix.add(make_tree(root / "nd-tree", big_size=200_000))
        self.text = nix.add_text("nd-text", "refers to the tree", [self.tree])
        self.built = nix.build("nd-built", references=[self.tree, self.text])
        self.drv = nix.path_info_json(self.built)["deriver"]

    @property
    def paths(self) -> list[str]:
        return [self.tree, self.text, self.built]


@pytest.fixture(scope="module")
def closure(nix: Nix, tmp_path_factory: pytest.TempPathFactory) -> Closure:
    return Closure(nix, tmp_path_factory.mktemp("nd-closure"))


def _json(nix: Nix, store: str, *paths: str, env: dict[str, str] | None = None) -> dict[str, dict]:  # type: ignore[type-arg]
    args = ["nix", "path-info", "--store", store, "--json", *paths]
    proc = subprocess.run(args, env=env or nix.env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    return {i["path"]: i for i in json.loads(proc.stdout)}


def _same(got: dict, want: dict) -> None:  # type: ignore[type-arg]
    for key in ("narHash", "narSize", "references", "ca", "deriver"):
        assert got.get(key) == want.get(key), (key, got, want)


@pytest.fixture
def mounted(store_args: list[str], tmp_path: Path) -> Iterator[Path]:
    """The store FUSE-mounted at ROOT/nix/store; yields ROOT."""
    root = tmp_path / "mnt"
    (root / "nix" / "store").mkdir(parents=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tvix.cli.store", "mount", *store_args, root / "nix" / "store"],
        stderr=subprocess.PIPE,
        env=clean_env(),
    )
    assert proc.stderr is not None
    line = proc.stderr.readline().decode()
    assert "mounted at" in line, line + proc.stderr.read().decode()
    yield root
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def test_add_and_import_agree_and_path_info(
    start_daemon: StartDaemon, tvix_store: Run, nix: Nix, tmp_path: Path
) -> None:
    tree = make_tree(tmp_path / "tree")
    daemon = start_daemon()
    added = nix.run("nix-store", "--store", daemon.store, "--add", tree).stdout.decode().strip()
    assert added == nix.add(tree)
    assert tvix_store("import", tree).stdout.decode().strip() == added
    got = nix.path_info_json(added, store=daemon.store)
    _same(got, nix.path_info_json(added))
    # Several clients at once.
    argv = ["nix", "path-info", "--store", daemon.store, "--json", added]
    procs = [subprocess.Popen(argv, env=nix.env, stdout=subprocess.PIPE) for _ in range(6)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert all(json.loads(o)[0]["narHash"] == got["narHash"] for o in outs)
    assert "AddToStore " + added in daemon.logged()  # one log line per request at -v


def test_copy_closure_to_the_daemon_and_query(
    start_daemon: StartDaemon, nix: Nix, closure: Closure
) -> None:
    daemon = start_daemon()
    # Input-addressed paths need a signature unless a trusted client says otherwise.
    refused = nix.run("nix", "copy", "--to", daemon.store, closure.built, check=False)
    assert refused.returncode != 0
    assert b"lacks a valid signature" in refused.stderr
    nix.run("nix", "copy", "--no-check-sigs", "--to", daemon.store, closure.built)
    assert "AddMultipleToStore" in daemon.logged()
    got = _json(nix, daemon.store, *closure.paths)
    want = _json(nix, nix.store, *closure.paths)
    for path in closure.paths:
        _same(got[path], want[path])

    def query(*args: str) -> list[str]:
        out = nix.run("nix-store", "--store", daemon.store, "-q", *args).stdout.decode()
        return sorted(out.split())

    assert query("--references", closure.built) == sorted(closure.paths)
    assert query("--referrers", closure.tree) == sorted([closure.text, closure.built])
    assert query("--deriver", closure.built) == [closure.drv]
    sri = want[closure.tree]["narHash"].removeprefix("sha256-")
    assert query("--hash", closure.tree) == ["sha256:" + nixbase32.encode(base64.b64decode(sri))]
    # Copying again sends nothing: QueryValidPaths says it is all there.
    nix.run("nix", "copy", "--no-check-sigs", "--to", daemon.store, closure.built)
    uploads = [line for line in daemon.log if "AddMultipleToStore" in line]
    assert "AddMultipleToStore 0 paths -> ok" in uploads[-1], uploads


def test_read_back_through_a_mount_and_over_ssh_ng(
    start_daemon: StartDaemon,
    mounted: Path,
    store_args: list[str],
    nix: Nix,
    closure: Closure,
    tmp_path: Path,
) -> None:
    daemon = start_daemon()
    nix.run("nix", "copy", "--no-check-sigs", "--to", daemon.store, closure.built)
    source_dump = nix.dump(nix.store_file(closure.tree))
    # unix:// with the files under the mount.
    local = f"{daemon.store}?root={mounted}"
    dest = tmp_path / "dest"
    nix.run(
        "nix",
        "copy",
        "--no-check-sigs",
        "--from",
        local,
        "--to",
        f"local?root={dest}",
        closure.built,
    )
    nix.run(
        "nix", "store", "verify", "--no-trust", "--store", f"local?root={dest}", "-r", closure.built
    )
    assert nix.dump(dest / closure.tree.lstrip("/")) == source_dump
    assert nix.dump(mounted / closure.tree.lstrip("/")) == source_dump
    listing = nix.run("nix", "store", "ls", "--store", local, "-R", closure.tree).stdout
    assert b"./nested/deeper/deepest/leaf" in listing
    nix.run("nix", "store", "verify", "--no-trust", "--store", local, "-r", closure.built)

    # ssh-ng://: every byte comes from the daemon (NarFromPath), here on stdin/stdout.
    env, log = ssh_ng(nix, store_args, tmp_path)

    def run(*args: str) -> bytes:
        proc = subprocess.run(args, env=env, capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout

    remote = "ssh-ng://tvix"
    assert run("nix", "store", "dump-path", "--store", remote, closure.tree) == source_dump
    assert run("nix", "store", "cat", "--store", remote, closure.tree + "/regular.txt") == (
        b"hello\n"
    )
    assert b"./nested/deeper/deepest/leaf" in run(
        "nix", "store", "ls", "--store", remote, "-R", closure.tree
    )
    run("nix", "store", "verify", "--no-trust", "--store", remote, "-r", closure.built)
    dest2 = tmp_path / "dest2"
    run(
        "nix",
        "copy",
        "--no-check-sigs",
        "--from",
        remote,
        "--to",
        f"local?root={dest2}",
        closure.built,
    )
    _same(
        _json(nix, f"local?root={dest2}", closure.built)[closure.built],
        _json(nix, nix.store, closure.built)[closure.built],
    )
    assert "NarFromPath " + closure.tree in log.read_text()


def test_text_flat_and_derivation_queries(
    start_daemon: StartDaemon, nix: Nix, closure: Closure, tmp_path: Path
) -> None:
    daemon = start_daemon()
    expr = 'builtins.toFile "nd-hello" "hello from nix"'
    via_daemon = nix.run("nix", "eval", "--raw", "--store", daemon.store, "--expr", expr)
    local = nix.run("nix", "eval", "--raw", "--store", nix.store, "--expr", expr)
    assert via_daemon.stdout == local.stdout
    flat = tmp_path / "flat.txt"
    flat.write_bytes(b"flat contents\n")
    added = nix.run("nix", "store", "add-file", "--store", daemon.store, flat).stdout.strip()
    assert added.decode() == nix.add_fixed(flat)

    # Derivation queries answered from the stored .drv.
    nix.run("nix", "copy", "--no-check-sigs", "--to", daemon.store, closure.built)
    nix.run("nix", "copy", "--derivation", "--no-check-sigs", "--to", daemon.store, closure.drv)

    async def ask() -> tuple[list[tuple[str, str]], list[str], list[list[str]]]:
        c = await RawClient.connect(str(daemon.socket))
        c.send(wire.enc_u64(OP_QUERY_DERIVATION_OUTPUT_MAP), wire.enc_string(closure.drv))
        await c.result()
        outputs = [(await c.string(), await c.string()) for _ in range(await c.u64())]
        c.send(wire.enc_u64(OP_QUERY_VALID_DERIVERS), wire.enc_string(closure.built))
        await c.result()
        derivers = await c.strings()
        c.send(wire.enc_u64(OP_QUERY_MISSING), wire.enc_strings([closure.drv + "!out"]))
        await c.result()
        missing = [await c.strings() for _ in range(3)]
        await c.close()
        return outputs, derivers, missing

    outputs, derivers, missing = asyncio.run(ask())
    assert outputs == [("out", closure.built)]
    assert derivers == [closure.drv]
    assert missing == [[], [], []]  # the output is valid: nothing to build


def test_build_attempt_fails_cleanly(start_daemon: StartDaemon, nix: Nix) -> None:
    daemon = start_daemon()
    expr = (
        'derivation { name = "nd-never-built"; system = builtins.currentSystem; '
        'builder = "/bin/sh"; args = [ "-c" "echo > $out" ]; }'
    )
    proc = nix.run("nix-build", "--store", daemon.store, "--no-out-link", "-E", expr, check=False)
    assert proc.returncode == 1
    assert b"tvix-store nix-daemon does not build" in proc.stderr
    assert b"will be built" in proc.stderr  # QueryMissing answered first
    # The daemon is fine, and kept the .drv Nix added on the way.
    drv = next(w for w in proc.stderr.decode().split() if w.endswith(".drv"))
    nix.run("nix-store", "--store", daemon.store, "--check-validity", drv)


def test_untrusted_client(start_daemon: StartDaemon, nix: Nix, closure: Closure) -> None:
    daemon = start_daemon("--trusted", "12345")  # not root, who runs the tests
    proc = nix.run(
        "nix", "copy", "--no-check-sigs", "--to", daemon.store, closure.built, check=False
    )
    assert proc.returncode != 0
    assert b"lacks a valid signature" in proc.stderr
    # Content-addressed paths prove themselves.
    nix.run("nix", "copy", "--to", daemon.store, closure.text)
    assert nix.path_info_json(closure.text, store=daemon.store)["ca"].startswith("text:")


def test_signed_paths_are_accepted(
    start_daemon: StartDaemon, nix: Nix, closure: Closure, tmp_path: Path
) -> None:
    secret, public = nix.generate_key("nd-key-1")
    key_file = tmp_path / "sk"
    key_file.write_text(secret)
    nix.run(
        "nix", "store", "sign", "--store", nix.store, "--key-file", key_file, "-r", closure.built
    )
    daemon = start_daemon("--trusted-public-keys", public)
    nix.run("nix", "copy", "--to", daemon.store, closure.built)
    sigs = nix.path_info_json(closure.built, store=daemon.store)["signatures"]
    assert any(s.startswith("nd-key-1:") for s in sigs)


def test_clean_stop(start_daemon: StartDaemon, nix: Nix) -> None:
    daemon: Daemon = start_daemon()
    assert daemon.socket.exists()

    async def idle_client() -> None:
        c = await RawClient.connect(str(daemon.socket))
        c.send(wire.enc_u64(OP_QUERY_PATH_INFO))  # an operation left unfinished
        await c.writer.drain()
        await asyncio.sleep(0.2)
        start = time.monotonic()
        assert daemon.stop() == 0
        assert time.monotonic() - start < 10
        await c.close()

    asyncio.run(idle_client())
    assert not os.path.exists(daemon.socket)
    assert "stopping; 1 clients connected" in daemon.logged()
