"""Compressed NARs (--compression zstd|xz), judged by the real Nix in both directions."""

from __future__ import annotations

import http.client
import lzma
import urllib.request
from pathlib import Path

import pytest
import zstandard

from tests.nar_bridge.nar_bridge_support import Closure, StartBridge
from tests.support.nix import Nix
from tvix.cli.nar_bridge import ListenAddress
from tvix.nar_bridge.compression import resolve_compression


@pytest.mark.parametrize(
    ("address", "want"),
    [
        ("127.0.0.1:9000", "none"),
        ("[::1]:9000", "none"),
        ("localhost:9000", "none"),
        ("unix:///run/nb.sock", "none"),
        ("0.0.0.0:9000", "zstd"),
        ("[::]:9000", "zstd"),
        ("192.0.2.1:9000", "zstd"),
        ("cache.example.org:80", "zstd"),
    ],
)
def test_auto_compresses_unless_loopback(address: str, want: str) -> None:
    local = ListenAddress.parse(address).local
    assert resolve_compression("auto", local=local) == want
    assert resolve_compression("xz", local=True) == "xz"


def _get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers)) as r:
        return r.status, dict(r.headers), r.read()


@pytest.mark.e2e
@pytest.mark.nix
@pytest.mark.parametrize("compression", ["zstd", "xz"])
def test_nix_both_ways_compressed(
    start_bridge: StartBridge, nix: Nix, closure: Closure, tmp_path: Path, compression: str
) -> None:
    # Nix uploads compressed NARs; nar-bridge keeps their contents.
    uploader = start_bridge("--allow-upload")
    nix.run("nix", "copy", "--to", f"{uploader.url}?compression={compression}", closure.built)
    uploader.stop()

    bridge = start_bridge("--compression", compression)
    hash_part = closure.tree.removeprefix("/nix/store/")[:32]
    _, _, raw = _get(f"{bridge.url}/{hash_part}.narinfo")
    fields = dict(line.split(": ", 1) for line in raw.decode().splitlines() if ": " in line)
    ext = {"zstd": ".zst", "xz": ".xz"}[compression]
    assert fields["Compression"] == compression
    assert fields["URL"].split("?")[0].endswith(".nar" + ext)
    # Unknown until compressed: left out rather than made up.
    assert "FileHash" not in fields
    assert "FileSize" not in fields

    # What is served is the NAR, compressed as the narinfo says; sent whole.
    status, headers, body = _get(f"{bridge.url}/{fields['URL']}", Range="bytes=100-")
    assert status == 200
    assert headers["Accept-Ranges"] == "none"
    if compression == "zstd":
        nar = zstandard.ZstdDecompressor().stream_reader(body).read()
    else:
        nar = lzma.decompress(body)
    dump = nix.dump(nix.store_file(closure.tree))
    assert nar == dump
    assert len(body) < len(nar)
    # A NAR not of the claimed hash never arrives whole: the stream is cut.
    assert "&narhash=" in fields["URL"]
    bad = fields["URL"].split("&narhash=")[0] + "&narhash=" + "0" * 52
    with pytest.raises(http.client.IncompleteRead):
        _get(f"{bridge.url}/{bad}")
    # The uncompressed URL still serves ranges.
    plain = fields["URL"].replace(f"{compression}/", "").replace(".nar" + ext, "")
    status, _, part = _get(f"{bridge.url}/{plain}", Range="bytes=100-")
    assert status == 206
    assert part == dump[100:]

    # Nix substitutes the whole closure through the compressed NARs.
    dest = tmp_path / "dest"
    nix.run(
        "nix",
        "copy",
        "--no-check-sigs",
        "--from",
        bridge.url,
        "--to",
        f"local?root={dest}",
        closure.built,
    )
    for path in closure.paths:
        got = nix.path_info_json(path, store=f"local?root={dest}")
        assert got["narHash"] == nix.path_info_json(path)["narHash"]
    assert f"GET /nar/tvix-castore/{compression}/" in bridge.logged()
