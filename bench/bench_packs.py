"""Issue 14's table: the packed default store beside the real peers, measured in one run.

On this Python's standard library tree (``default_tree()``, ~50k files) with
the default data directory layout (``packs+file`` + SQLite):

==================================== =========================================== ==========
measure                              peer                                        target
==================================== =========================================== ==========
import into a fresh data dir         ``nix-store --add`` into a fresh chroot     <= 1.0x
import again (everything present)    ``nix-hash --type sha256 --base32``         <= 2x
dump-path                            ``nix-store --dump``                        <= 2x
extract                              ``cp -a``                                   <= 1.0x
one big file (3 GiB): import         ``nix-store --add``                         <= 1.0x
one big file: dump-path              ``nix-store --dump``                        <= 2x
nar-bridge NAR, 1 connection (disk)  nginx serving the NAR file                  >= 0.45x
nar-bridge NAR, 16 connections       nginx, 16 connections                       report
FUSE cat of the tree (cold mount)    ``cat`` of the source tree                  report
files in the data dir                the tree's files                            < 500
import into S3 + PostgreSQL          the same into the embedded default          <= 2x
S3 requests per MiB of new data                                                  <= 1
peak RSS: 10 GiB import; dump-path                                               <= 200 MB
==================================== =========================================== ==========

Each time is the median of ``REPEATS`` runs, the tvix run and its peer
interleaved so both see the same machine (2 cores shared with others: the
ratios are what to read). Sections can be skipped with ``TVIX_BENCH_SKIP``
(comma separated: ``tree`` (and with it ``bridge`` and ``mount``), ``big``,
``huge``, ``bridge``, ``mount``, ``s3``);
``TVIX_BENCH_BIG`` sets the big file's size in MiB (default 3072).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import WORK, default_tree, fresh, need, nix_env, table, tree_stats

REPEATS = 3
HERE = WORK / "packs"
SKIP = set(filter(None, os.environ.get("TVIX_BENCH_SKIP", "").split(",")))
BIG_MIB = int(os.environ.get("TVIX_BENCH_BIG", "3072"))


def _env(data: Path) -> dict[str, str]:
    env = dict(os.environ, TVIX_STORE_DATA_DIR=str(data))
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    return env


def _tvix(data: Path, *args: str | Path, out: Path | None = None) -> tuple[float, str, int]:
    """Run ``tvix-store ARGS`` on ``data``: (seconds, stdout unless ``out``, peak RSS in KB)."""
    argv = [need("/usr/bin/time"), "-f", "%M", sys.executable, "-m", "tvix.cli.store"]
    start = time.perf_counter()
    with open(out if out is not None else os.devnull, "wb") as sink:
        proc = subprocess.run(
            [*argv, *map(str, args)],
            env=_env(data),
            stdout=subprocess.PIPE if out is None and args[0] == "import" else sink,
            stderr=subprocess.PIPE,
            check=False,
        )
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"bench: tvix-store {args[0]} failed: {proc.stderr.decode()[-2000:]}")
    rss = int(proc.stderr.decode().strip().splitlines()[-1])
    stdout = proc.stdout.decode().strip() if proc.stdout else ""
    return elapsed, stdout, rss


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    proc = subprocess.run(
        [str(a) for a in argv],
        check=False,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if proc.returncode:
        sys.exit(f"bench: {argv[0]} failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return time.perf_counter() - start


def _nix_add(path: Path) -> float:
    root = fresh(HERE / "nix")
    env = nix_env(root / "home")
    t = _run(need("nix-store"), "--store", f"local?root={root}", "--add", path, env=env)
    shutil.rmtree(root, ignore_errors=True)
    return t


def _pairs(ours: Callable[[], float], peer: Callable[[], float]) -> tuple[float, float]:
    """Medians of REPEATS interleaved runs of ``ours`` and ``peer``."""
    a, b = [], []
    for _ in range(REPEATS):
        a.append(ours())
        b.append(peer())
    return statistics.median(a), statistics.median(b)


def _once(ours: Callable[[], float], peer: Callable[[], float]) -> tuple[float, float]:
    return ours(), peer()


class Report:
    def __init__(self) -> None:
        self.rows: list[list[str]] = []

    def ratio(
        self, what: str, ours: float, peer: float, peer_name: str, target: str, ok: bool | None
    ) -> None:
        verdict = "report" if ok is None else ("OK" if ok else "MISSED")
        self.rows.append(
            [
                what,
                f"{ours:.2f} s",
                f"{peer:.2f} s ({peer_name})",
                f"{ours / peer:.2f}x",
                target,
                verdict,
            ]
        )
        print(f"  {what}: {ours:.2f} s vs {peer:.2f} s = {ours / peer:.2f}x {verdict}", flush=True)

    def value(self, what: str, value: str, target: str, ok: bool | None) -> None:
        verdict = "report" if ok is None else ("OK" if ok else "MISSED")
        self.rows.append([what, value, "", "", target, verdict])
        print(f"  {what}: {value} {verdict}", flush=True)


def _tree_section(report: Report, tree: Path, nfiles: int) -> tuple[Path, str]:
    data = HERE / "data"

    def first() -> float:
        fresh(data)
        return _tvix(data, "import", tree)[0]

    t_import, t_add = _pairs(first, lambda: _nix_add(tree))
    report.ratio(
        "import (fresh data dir)", t_import, t_add, "nix-store --add", "<= 1.0x", t_import <= t_add
    )
    _t, store_path, _rss = _tvix(data, "import", tree)
    t_again, t_hash = _pairs(
        lambda: _tvix(data, "import", tree)[0],
        lambda: _run(need("nix-hash"), "--type", "sha256", "--base32", tree),
    )
    report.ratio("import again", t_again, t_hash, "nix-hash", "<= 2x", t_again <= 2 * t_hash)
    t_dump, t_nixdump = _pairs(
        lambda: _tvix(data, "dump-path", store_path)[0],
        lambda: _run(need("nix-store"), "--dump", tree),
    )
    report.ratio(
        "dump-path", t_dump, t_nixdump, "nix-store --dump", "<= 2x", t_dump <= 2 * t_nixdump
    )
    dest = HERE / "extract"

    def extract() -> float:
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()
        return _tvix(data, "extract", store_path, dest)[0]

    def cp() -> float:
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()
        return _run(need("cp"), "-a", tree, dest)

    t_extract, t_cp = _pairs(extract, cp)
    shutil.rmtree(dest, ignore_errors=True)
    report.ratio("extract", t_extract, t_cp, "cp -a", "<= 1.0x", t_extract <= t_cp)
    files = sum(len(names) for _d, _s, names in os.walk(data))
    report.value("files in the data dir", f"{files} (tree: {nfiles:,} files)", "< 500", files < 500)
    return data, store_path


def _make_file(path: Path, mib: int) -> None:
    """``mib`` MiB of incompressible bytes (AES-CTR of zeros: fast, like random)."""
    if path.exists() and path.stat().st_size == mib << 20:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f, open("/dev/zero", "rb") as zero:
        gen = subprocess.Popen(
            [need("openssl"), "enc", "-aes-128-ctr", "-pass", "pass:tvix", "-nosalt", "-pbkdf2"],
            stdin=zero,
            stdout=subprocess.PIPE,
        )
        assert gen.stdout is not None
        left = mib << 20
        while left:
            block = gen.stdout.read(min(left, 16 << 20))
            f.write(block)
            left -= len(block)
        gen.kill()
        gen.wait()


def _big_section(report: Report) -> None:
    big = HERE / "src" / "big.bin"
    _make_file(big, BIG_MIB)
    data = HERE / "bigdata"
    rss: list[int] = []

    def imp() -> float:
        fresh(data)
        t, _out, r = _tvix(data, "import", big)
        rss.append(r)
        return t

    name = f"{BIG_MIB / 1024:g} GiB file"
    t_import, t_add = _pairs(imp, lambda: _nix_add(big))
    report.ratio(
        f"{name}: import", t_import, t_add, "nix-store --add", "<= 1.0x", t_import <= t_add
    )
    _t, store_path, _r = _tvix(data, "import", big)

    def dump() -> float:
        t, _o, r = _tvix(data, "dump-path", store_path)
        rss.append(r)
        return t

    t_dump, t_nixdump = _pairs(dump, lambda: _run(need("nix-store"), "--dump", big))
    report.ratio(
        f"{name}: dump-path",
        t_dump,
        t_nixdump,
        "nix-store --dump",
        "<= 2x",
        t_dump <= 2 * t_nixdump,
    )
    print(f"  (peak RSS over these runs: {max(rss) / 1024:.0f} MB)")
    shutil.rmtree(data, ignore_errors=True)


def _huge_section(report: Report) -> None:
    huge = HERE / "src" / "huge.bin"
    _make_file(huge, 10 << 10)
    data = fresh(HERE / "hugedata")
    t, store_path, rss_import = _tvix(data, "import", huge)
    t2, _o, rss_dump = _tvix(data, "dump-path", store_path)
    report.value(
        "peak RSS: 10 GiB import",
        f"{rss_import / 1024:.0f} MB ({t:.0f} s)",
        "<= 200 MB",
        rss_import < 200 << 10,
    )
    report.value(
        "peak RSS: its dump-path",
        f"{rss_dump / 1024:.0f} MB ({t2:.0f} s)",
        "<= 200 MB",
        rss_dump < 200 << 10,
    )
    shutil.rmtree(data, ignore_errors=True)
    huge.unlink()


def _bridge_section(report: Report, tree: Path, data: Path, store_path: str) -> None:
    from bench import bench_nar_bridge as nb

    nar = HERE / "www" / "nar" / "tree.nar"
    nar.parent.mkdir(parents=True, exist_ok=True)
    with nar.open("wb") as f:
        subprocess.run([need("nix-store"), "--dump", str(tree)], stdout=f, check=True)
    mb = nar.stat().st_size / 1e6
    nb.HERE = HERE  # nginx's configuration and temporary files go here
    nginx = nb._nginx(nar.parent.parent)
    os.environ["TVIX_STORE_DATA_DIR"] = str(data)
    bridge = nb._nar_bridge()
    try:
        nginx_url = f"{nginx.url}/nar/{nar.name}"
        assert bridge.url is not None
        url = nb._nar_url(bridge.url, store_path)
        nb._download([nginx_url])
        for n in (1, 16):
            # 16 connections move 16 NARs per run: one run of each is enough.
            pairs = _pairs if n == 1 else _once
            t_ours, t_nginx = pairs(
                lambda n=n: nb._download([url] * n),  # type: ignore[misc]
                lambda n=n: nb._download([nginx_url] * n),  # type: ignore[misc]
            )
            what = f"nar-bridge NAR, {n} connection(s), disk ({mb * n / t_ours:,.0f} MB/s)"
            # Throughput ratio: nginx's time over ours.
            ok = t_nginx / t_ours >= 0.45 if n == 1 else None
            report.rows.append(
                [
                    what,
                    f"{t_ours:.2f} s",
                    f"{t_nginx:.2f} s (nginx, {mb * n / t_nginx:,.0f} MB/s)",
                    f"{t_nginx / t_ours:.2f}x of nginx's throughput",
                    ">= 0.45x" if n == 1 else "report",
                    "report" if ok is None else ("OK" if ok else "MISSED"),
                ]
            )
            print(f"  {report.rows[-1]}", flush=True)
    finally:
        bridge.stop()
        nginx.stop()
        os.environ.pop("TVIX_STORE_DATA_DIR", None)


def _mount_section(report: Report, tree: Path, data: Path, store_path: str) -> None:
    if not os.path.exists("/dev/fuse"):
        print("  (no /dev/fuse: mount skipped)")
        return
    mountpoint = HERE / "mnt"
    mountpoint.mkdir(parents=True, exist_ok=True)

    def cat_all(root: Path) -> float:
        files = [
            os.path.join(d, n)
            for d, _s, names in os.walk(root)
            for n in names
            if os.path.isfile(os.path.join(d, n)) and not os.path.islink(os.path.join(d, n))
        ]
        start = time.perf_counter()
        for i in range(0, len(files), 2000):
            subprocess.run(["cat", *files[i : i + 2000]], stdout=subprocess.DEVNULL, check=True)
        return time.perf_counter() - start

    def mounted_cat() -> float:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tvix.cli.store", "mount", str(mountpoint)],
            env=_env(data),
            stderr=subprocess.PIPE,
        )
        ready = threading.Event()

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                if b"mounted at" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        try:
            if not ready.wait(60) or proc.poll() is not None:
                sys.exit("bench: tvix-store mount did not come up")
            return cat_all(mountpoint / store_path.removeprefix("/nix/store/"))
        finally:
            proc.terminate()
            proc.wait(30)
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)

    t_mount, t_cat = _pairs(mounted_cat, lambda: cat_all(tree))
    report.ratio("FUSE cat of the tree (fresh mount)", t_mount, t_cat, "cat", "report", None)


def _s3_section(report: Report, tree: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from urllib.parse import quote

    from support.servers import postgresql, seaweedfs

    from tvix.castore.blobservice.packs import _storage as storage
    from tvix.store.composition import Composition
    from tvix.store.importer import import_path

    counts = {"put": 0, "get": 0, "put_bytes": 0}
    put, get = storage.S3Packs.append, storage.S3Packs.read

    def counting_put(
        self: storage.S3Packs, parts: list[bytes], limit: int, sync: bool = True
    ) -> tuple[str, int, int]:
        counts["put"] += 1
        counts["put_bytes"] += sum(map(len, parts))
        return put(self, parts, limit, sync)

    def counting_get(self: storage.S3Packs, pack: str, start: int, end: int) -> bytes | memoryview:
        counts["get"] += 1
        return get(self, pack, start, end)

    storage.S3Packs.append = counting_put  # type: ignore[method-assign]
    storage.S3Packs.read = counting_get  # type: ignore[method-assign]

    async def imp(urls: tuple[str, str, str]) -> float:
        async with Composition.from_urls(*urls) as c:
            blobs, dirs, infos = c.build_all()
            start = time.perf_counter()
            await import_path(blobs, dirs, infos, tree)
            return time.perf_counter() - start

    with seaweedfs() as weed, postgresql() as pg:
        os.environ.update(weed.env)
        local_times, s3_times = [], []
        for i in range(REPEATS):
            local = fresh(HERE / "s3local")
            local_times.append(
                asyncio.run(
                    imp(
                        (
                            f"packs+file://{local}/packs",
                            f"sqlite://{local}/directories.sqlite",
                            f"sqlite://{local}/pathinfo.sqlite",
                        )
                    )
                )
            )
            db = pg.create_database(f"bench{i}")
            index = quote(db, safe="")
            blob_url = f"packs+s3://{weed.bucket}/b{i}?endpoint={weed.endpoint}&index={index}"
            counts.update(put=0, get=0, put_bytes=0)
            s3_times.append(asyncio.run(imp((blob_url, db, db))))
        t_local, t_s3 = statistics.median(local_times), statistics.median(s3_times)
    report.ratio(
        "import into S3 + PostgreSQL", t_s3, t_local, "embedded", "<= 2x", t_s3 <= 2 * t_local
    )
    mib = counts["put_bytes"] / (1 << 20)
    per_mib = (counts["put"] + counts["get"]) / mib
    report.value(
        "S3 requests per MiB of new data",
        f"{per_mib:.2f} ({counts['put']} PUTs, {counts['get']} GETs, {mib:,.0f} MiB stored)",
        "<= 1",
        per_mib <= 1,
    )


def main() -> None:
    tree = default_tree()
    nfiles, nbytes = tree_stats(tree)
    HERE.mkdir(parents=True, exist_ok=True)
    print(f"tree: {tree} ({nfiles:,} files, {nbytes / 1e6:,.0f} MB); medians of {REPEATS}")
    report = Report()
    if "tree" not in SKIP:
        data, store_path = _tree_section(report, tree, nfiles)
        if "bridge" not in SKIP and shutil.which("/usr/sbin/nginx"):
            _bridge_section(report, tree, data, store_path)
        if "mount" not in SKIP:
            _mount_section(report, tree, data, store_path)
    if "big" not in SKIP:
        _big_section(report)
    if "s3" not in SKIP:
        _s3_section(report, tree)
    if "huge" not in SKIP:
        _huge_section(report)
    table(
        f"packed default store vs peers on {tree} ({nfiles:,} files, {nbytes / 1e6:,.0f} MB)",
        ["measure", "tvix", "peer", "ratio", "target", ""],
        report.rows,
    )


if __name__ == "__main__":
    main()
