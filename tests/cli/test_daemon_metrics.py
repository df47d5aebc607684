"""``tvix-store daemon --metrics-listen-address``: gRPC calls counted by method and status."""

from __future__ import annotations

import signal
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemons import cli_env, daemon, tvix_store
from tests.support.servers import free_ports
from tests.support.trees import make_tree

pytestmark = [pytest.mark.e2e]


def _handled(url: str) -> dict[tuple[str, str, str], float]:
    with urllib.request.urlopen(url) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "grpc_server_handled_total":
                key = (s.labels["grpc_service"], s.labels["grpc_method"], s.labels["grpc_code"])
                out[key] = s.value
    return out


def test_daemon_metrics(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    tree = make_tree(tmp_path / "tree", big_size=1000)
    args = ("--metrics-listen-address", f"127.0.0.1:{port}")
    with daemon(data_dir=tmp_path / "data", extra_args=args) as (proc, url):
        env = cli_env(url)
        path = tvix_store("import", tree, env=env).stdout.decode().strip()
        tvix_store("path-info", path, env=env)
        missing = path.replace(path[11:16], "00000")
        assert tvix_store("path-info", missing, env=env, check=False).returncode != 0
        handled = _handled(f"http://127.0.0.1:{port}/metrics")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    pathinfo = "tvix.store.v1.PathInfoService"
    assert handled[(pathinfo, "Put", "OK")] == 1
    assert handled[(pathinfo, "Get", "OK")] >= 1
    assert handled[(pathinfo, "Get", "NOT_FOUND")] >= 1
    assert handled[("tvix.castore.v1.BlobService", "Put", "OK")] >= 1


def test_daemon_metrics_off_by_default(tmp_path: Path) -> None:
    with daemon(data_dir=tmp_path / "data") as (proc, _url):
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert b"metrics" not in err
