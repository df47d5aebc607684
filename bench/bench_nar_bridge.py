"""nar-bridge serving one large NAR and narinfos, next to nginx serving the same bytes.

The NAR is that of a real tree (:func:`bench.common.default_tree`, ~50k
files, ~830 MB), imported once into an embedded store in ``bench/.work``.
nginx (``/usr/sbin/nginx``, foreground, ``sendfile on``) serves the same
NAR as a static file on another loopback port. Two nar-bridge setups:

* ``disk``: the embedded store as ``tvix-store`` leaves it (objectstore+file
  blobs, SQLite metadata) -- every request renders the NAR from the chunk files;
* ``mem-cached``: the same store behind a composition that caches blobs in
  memory (``type = "cache"``, near ``memory``), warmed by one download: what
  nar-bridge itself costs, rendering and HTTP, without the blob backend.

Clients are ``curl -s -o /dev/null`` processes (C, one per connection), so
the client is not the bottleneck; 16 connections are 16 concurrent curls.
narinfo rate: one ``curl --parallel --parallel-max 16`` process fetching
the same narinfo N times over keep-alive connections.

Target: ``mem-cached`` with one connection at least 0.45x nginx. (The
``disk`` numbers are bound by the blob backend, the same speed as
``tvix-store dump-path``.)
"""

from __future__ import annotations

import re
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import WORK, Server, default_tree, need, table, tvix_store

HERE = WORK / "nar_bridge"
DATA = HERE / "data"
NGINX_CONF = """daemon off;
worker_processes 2;
pid {dir}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  types {{ }}
  default_type application/octet-stream;
  server {{ listen 127.0.0.1:{port}; root {root}; }}
}}
"""
CACHED_COMPOSITION = """[blobservices.default]
type = "cache"
near = "mem"
far = "disk"
[blobservices.mem]
type = "memory"
[blobservices.disk]
type = "objectstore"
url = "objectstore+file://{data}/blobs"
[directoryservices.default]
type = "sqlite"
path = "{data}/directories.sqlite"
[pathinfoservices.default]
type = "sqlite"
path = "{data}/pathinfo.sqlite"
"""
NARINFO_REQUESTS = 5000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _import(tree: Path) -> str:
    """The store path of ``tree`` in the bench store, importing it the first time."""
    marker = HERE / "imported"
    if marker.exists() and (DATA / "pathinfo.sqlite").exists():
        recorded_tree, store_path = marker.read_text().split("\n")[:2]
        if recorded_tree == str(tree):
            return store_path
    print(f"importing {tree} into {DATA} (once)...", flush=True)
    out = HERE / "import.out"
    with out.open("wb") as f:
        tvix_store(DATA, "import", tree, "--name", "bench-tree", stdout=f.fileno())
    store_path = out.read_text().strip()
    marker.write_text(f"{tree}\n{store_path}\n")
    return store_path


def _static_nar(tree: Path) -> Path:
    nar = HERE / "www" / "nar" / "tree.nar"
    if not nar.exists():
        nar.parent.mkdir(parents=True, exist_ok=True)
        with nar.open("wb") as f:
            subprocess.run([need("nix-store"), "--dump", str(tree)], stdout=f, check=True)
    return nar


def _nginx(root: Path) -> Server:
    conf_dir = HERE / "nginx"
    conf_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    conf = conf_dir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=conf_dir, port=port, root=root))
    server = Server(
        [need("/usr/sbin/nginx"), "-c", str(conf), "-p", str(conf_dir)],
        url=f"http://127.0.0.1:{port}",
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return server
        time.sleep(0.05)
    sys.exit("bench: nginx did not start")


def _nar_bridge(*store: str) -> Server:
    env_args = [sys.executable, "-m", "tvix.cli.nar_bridge", "--listen-address", "127.0.0.1:0"]
    return Server([*env_args, *store], r"listening on (http://\S+)")


def _download(urls: list[str]) -> float:
    """Seconds for one curl per URL, all at once; checks every byte arrived."""
    curl = need("curl")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [curl, "-sf", "-o", "/dev/null", "-w", "%{size_download}", url],
            stdout=subprocess.PIPE,
        )
        for url in urls
    ]
    sizes = [int(p.communicate()[0] or 0) for p in procs]
    elapsed = time.perf_counter() - start
    if any(p.returncode for p in procs):
        sys.exit(f"bench: a download failed: {urls[0]}")
    return elapsed if len(set(sizes)) == 1 else float("nan")


