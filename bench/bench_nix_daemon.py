"""``tvix-store nix-daemon`` as Nix 2.8 uses it: copies and path-info latency, same run.

The tree is :func:`bench.common.default_tree` (this Python's stdlib, ~50k
files, ~820 MB), added once with ``nix-store --add`` to a chroot store
(``bench/.work/nix_daemon/src``). Each run:

* upload: ``nix copy --to unix://S`` into an empty embedded tvix store
  (AddMultipleToStore), next to ``nix copy`` between two chroot stores;
* download, each into a fresh chroot store, median of ``TVIX_BENCH_REPEATS``
  (default 3) taken round-robin: from the chroot store (Nix alone), from nar-bridge over HTTP,
  from the daemon over ``ssh-ng://`` (a stand-in ``ssh`` runs
  ``tvix-store nix-daemon --stdio``; Nix asks for the NAR with NarFromPath),
  the same from Nix's own ``nix-daemon --stdio`` over the chroot store (the
  reference for the worker protocol as Nix's client consumes it), and from ``unix://S``
  with the files under a ``tvix-store mount`` (Nix's unix:// store reads
  files from the file system, only metadata from the daemon);
* the NAR alone (``nix store dump-path``, nothing written to disk) from
  nar-bridge and over ssh-ng, to tell the protocol's cost from Nix's;
* ``nix path-info`` wall time per call (process start included), median of 20.

Target (issue 18): worker-protocol copy at least as fast as the HTTP path.
"""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK, Server, default_tree, fresh, need, nix_env, table

HERE = WORK / "nix_daemon"
SRC = HERE / "src"
DATA = HERE / "data"
PATH_INFO_CALLS = 20


def _store_args() -> list[str]:
    return [
        "--blob-service-addr",
        f"objectstore+file://{DATA}/blobs",
        "--directory-service-addr",
        f"sqlite://{DATA}/directories.sqlite",
        "--path-info-service-addr",
        f"sqlite://{DATA}/pathinfo.sqlite",
    ]


