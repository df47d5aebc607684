"""``tvix-store virtiofs`` against QEMU's reference ``virtiofsd``, inside the same micro-VM.

The guest (see ``tests/support/microvm.py``: QEMU q35, Debian cloud kernel,
busybox) mounts the share at ``/nix/store`` and runs, timed on the host by
its console lines (the guest's clock drifts under emulation):

* ``cat`` of a 256 MiB file to ``/dev/null`` (sequential read, cold), then
  again (warm: the guest's page cache, which keep_cache lets it keep);
* ``find`` over a tree of a few thousand small files, then ``cat`` of all
  of them (metadata plus small reads).

Ours serves the embedded store in a data directory; the reference (C
``virtiofsd`` 7.2 from ``qemu-system-common``, ``cache=auto``) serves the
same tree extracted on disk. On machines without usable KVM the guest is
emulated (TCG), which makes everything slow; the ratio still says what our
side costs. Target: at least 0.5x the reference's throughput.
``TVIX_BENCH_REPEATS`` boots per backend (default 3; medians shown).
"""

from __future__ import annotations

import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.common import WORK, fresh, mbps, rate, table
from tests.support.microvm import assets, missing_tools, run_vm

BIG = 256 << 20
DIRS = 40
FILES_PER_DIR = 50  # 2,000 small files
REFERENCE = Path("/usr/lib/qemu/virtiofsd")

GUEST = """
cat {name}/big.bin > /dev/null; echo "@@ big-cold"
cat {name}/big.bin > /dev/null; echo "@@ big-warm"
echo "@@ found $(find {name}/small | wc -l)"
find {name}/small -type f -exec cat {{}} + > /dev/null; echo "@@ small-read"
"""


def _make_tree(root: Path) -> None:
    fresh(root)
    with (root / "big.bin").open("wb") as f:
        for _ in range(BIG // (1 << 20)):
            f.write(os.urandom(1 << 20))
    for d in range(DIRS):
        sub = root / "small" / f"d{d:03d}"
        sub.mkdir(parents=True)
        for i in range(FILES_PER_DIR):
            (sub / f"f{i:03d}").write_bytes(os.urandom(200 + 37 * i))


@contextmanager
def _backend(argv: list[str], socket: Path, ready: bytes | None) -> Iterator[None]:
    socket.unlink(missing_ok=True)
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    assert proc.stderr is not None
    try:
        deadline = time.monotonic() + 30
        while not socket.exists() or ready is not None:
            if time.monotonic() > deadline or proc.poll() is not None:
                sys.exit(f"bench: {argv[0]} did not start")
            if ready is not None:
                r, _, _ = select.select([proc.stderr], [], [], 0.5)
                if r and re.search(ready, proc.stderr.readline()):
                    break
            else:
                time.sleep(0.05)
        time.sleep(0.2)  # the C daemon binds before it listens
        yield
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def build_store() -> tuple[Path, Path, str]:
    """The tree (in ``src``) imported into an embedded store: both, and its base name."""
    work = fresh(WORK / "virtiofs")
    src = work / "src"
    print("bench virtiofs: building a 256 MiB file and 2,000 small files", flush=True)
    _make_tree(src)
    data_dir = work / "store"
    out = subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", "import", str(src)],
        check=True,
        capture_output=True,
        env=dict(os.environ, TVIX_STORE_DATA_DIR=str(data_dir)),
    ).stdout.decode()
    return src, data_dir, out.split()[-1].rsplit("/", 1)[1]


def main() -> None:
    missing = missing_tools()
    if missing:
        sys.exit(f"bench: cannot boot a VM: install {' '.join(missing)} (./dev setup does)")
    vm = assets()
    repeats = int(os.environ.get("TVIX_BENCH_REPEATS", "3"))
    src, data_dir, name = build_store()
    work = src.parent
    share = work / "share"
    fresh(share)
    shutil.copytree(src, share / name, copy_function=os.link)

    socket = work / "vfs.sock"
    backends: dict[str, list[str]] = {
        "tvix-store virtiofs": [
            sys.executable,
            "-m",
            "tvix.cli.store",
            "virtiofs",
            "--data-dir",
            str(data_dir),
            str(socket),
        ],
    }
    if REFERENCE.exists():
        backends["virtiofsd (C, QEMU 7.2)"] = [
            str(REFERENCE),
            f"--socket-path={socket}",
            "-o",
            f"source={share}",
            "-o",
            "cache=auto",
        ]
    else:
        print(f"bench virtiofs: no reference daemon at {REFERENCE} (qemu-system-common)")
    results: dict[str, dict[str, list[float]]] = {}
    accel = "?"
    for label, argv in backends.items():
        ready = rb"listening at" if label.startswith("tvix") else None
        phases: dict[str, list[float]] = {k: [] for k in ("boot", "cold", "warm", "find", "cat")}
        for _ in range(repeats):
            with _backend(argv, socket, ready):
                r = run_vm(socket, vm, GUEST.format(name=name), work)
            accel = r.accel
            if "small-read" not in r.lines:
                sys.exit(f"bench: the guest did not finish with {label}:\n{r.console[-3000:]}")
            t = r.time_of
            found = next(line for line in r.lines if line.startswith("found "))
            phases["boot"].append(t("mounted"))
            phases["cold"].append(t("big-cold") - t("mounted"))
            phases["warm"].append(t("big-warm") - t("big-cold"))
            phases["find"].append(t(found) - t("big-warm"))
            phases["cat"].append(t("small-read") - t(found))
        results[label] = phases
    entries = DIRS * FILES_PER_DIR + DIRS + 1
    rows = []
    for label, phases in results.items():
        med = {k: statistics.median(v) for k, v in phases.items()}
        rows.append(
            [
                label,
                f"{med['boot']:.1f} s",
                mbps(BIG, med["cold"]),
                mbps(BIG, med["warm"]),
                rate(entries, med["find"], " entries/s"),
                rate(DIRS * FILES_PER_DIR, med["cat"], " files/s"),
            ]
        )
    table(
        f"virtiofs, guest side ({accel}, median of {repeats} boots; load {os.getloadavg()[0]:.1f})",
        ["backend", "boot to mount", "256 MiB cold", "256 MiB warm", "find", "cat small files"],
        rows,
    )
