"""Idle and trickling connections are closed; others are served meanwhile (issue 13)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.parse
import urllib.request

import pytest

from tests.nar_bridge.nar_bridge_support import StartBridge

pytestmark = pytest.mark.e2e


def test_slowloris_connections_are_cut_and_others_served(start_bridge: StartBridge) -> None:
    bridge = start_bridge("--header-timeout", "3")
    where = urllib.parse.urlsplit(bridge.url)
    assert where.hostname is not None
    assert where.port is not None
    address = (where.hostname, where.port)
    request = b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    conns = [socket.create_connection(address, timeout=30) for _ in range(100)]
    closed_after: dict[int, float] = {}
    start = time.monotonic()
    stop = threading.Event()

    def trickle() -> None:
        # Headers byte by byte, each connection one byte every 0.2 s, never finished.
        for byte in request:
            for i, conn in enumerate(conns):
                if i in closed_after:
                    continue
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    closed_after[i] = time.monotonic() - start
            if stop.wait(0.2) or len(closed_after) == len(conns):
                return

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        # Meanwhile others are served, promptly.
        for _ in range(10):
            t = time.monotonic()
            with urllib.request.urlopen(bridge.url + "/nix-cache-info", timeout=10) as r:
                assert b"StoreDir: /nix/store" in r.read()
            assert time.monotonic() - t < 5
            time.sleep(0.2)
        # Every trickling connection is closed by the server soon after the timeout.
        for i, conn in enumerate(conns):
            conn.settimeout(max(0.1, 15 - (time.monotonic() - start)))
            try:
                while conn.recv(4096):
                    pass  # a 408 answer, if any, then the end
            except TimeoutError:
                pytest.fail(f"connection {i} still open after {time.monotonic() - start:.1f} s")
            except OSError:
                pass  # reset: closed too
        assert time.monotonic() - start < 15
    finally:
        stop.set()
        sender.join(timeout=10)
        for conn in conns:
            conn.close()
    # And the server still serves.
    with urllib.request.urlopen(bridge.url + "/nix-cache-info", timeout=10) as r:
        assert r.status == 200