def _server(argv: list[str], pattern: str) -> Server:
    """A server started without the caller's TVIX_/NIX_ settings (they would point it elsewhere)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TVIX_", "NIX_"))}
    return Server(argv, pattern, env=env)


def _tvix(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "tvix.cli.store", *map(str, args)]


def _run(env: dict[str, str], *argv: str | Path) -> str:
    proc = subprocess.run([str(a) for a in argv], env=env, capture_output=True)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(map(str, argv))} failed:\n{proc.stderr.decode()}")
    return proc.stdout.decode()


def _timed(env: dict[str, str], *argv: str | Path) -> float:
    start = time.perf_counter()
    _run(env, *argv)
    return time.perf_counter() - start


def _timed_to_null(env: dict[str, str], *argv: str | Path) -> float:
    """Like :func:`_timed`, the output going to /dev/null (a NAR does not fit in a pipe buffer)."""
    start = time.perf_counter()
    proc = subprocess.run([str(a) for a in argv], env=env, stdout=subprocess.DEVNULL)
    if proc.returncode:
        sys.exit(f"bench: {' '.join(map(str, argv))} failed")
    return time.perf_counter() - start


def _source(env: dict[str, str], tree: Path) -> str:
    marker = HERE / "added"
    if marker.exists() and marker.read_text().split("\n")[0] == str(tree):
        return marker.read_text().split("\n")[1]
    print(f"adding {tree} to the chroot store {SRC} (once)...", flush=True)
    fresh(SRC)
    path = _run(env, "nix-store", "--store", f"local?root={SRC}", "--add", tree).strip()
    marker.write_text(f"{tree}\n{path}\n")
    return path


def _rm(path: Path) -> None:
    if path.exists():
        subprocess.run(["chmod", "-R", "u+w", str(path)], check=False)
        shutil.rmtree(path)


def main() -> None:
    need("nix")
    repeats = int(os.environ.get("TVIX_BENCH_REPEATS", "3"))
    tree = default_tree()
    HERE.mkdir(parents=True, exist_ok=True)
    env = nix_env(HERE / "nix")
    env["NIX_CONFIG"] += "\nexperimental-features = nix-command\nrequire-sigs = false"
    path = _source(env, tree)
    size = int(
        _run(env, "nix", "path-info", "--store", f"local?root={SRC}", "--json", path)
        .split('"narSize":')[1]
        .split(",")[0]
    )
    mb = size / 1e6
    dest = HERE / "dest"
    sock = HERE / "daemon.sock"
    mnt = HERE / "mnt"
    # ssh-ng://HOST runs "ssh HOST nix-daemon --stdio"; this ssh runs our daemon so.
    bin_dir = HERE / "bin"
    bin_dir.mkdir(exist_ok=True)
    argv = _tvix("nix-daemon", "--stdio", *_store_args())
    (bin_dir / "ssh").write_text(f"#!/bin/sh\nexec {shlex.join(argv)}\n")
    (bin_dir / "ssh").chmod(0o755)
    ssh_env = dict(env, PATH=f"{bin_dir}:{env['PATH']}")
    # The reference: Nix's own daemon, serving the chroot store the same way.
    nix_bin = HERE / "bin-nix"
    nix_bin.mkdir(exist_ok=True)
    nix_daemon = [need("nix-daemon"), "--stdio", "--option", "store", f"local?root={SRC}"]
    (nix_bin / "ssh").write_text(f"#!/bin/sh\nexec {shlex.join(nix_daemon)}\n")
    (nix_bin / "ssh").chmod(0o755)
    nix_ssh_env = dict(env, PATH=f"{nix_bin}:{env['PATH']}")

    rows: list[list[str]] = []

    def row(name: str, seconds: float) -> float:
        rows.append([name, f"{seconds:.1f} s", f"{mb / seconds:,.0f} MB/s"])
        return seconds

    # -- upload --
    _rm(dest)
    print("  upload: chroot -> chroot ...", flush=True)
    base_up = row(
        "upload: nix copy chroot -> chroot",
        _timed(
            env, "nix", "copy", "--from", f"local?root={SRC}", "--to", f"local?root={dest}", path
        ),
    )
    _rm(DATA)
    fresh(DATA)
    daemon = _server(
        _tvix("nix-daemon", "--listen-address", f"unix://{sock}", *_store_args()), "listening on"
    )
    mount = None
    bridge = None
    try:
        up = row(
            "upload: nix copy --to unix://S (AddMultipleToStore)",
            _timed(
                env, "nix", "copy", "--from", f"local?root={SRC}", "--to", f"unix://{sock}", path
            ),
        )
        (mnt / "nix" / "store").mkdir(parents=True, exist_ok=True)
        mount = _server(_tvix("mount", *_store_args(), mnt / "nix" / "store"), "mounted at")
        bridge = _server(
            [
                sys.executable,
                "-m",
                "tvix.cli.nar_bridge",
                "--listen-address",
                "127.0.0.1:0",
                *_store_args(),
            ],
            r"listening on (http://\S+)",
        )
        assert bridge.match is not None
        http = bridge.match[1]

        # -- download --
        sources = [
            ("nix copy --from chroot store", env, f"local?root={SRC}"),
            ("nix copy --from nar-bridge (HTTP)", env, http),
            ("nix copy --from ssh-ng:// (--stdio, NarFromPath)", ssh_env, "ssh-ng://tvix"),
            ("nix copy --from ssh-ng:// Nix's nix-daemon --stdio", nix_ssh_env, "ssh-ng://nix"),
            ("nix copy --from unix://S?root=MOUNT", env, f"unix://{sock}?root={mnt}"),
        ]
        # Round-robin, so that the load of a shared machine falls on all alike.
        times: dict[str, list[float]] = {name: [] for name, _, _ in sources}
        for _ in range(repeats):
            for name, e, url in sources:
                _rm(dest)
                times[name].append(
                    _timed(
                        e,
                        "nix",
                        "copy",
                        "--no-check-sigs",
                        "--from",
                        url,
                        "--to",
                        f"local?root={dest}",
                        path,
                    )
                )
                print(f"  {name}: {times[name][-1]:.1f} s", flush=True)
        medians = {name: statistics.median(copies) for name, copies in times.items()}
        for name, median in medians.items():
            row(name, median)
        _rm(dest)

        # -- the NAR alone, no files written: what each protocol costs --
        dumps = [
            ("NAR only: nix store dump-path, nar-bridge (HTTP)", env, http),
            ("NAR only: nix store dump-path, ssh-ng:// (--stdio)", ssh_env, "ssh-ng://tvix"),
            (
                "NAR only: nix store dump-path, ssh-ng:// Nix's nix-daemon",
                nix_ssh_env,
                "ssh-ng://nix",
            ),
        ]
        dump_times: dict[str, list[float]] = {name: [] for name, _, _ in dumps}
        for _ in range(repeats):
            for name, e, url in dumps:
                dump_times[name].append(
                    _timed_to_null(e, "nix", "store", "dump-path", "--store", url, path)
                )
                print(f"  {name}: {dump_times[name][-1]:.1f} s", flush=True)
        for name, dump in dump_times.items():
            row(name, statistics.median(dump))

        # -- latency --
        latency = []
        for name, url in (
            ("chroot store", f"local?root={SRC}"),
            ("nar-bridge (HTTP)", http),
            ("unix://S (nix-daemon)", f"unix://{sock}"),
        ):
            calls = [
                _timed(env, "nix", "path-info", "--store", url, path)
                for _ in range(PATH_INFO_CALLS)
            ]
            latency.append([name, f"{statistics.median(calls) * 1000:.0f} ms"])
    finally:
        for p in (bridge, mount, daemon):
            if p is not None:
                p.stop()

    table(
        f"copies of {tree} ({mb:,.0f} MB NAR), median of {repeats} for downloads",
        ["what", "time", "NAR rate"],
        rows,
    )
    table(f"nix path-info, median of {PATH_INFO_CALLS} calls", ["store", "wall time"], latency)
    worker = medians["nix copy --from ssh-ng:// (--stdio, NarFromPath)"]
    http_t = medians["nix copy --from nar-bridge (HTTP)"]
    reference = medians["nix copy --from ssh-ng:// Nix's nix-daemon --stdio"]
    verdict = "OK" if worker <= http_t else "MISSED"
    print(f"tvix-store nix-daemon vs Nix's own daemon, same client path: {reference / worker:.2f}x")
    print(
        f"\ntarget: worker-protocol copy at least as fast as HTTP: {http_t / worker:.2f}x {verdict}"
    )
    print(f"upload through the daemon: {base_up / up:.2f}x the chroot-to-chroot copy")


if __name__ == "__main__":
    main()
