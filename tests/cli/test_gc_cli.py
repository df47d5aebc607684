"""``tvix-store delete``, ``pin`` and ``gc`` end to end, against the real Nix's NARs."""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import obstore
import pytest
from obstore.store import S3Store

from tests.support.nix import Nix
from tests.support.servers import SeaweedFS
from tests.support.services import Run
from tvix.nixcompat.storepath import StorePath
from tvix.store import pathinfoservice
from tvix.store.gcstate import SQLiteGCState
from tvix.store.gcstate.sqlite import GCLock

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

# Small packs, so that a GC has many packs to compact (and to be killed in).
SMALL_PACKS = "packs+file://{}/packs?pack_size=1048576"


def _usage(path: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def _pack_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "packs" / "packs").glob("*.pack"))


def _chunks(data_dir: Path) -> set[bytes]:
    db = sqlite3.connect(data_dir / "packs" / "index.sqlite")
    try:
        return {r[0] for r in db.execute("SELECT digest FROM chunks")}
    finally:
        db.close()


def _wait_for_lock(lock: Path, proc: subprocess.Popen[bytes]) -> None:
    """Wait until the GC ``proc`` holds its lock (its work begins), or has ended."""
    while proc.poll() is None:
        if lock.exists():
            fd = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        time.sleep(0.005)


def _snapshot(data_dir: Path) -> tuple[object, ...]:
    """What a GC changes: pack files and their sizes, and the index's rows."""
    packs = sorted((p.name, p.stat().st_size) for p in (data_dir / "packs" / "packs").iterdir())
    db = sqlite3.connect(data_dir / "packs" / "index.sqlite")
    try:
        rows = db.execute("SELECT count(*), sum(pack) FROM chunks").fetchone()
    finally:
        db.close()
    dirs = sqlite3.connect(data_dir / "directories.sqlite")
    try:
        (ndirs,) = dirs.execute("SELECT count(*) FROM directories").fetchone()
    finally:
        dirs.close()
    return (tuple(packs), rows, ndirs)


def _trees(root: Path, count: int, seed: int = 7) -> tuple[list[Path], int]:
    """``count`` trees sharing most files; returns them and the bytes unique to the first."""
    r = random.Random(seed)
    shared = [r.randbytes(r.randint(100, 300_000)) for _ in range(40)]
    trees = []
    unique_first = 0
    for t in range(count):
        tree = root / f"tree{t}"
        (tree / "lib" / "sub").mkdir(parents=True)
        for i, data in enumerate(shared):
            (tree / ("lib" if i % 2 else "lib/sub") / f"s{i}").write_bytes(data)
        for i in range(6):
            data = r.randbytes(r.randint(50_000, 400_000))
            (tree / f"own{i}").write_bytes(data)
            if t == 0:
                unique_first += len(data)
        (tree / "link").symlink_to("lib/s1")
        exe = tree / "run.sh"
        exe.write_bytes(b"#!/bin/sh\n")
        exe.chmod(0o755)
        trees.append(tree)
    return trees, unique_first


def _import(tvix_store: Run, path: Path, env: dict[str, str] | None = None) -> str:
    return tvix_store("import", path, env=env).stdout.decode().strip()


def test_delete_then_gc_frees_a_tree_and_keeps_its_sibling(
    tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path
) -> None:
    (a_tree, b_tree), a_unique = _trees(tmp_path, 2)
    a = _import(tvix_store, a_tree)
    b = _import(tvix_store, b_tree)
    b_chunks_before = _chunks(data_dir)

    # Nothing is garbage yet.
    dry = tvix_store("gc", "--dry-run", "--grace", "0").stdout.decode()
    assert "would delete 0 store paths, 0 Directories, 0 chunks" in dry

    # A pinned path is refused by delete, nothing removed.
    tvix_store("pin", "add", "a", a)
    assert tvix_store("pin", "list").stdout.decode() == f"a\t{a}\n"
    refused = tvix_store("delete", a, check=False)
    assert refused.returncode == 1
    assert "pinned by 'a'" in refused.stderr.decode()
    assert tvix_store("path-info", a).returncode == 0
    tvix_store("pin", "remove", "a")

    assert tvix_store("delete", a).stdout.decode().strip() == a
    assert tvix_store("path-info", a, check=False).returncode != 0
    before = _usage(data_dir)
    out = tvix_store("gc", "--grace", "0").stdout.decode()
    assert "deleted 0 store paths, 1 Directories" in out
    after = _usage(data_dir)
    assert before - after >= 0.9 * a_unique, (before, after, a_unique, out)

    # B renders byte-identical to Nix's NAR, its chunks all still indexed.
    assert tvix_store("dump-path", b).stdout == nix.dump(b_tree)
    assert tvix_store("verify").returncode == 0
    b_chunks = _chunks(data_dir)
    assert b_chunks < b_chunks_before
    assert tvix_store("delete", "/nix/store/" + "0" * 32 + "-x", check=False).returncode != 0