def _narinfo_rate(url: str) -> float:
    """narinfo responses per second: one parallel curl, keep-alive connections."""
    config = HERE / "narinfo.curl"
    config.write_text(f'url = "{url}"\noutput = "/dev/null"\n' * NARINFO_REQUESTS)
    start = time.perf_counter()
    subprocess.run(
        [
            need("curl"),
            "-sf",
            "--no-progress-meter",
            "--parallel",
            "--parallel-max",
            "16",
            "-K",
            str(config),
        ],
        check=True,
    )
    return NARINFO_REQUESTS / (time.perf_counter() - start)


def _narinfo_url(base: str, store_path: str) -> str:
    return f"{base}/{store_path.removeprefix('/nix/store/')[:32]}.narinfo"


def _nar_url(base: str, store_path: str) -> str:
    out = subprocess.run(
        [need("curl"), "-sf", _narinfo_url(base, store_path)], capture_output=True, check=True
    ).stdout.decode()
    match = re.search(r"^URL: (\S+)$", out, re.M)
    assert match, out
    return f"{base}/{match[1]}"


def main() -> None:
    tree = default_tree()
    HERE.mkdir(parents=True, exist_ok=True)
    store_path = _import(tree)
    nar = _static_nar(tree)
    size = nar.stat().st_size
    mb = size / 1e6
    disk_args = [
        "--blob-service-addr",
        f"objectstore+file://{DATA}/blobs",
        "--directory-service-addr",
        f"sqlite://{DATA}/directories.sqlite",
        "--path-info-service-addr",
        f"sqlite://{DATA}/pathinfo.sqlite",
    ]
    composition = HERE / "cached.toml"
    composition.write_text(CACHED_COMPOSITION.format(data=DATA))

    rows: list[list[str]] = []
    results: dict[str, float] = {}

    def measure(name: str, url: str, connections: int, repeats: int) -> None:
        times = [_download([url] * connections) for _ in range(repeats)]
        t = statistics.median(times)
        rate = mb * connections / t
        results[f"{name}/{connections}"] = rate
        rows.append([name, str(connections), f"{t:.2f} s", f"{rate:,.0f} MB/s"])
        print(f"  {name}, {connections} connection(s): {rate:,.0f} MB/s", flush=True)

    nginx = _nginx(nar.parent.parent)
    try:
        nginx_url = f"{nginx.url}/nar/{nar.name}"
        _download([nginx_url])  # page cache warm
        measure("nginx (static file)", nginx_url, 1, 3)
        measure("nginx (static file)", nginx_url, 16, 1)
        static_narinfo = nar.parent.parent / "x.narinfo"
        static_narinfo.write_text("StorePath: /nix/store/x\n" * 20)
        nginx_narinfo = _narinfo_rate(f"{nginx.url}/x.narinfo")
    finally:
        nginx.stop()

    bridge = _nar_bridge(*disk_args)
    try:
        assert bridge.url is not None
        url = _nar_url(bridge.url, store_path)
        measure("nar-bridge disk", url, 1, 1)
        bridge_narinfo = _narinfo_rate(_narinfo_url(bridge.url, store_path))
    finally:
        bridge.stop()

    bridge = _nar_bridge("--store-composition", str(composition))
    try:
        assert bridge.url is not None
        url = _nar_url(bridge.url, store_path)
        _download([url])  # fills the memory cache
        measure("nar-bridge mem-cached", url, 1, 3)
        measure("nar-bridge mem-cached", url, 16, 1)
    finally:
        bridge.stop()

    nginx1 = results["nginx (static file)/1"]
    nginx16 = results["nginx (static file)/16"]
    for row in rows:
        base = nginx1 if row[1] == "1" else nginx16
        rate = results[f"{row[0]}/{row[1]}"]
        row.append(f"{rate / base:.2f}x")
    table(
        f"one NAR of {tree} ({mb:,.0f} MB), curl clients",
        ["server", "connections", "time", "throughput", "vs nginx"],
        rows,
    )
    table(
        f"narinfo requests ({NARINFO_REQUESTS} over 16 keep-alive connections)",
        ["server", "requests/s"],
        [
            ["nginx (static file)", f"{nginx_narinfo:,.0f}"],
            ["nar-bridge (SQLite PathInfo)", f"{bridge_narinfo:,.0f}"],
        ],
    )
    ratio = results["nar-bridge mem-cached/1"] / nginx1
    verdict = "OK" if ratio >= 0.45 else "MISSED"
    print(f"\ntarget: nar-bridge (mem-cached) >= 0.45x nginx, 1 connection: {ratio:.2f}x {verdict}")
    disk = results["nar-bridge disk/1"] / nginx1
    print(f"(disk store: {disk:.2f}x nginx, bound by the blob backend's per-blob cost)")


if __name__ == "__main__":
    main()
