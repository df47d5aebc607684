"""Shared helpers: timing (median of repeats), peers, and the comparison table."""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work"


def default_tree() -> Path:
    """A real tree of tens of thousands of files: this Python's library directory."""
    env = os.environ.get("TVIX_BENCH_TREE")
    if env:
        return Path(env)
    return Path(sysconfig.get_paths(vars={"base": sys.base_prefix})["stdlib"])


def tree_stats(root: Path) -> tuple[int, int]:
    """(regular files, bytes) below ``root``."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if os.path.isfile(os.path.join(dirpath, name)) and not os.path.islink(
                os.path.join(dirpath, name)
            ):
                files += 1
                size += st.st_size
    return files, size


def timed(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median wall time of ``repeats`` runs of ``fn`` (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_quiet(*argv: str | Path, env: dict[str, str] | None = None) -> None:
    """Run a command, its output discarded; raise if it fails."""
    subprocess.run([str(a) for a in argv], check=True, stdout=subprocess.DEVNULL, env=env)


def need(tool: str) -> str:
    """The path of ``tool``; exit with a clear message when it is missing."""
    path = shutil.which(tool)
    if path is None:
        sys.exit(f"bench: {tool} is not installed (./dev setup installs it)")
    return path


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """Print a plain text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def rate(n: float, seconds: float, unit: str = "") -> str:
    return f"{n / seconds:,.0f}{unit}"


def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s"


def nix_env(workdir: Path) -> dict[str, str]:
    """An environment in which Nix uses only ``workdir`` (see tests/support/nix.py)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "nix.conf").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
    env.update(
        HOME=str(workdir),
        NIX_CONF_DIR=str(workdir),
        NIX_USER_CONF_FILES=str(workdir / "nix.conf"),
        XDG_CACHE_HOME=str(workdir / "cache"),
        NIX_STATE_DIR=str(workdir / "state"),
        NIX_LOG_DIR=str(workdir / "log"),
        NIX_CONFIG=f"store = local?root={workdir}/unused\nsubstituters =\nbuild-users-group =\n"
        "fsync-metadata = false",
    )
    return env


def tvix_store(data_dir: Path, *args: str | Path, stdout: int | None = None) -> None:
    """Run ``tvix-store ARGS`` on the embedded store in ``data_dir``."""
    env = dict(os.environ, TVIX_STORE_DATA_DIR=str(data_dir))
    for var in ("BLOB_SERVICE_ADDR", "DIRECTORY_SERVICE_ADDR", "PATH_INFO_SERVICE_ADDR"):
        env.pop(var, None)
    subprocess.run(
        [sys.executable, "-m", "tvix.cli.store", *map(str, args)],
        check=True,
        env=env,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
    )


def fresh(path: Path) -> Path:
    """``path``, emptied."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk below ``path``."""
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def median_of(fn: Callable[[], float], repeats: int = 3) -> float:
    """Median of ``repeats`` results of ``fn`` (which times itself, e.g. after a setup)."""
    return statistics.median(fn() for _ in range(repeats))


class Server:
    """A server process, ready once it printed ``pattern`` on stderr (``None``: at once).

    ``url``: the one given, else the pattern's first group (a printed address).
    stderr keeps being drained so the server never blocks on a full pipe.
    """

    def __init__(
        self,
        argv: list[str],
        pattern: str | None = None,
        *,
        url: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.proc = subprocess.Popen(
            argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env
        )
        self.match: re.Match[str] | None = None
        self.url = url
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                m = re.search(pattern, raw.decode(errors="replace")) if pattern else None
                if m and self.match is None:
                    self.match = m
                    if self.url is None and m.groups():
                        self.url = m[1]
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if pattern is not None:
            ready.wait(60)
            if self.match is None:
                sys.exit(f"bench: {' '.join(argv[:5])} did not start")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 30 s."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