def test_two_gcs_at_once_one_is_refused(tvix_store: Run, tmp_path: Path, data_dir: Path) -> None:
    (tree,), _ = _trees(tmp_path, 1)
    _import(tvix_store, tree)
    with GCLock(str(data_dir / "gc.lock")):
        proc = tvix_store("gc", check=False)
    assert proc.returncode == 1
    assert "another garbage collection is running" in proc.stderr.decode()
    assert tvix_store("gc").returncode == 0


def _start_gc(data_dir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    full = dict(os.environ, TVIX_STORE_DATA_DIR=str(data_dir), **env)
    for var in ("DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        full.pop(var, None)
    return subprocess.Popen(
        [sys.executable, "-m", "tvix.cli.store", "gc", "--grace", "0", "--threshold", "1"],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _kill_gcs(
    tvix_store: Run,
    nix: Nix,
    data_dir: Path,
    env: dict[str, str],
    trees: list[Path],
    snapshot: Callable[[], object],
    *,
    kills: int,
    seed: int,
) -> dict[str, Path]:
    """Import ``trees``, delete the first three, then SIGKILL GCs at random moments after
    they took the lock (fresh garbage before each) until ``kills`` were killed: ``verify``
    clean after each, the live paths rendering as Nix's NARs. The live paths."""
    paths = [_import(tvix_store, t, env) for t in trees]
    live = dict(zip(paths[3:], trees[3:], strict=True))
    churn = trees[:3]  # imported and deleted again before each GC: work to be killed in
    for p in paths[:3]:
        tvix_store("delete", p, env=env)
    rng = random.Random(seed)
    killed = 0
    mid_work = 0  # kills after the GC had changed something (not during start-up)
    delay = 0.3  # after the GC took its lock; adapted so most are killed mid-way
    attempts = 0
    while killed < kills and attempts < 4 * kills:
        attempts += 1
        if attempts > 1:
            again = _import(tvix_store, churn[attempts % 3], env)
            tvix_store("delete", again, env=env)
        before = snapshot()
        proc = _start_gc(data_dir, env)
        _wait_for_lock(data_dir / "gc.lock", proc)
        time.sleep(rng.uniform(0, delay))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed += 1
            mid_work += snapshot() != before
            delay *= 1.1
        else:
            delay *= 0.7
        proc.wait()
        verified = tvix_store("verify", env=env)
        assert "all intact" in verified.stderr.decode()
        if attempts % 5 == 0:
            for p, tree in live.items():
                assert tvix_store("dump-path", p, env=env).stdout == nix.dump(tree)
    assert killed >= kills, f"only {killed} of the GCs were killed mid-way"
    need = max(2, kills * 3 // 10)
    assert mid_work >= need, f"only {mid_work} of {killed} kills came after the GC changed anything"
    return live


@pytest.mark.slow
def test_gc_killed_repeatedly_loses_nothing_and_converges(
    tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path
) -> None:
    env = {"BLOB_SERVICE_ADDR": SMALL_PACKS.format(data_dir)}
    trees, _ = _trees(tmp_path, 8)
    live = _kill_gcs(
        tvix_store, nix, data_dir, env, trees, lambda: _snapshot(data_dir), kills=10, seed=15
    )

    # The next GC finishes the job: as small as a store that only ever held the rest.
    tvix_store("gc", "--grace", "0", "--threshold", "1", env=env)
    for p, tree in live.items():
        assert tvix_store("dump-path", p, env=env).stdout == nix.dump(tree)
    assert "all intact" in tvix_store("verify", env=env).stderr.decode()
    fresh = tmp_path / "fresh"
    fresh_env = {"TVIX_STORE_DATA_DIR": str(fresh), "BLOB_SERVICE_ADDR": SMALL_PACKS.format(fresh)}
    for tree in live.values():
        tvix_store("import", tree, env=fresh_env)
    ours, scratch = _pack_bytes(data_dir), _pack_bytes(fresh)
    assert ours <= scratch * 1.02 + 4096, (ours, scratch)
    assert not list((data_dir / "packs" / "packs").glob("*.tmp"))


def test_daemon_collects_periodically_beside_a_cli_gc(
    tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path
) -> None:
    # Imported before the daemon starts: its GC runs with grace 0, which is only
    # for a store nobody else writes to meanwhile.
    (a_tree, b_tree), a_unique = _trees(tmp_path, 2)
    a = _import(tvix_store, a_tree)
    b = _import(tvix_store, b_tree)
    full = _pack_bytes(data_dir)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SERVICE_ADDR")}
    env["TVIX_STORE_DATA_DIR"] = str(data_dir)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tvix.cli.store",
            "daemon",
            "--listen-address",
            f"unix://{tmp_path}/d.sock",
            "--gc-interval",
            "1",
            "--gc-grace",
            "0",
        ],
        env=env,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        assert "listening on" in line, line
        url = f"grpc+unix://{tmp_path}/d.sock"
        remote = {
            "BLOB_SERVICE_ADDR": url,
            "DIRECTORY_SERVICE_ADDR": url,
            "PATH_INFO_SERVICE_ADDR": url,
        }
        # Deleting on the data directory while the daemon serves it: its GC frees A.
        tvix_store("delete", a)
        deadline = time.monotonic() + 30
        while _pack_bytes(data_dir) > full - 0.9 * a_unique and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _pack_bytes(data_dir) <= full - 0.9 * a_unique
        assert tvix_store("dump-path", b, env=remote).stdout == nix.dump(b_tree)
        # A GC from the command line beside the daemon's: it runs, or is refused.
        for _ in range(3):
            cli = tvix_store("gc", "--grace", "0", check=False)
            assert cli.returncode == 0 or b"another garbage collection" in cli.stderr
        assert tvix_store("dump-path", b, env=remote).stdout == nix.dump(b_tree)
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert "all intact" in tvix_store("verify").stderr.decode()
    refused = tvix_store("gc", "--grace", "10", check=False)
    assert refused.returncode == 1
    assert "at least 120 s" in refused.stderr.decode()


# -- a store shared through S3 and PostgreSQL ------------------------------------------------------


async def test_machines_sharing_a_postgres_store_share_its_gc_lock_and_pins(
    tvix_store: Run, tmp_path: Path, weed: SeaweedFS, pg_url: str
) -> None:
    """Two data directories (two machines) on one packs+s3 + PostgreSQL store: a GC from
    either is refused while another holds the lock, and a pin made through one protects
    its path from the other's delete and retention."""
    run = f"gcpg{os.getpid()}x{time.monotonic_ns()}"
    index = quote(pg_url, safe="")
    shared = {
        "BLOB_SERVICE_ADDR": f"packs+s3://{weed.bucket}/{run}?endpoint={weed.endpoint}"
        f"&index={index}",
        "DIRECTORY_SERVICE_ADDR": pg_url,
        "PATH_INFO_SERVICE_ADDR": pg_url,
    }
    machine_a = {**shared, "TVIX_STORE_DATA_DIR": str(tmp_path / "a")}
    machine_b = {**shared, "TVIX_STORE_DATA_DIR": str(tmp_path / "b")}

    def cli(
        env: dict[str, str], *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        return tvix_store(*args, env=env, check=check)

    (kept_tree, old_tree), _ = _trees(tmp_path, 2)
    kept = _import(tvix_store, kept_tree, machine_a)
    old = _import(tvix_store, old_tree, machine_a)

    # Another GC of the store (here: this test) holds the lock in PostgreSQL.
    state = pathinfoservice.from_url(pg_url).gc_state
    assert state is not None
    async with state.lock():
        for env in (machine_a, machine_b):
            refused = await asyncio.to_thread(cli, env, "gc", "--grace", "0", check=False)
            assert refused.returncode == 1
            err = refused.stderr.decode()
            assert "another garbage collection is running" in err, err
            assert "PostgreSQL postgresql://postgres@127.0.0.1" in err, err
    await state.close()

    # A pin made on A is seen on B, and protects its closure from B's delete and retention.
    cli(machine_a, "pin", "add", "release", kept)
    assert cli(machine_b, "pin", "list").stdout.decode() == f"release\t{kept}\n"
    refused = cli(machine_b, "delete", kept, check=False)
    assert refused.returncode == 1
    assert "pinned by 'release'" in refused.stderr.decode()
    out = cli(machine_b, "gc", "--grace", "0", "--keep-younger-than", "0s").stdout.decode()
    assert f"deleted store path {old}" in out, out
    assert f"deleted store path {kept}" not in out, out
    assert cli(machine_a, "path-info", kept, check=False).returncode == 0
    assert cli(machine_a, "path-info", old, check=False).returncode != 0
    assert "all intact" in cli(machine_a, "verify").stderr.decode()
    # Neither data directory holds GC state of its own.
    assert not list((tmp_path / "a").glob("gc.*"))
    assert not list((tmp_path / "b").glob("gc.*"))

    cli(machine_b, "pin", "remove", "release")
    assert cli(machine_a, "pin", "list").stdout.decode() == ""
    assert cli(machine_a, "delete", kept).stdout.decode().strip() == kept


async def test_pins_left_in_a_data_directory_move_to_postgres(
    tvix_store: Run, tmp_path: Path, data_dir: Path, pg_url: str
) -> None:
    """Pins made in the data directory before PostgreSQL kept them still protect their paths:
    the first command on the store moves them into the database."""
    env = {"DIRECTORY_SERVICE_ADDR": pg_url, "PATH_INFO_SERVICE_ADDR": pg_url}
    (tree,), _ = _trees(tmp_path, 1)
    path = _import(tvix_store, tree, env)
    data_dir.mkdir(exist_ok=True)
    old = SQLiteGCState(data_dir)
    await old.add_pin("release", StorePath.from_absolute_path(path))
    await old.close()
    refused = tvix_store("delete", path, env=env, check=False)
    assert refused.returncode == 1
    assert "pinned by 'release'" in refused.stderr.decode()
    assert f"moved the pin 'release' ({path})" in refused.stderr.decode()
    other = {**env, "TVIX_STORE_DATA_DIR": str(tmp_path / "other")}
    assert tvix_store("pin", "list", env=other).stdout.decode() == f"release\t{path}\n"
    assert "moved" not in tvix_store("pin", "list", env=env).stderr.decode()


# -- objectstore blobs (one object per chunk) ------------------------------------------------------


def _object_bytes(root: Path) -> dict[str, int]:
    """The chunk and record files of an ``objectstore+file`` store, and their sizes."""
    return {
        str(p.relative_to(root)): p.stat().st_size
        for kind in ("chunks", "blobs")
        for p in (root / kind).rglob("*")
        if p.is_file()
    }


def _s3_object_bytes(weed: SeaweedFS, prefix: str) -> dict[str, int]:
    store = S3Store(
        weed.bucket,
        config={"endpoint": weed.endpoint, "region": "us-east-1"},
        client_options={"allow_http": True},
    )
    return {
        o["path"].removeprefix(prefix + "/"): o["size"]
        for batch in obstore.list(store, prefix=prefix + "/")
        for o in batch
        if o["path"].startswith((f"{prefix}/chunks/", f"{prefix}/blobs/"))
    }


def _a_b_gc(
    tvix_store: Run,
    nix: Nix,
    tmp_path: Path,
    blobs: Callable[[str], str],
    objects: Callable[[str], dict[str, int]],
    env: dict[str, str] | None = None,
) -> None:
    """Import A and B (sharing most files), delete A, gc: B renders as Nix's NAR, and
    exactly the objects a store holding only B has are left.

    ``blobs(name)`` is the blob service URL of a store, ``objects(name)`` its objects.
    """
    env = {**(env or {}), "BLOB_SERVICE_ADDR": blobs("main")}
    (a_tree, b_tree), a_unique = _trees(tmp_path, 2)
    a = _import(tvix_store, a_tree, env)
    b = _import(tvix_store, b_tree, env)
    both = objects("main")
    dry = tvix_store("gc", "--dry-run", "--grace", "0", env=env).stdout.decode()
    assert "would delete 0 store paths, 0 Directories, 0 chunks" in dry
    tvix_store("delete", a, env=env)
    out = tvix_store("gc", "--grace", "0", env=env).stdout.decode()
    assert "deleted 0 store paths, 1 Directories" in out, out
    left = objects("main")
    only_b = {
        "TVIX_STORE_DATA_DIR": str(tmp_path / "only-b"),
        "BLOB_SERVICE_ADDR": blobs("only-b"),
        "DIRECTORY_SERVICE_ADDR": "memory://",
        "PATH_INFO_SERVICE_ADDR": "memory://",
    }
    assert _import(tvix_store, b_tree, only_b) == b
    assert set(left) == set(objects("only-b"))
    freed = sum(size for key, size in both.items() if key not in left)
    assert freed >= 0.9 * a_unique, (out, freed, a_unique)
    assert tvix_store("dump-path", b, env=env).stdout == nix.dump(b_tree)
    assert "all intact" in tvix_store("verify", env=env).stderr.decode()
    again = tvix_store("gc", "--grace", "0", env=env).stdout.decode()
    assert "deleted 0 store paths, 0 Directories, 0 chunks and 0 blob records" in again


def test_delete_then_gc_on_objectstore_files(
    tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path
) -> None:
    _a_b_gc(
        tvix_store,
        nix,
        tmp_path,
        lambda name: f"objectstore+file://{tmp_path}/{name}-objects",
        lambda name: _object_bytes(tmp_path / f"{name}-objects"),
    )
    # Nothing left in quarantine.
    assert not [p for p in (tmp_path / "main-objects" / "gc").rglob("*") if p.is_file()]


def test_delete_then_gc_on_objectstore_s3_and_postgres(
    tvix_store: Run, nix: Nix, tmp_path: Path, weed: SeaweedFS, pg_url: str
) -> None:
    run = f"gc{os.getpid()}x{time.monotonic_ns()}"
    _a_b_gc(
        tvix_store,
        nix,
        tmp_path,
        lambda name: weed.url(f"{run}-{name}"),
        lambda name: _s3_object_bytes(weed, f"{run}-{name}"),
        {"DIRECTORY_SERVICE_ADDR": pg_url, "PATH_INFO_SERVICE_ADDR": pg_url},
    )


def _objects_snapshot(root: Path, data_dir: Path) -> tuple[object, ...]:
    """What a GC on objectstore changes: the object files, and the Directories."""
    dirs = sqlite3.connect(data_dir / "directories.sqlite")
    try:
        (ndirs,) = dirs.execute("SELECT count(*) FROM directories").fetchone()
    finally:
        dirs.close()
    return (tuple(sorted(_object_bytes(root))), ndirs)


@pytest.mark.slow
def test_gc_on_objectstore_killed_loses_nothing(
    tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path
) -> None:
    """SIGKILLed GCs of objectstore+file (the packed store's test kills 10): after each,
    verify is clean and the live paths render as Nix's NARs; the next GC finishes."""
    objects = data_dir / "objects"
    blobs = f"objectstore+file://{objects}?avg_chunk_size=16384"  # many objects to delete
    env = {"BLOB_SERVICE_ADDR": blobs}
    trees, _ = _trees(tmp_path, 6)
    live = _kill_gcs(
        tvix_store,
        nix,
        data_dir,
        env,
        trees,
        lambda: _objects_snapshot(objects, data_dir),
        kills=5,
        seed=19,
    )

    tvix_store("gc", "--grace", "0", env=env)
    for p, tree in live.items():
        assert tvix_store("dump-path", p, env=env).stdout == nix.dump(tree)
    fresh = tmp_path / "fresh"
    fresh_env = {
        "TVIX_STORE_DATA_DIR": str(fresh),
        "BLOB_SERVICE_ADDR": f"objectstore+file://{fresh}/objects?avg_chunk_size=16384",
    }
    for tree in live.values():
        tvix_store("import", tree, env=fresh_env)
    assert set(_object_bytes(objects)) == set(_object_bytes(fresh / "objects"))
    assert not [p for p in (objects / "gc").rglob("*") if p.is_file()]
