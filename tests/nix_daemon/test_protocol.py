"""The worker protocol spoken by hand: versions, operations, and hostile clients."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from tests.nix_daemon.daemon_support import (
    OP_ADD_MULTIPLE_TO_STORE,
    OP_ADD_SIGNATURES,
    OP_ADD_TEXT_TO_STORE,
    OP_ADD_TO_STORE,
    OP_BUILD_PATHS,
    OP_QUERY_VALID_PATHS,
    V1_34,
    DaemonError,
    InProcess,
    Nar,
    RawClient,
    framed,
    nar_of,
)
from tvix.nix_daemon import wire
from tvix.nixcompat import SigningKey, StorePath, fingerprint


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"hello\n")
    (root / "sub" / "big").write_bytes(bytes(range(256)) * 1000)
    (root / "link").symlink_to("a")
    return root


async def _add(client: RawClient, nar: Nar, **kw: object) -> None:
    client.send(client.add_to_store_nar_args(nar.path, nar.data, ca=nar.ca, **kw), framed(nar.data))  # type: ignore[arg-type]
    await client.result()


async def test_handshake_versions(daemon: InProcess) -> None:
    c = await daemon.client(V1_34)
    assert c.version == V1_34
    assert c.daemon_version.startswith("2.8.0-tvix")
    assert c.trusted is None  # 1.34 has no trust field
    newer = await daemon.client(1 << 8 | 38)
    assert newer.version == wire.PROTOCOL_VERSION == 1 << 8 | 35
    assert newer.trusted == 1
    assert await newer.is_valid("/nix/store/00000000000000000000000000000000-x") is False
    with pytest.raises(DaemonError, match="too old"):
        await daemon.client(1 << 8 | 20)


async def test_add_query_and_read_back(daemon: InProcess, tree: Path) -> None:
    nar = nar_of(tree)
    c = await daemon.client()
    assert await c.path_info(nar.path) is None
    await _add(c, nar)
    assert await c.is_valid(nar.path)
    info = await c.path_info(nar.path)
    assert info is not None
    assert info["narHash"] == nar.sha256.hex()
    assert info["narSize"] == len(nar.data)
    assert info["ca"] == nar.ca
    assert await c.nar_from_path(nar.path, len(nar.data)) == nar.data
    c.send(wire.enc_u64(OP_QUERY_VALID_PATHS), wire.enc_strings([nar.path, nar.path + "x"]))
    c.send(wire.enc_u64(0))
    await c.result()
    assert await c.strings() == [nar.path]


async def test_lying_nar_hash_stores_nothing_and_connection_goes_on(
    daemon: InProcess, tree: Path
) -> None:
    nar = nar_of(tree)
    c = await daemon.client()
    # A NAR hash that is not the NAR's, for a path whose CA would be right.
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(DaemonError, match="hash mismatch importing path"):
        await _add(c, nar, nar_hash=wrong)
    with pytest.raises(DaemonError, match="size mismatch"):
        await _add(c, nar, nar_size=len(nar.data) - 8)
    # A CA that does not give this store path.
    other_ca = "fixed:r:sha256:" + hashlib.sha256(b"other").hexdigest()
    c.send(c.add_to_store_nar_args(nar.path, nar.data, ca=other_ca), framed(nar.data))
    with pytest.raises(DaemonError, match="does not match its content address"):
        await c.result()
    # Right claims for a NAR that is not the one sent.
    (tree / "a").write_bytes(b"changed\n")
    changed = nar_of(tree)
    c.send(c.add_to_store_nar_args(nar.path, nar.data, ca=nar.ca), framed(changed.data))
    with pytest.raises(DaemonError, match="mismatch"):
        await c.result()
    assert not await c.is_valid(nar.path)
    assert daemon.dirs._directories == {}
    # The same connection still works.
    await _add(c, nar)
    assert await c.is_valid(nar.path)


async def test_unknown_opcode_closes_only_that_connection(daemon: InProcess) -> None:
    bad = await daemon.client()
    other = await daemon.client()
    bad.send(wire.enc_u64(999))
    with pytest.raises(DaemonError, match="unknown operation 999"):
        await bad.result()
    assert await bad.reader.read() == b""
    assert await other.is_valid("/nix/store/00000000000000000000000000000000-x") is False


async def test_oversized_string_and_frame(daemon: InProcess, tree: Path) -> None:
    c = await daemon.client()
    c.send(wire.enc_u64(1), wire.enc_u64(1 << 40))  # IsValidPath with a 1 TiB path
    with pytest.raises(DaemonError, match="longer than the limit"):
        await c.result()
    assert await c.reader.read() == b""

    nar = nar_of(tree)
    c = await daemon.client()
    c.send(c.add_to_store_nar_args(nar.path, nar.data, ca=nar.ca), wire.enc_u64(1 << 50))
    with pytest.raises(DaemonError, match="larger than the limit"):
        await c.result()
    assert await c.reader.read() == b""
    assert not await (await daemon.client()).is_valid(nar.path)


async def test_disconnect_mid_transfer_stores_nothing(daemon: InProcess, tree: Path) -> None:
    nar = nar_of(tree)
    c = await daemon.client()
    c.send(c.add_to_store_nar_args(nar.path, nar.data, ca=nar.ca), framed(nar.data)[:5000])
    await c.writer.drain()
    await c.close()
    other = await daemon.client()
    for _ in range(50):
        if daemon.server.clients == 1:
            break
        await asyncio.sleep(0.02)
    assert not await other.is_valid(nar.path)
    assert daemon.dirs._directories == {}
    # A truncated frame (the client dies in the middle of it) is the same.
    c = await daemon.client()
    c.send(c.add_to_store_nar_args(nar.path, nar.data, ca=nar.ca), wire.enc_u64(4096), b"x" * 10)
    await c.writer.drain()
    await c.close()
    await _add(other, nar)
    assert await other.is_valid(nar.path)


async def test_several_clients_at_once(daemon: InProcess, tmp_path: Path) -> None:
    nars = []
    for i in range(8):
        root = tmp_path / f"t{i}"
        root.mkdir()
        (root / "f").write_bytes(str(i).encode() * 100_000)
        nars.append(nar_of(root))

    async def one(nar: Nar) -> bytes:
        c = await daemon.client()
        await _add(c, nar)
        data = await c.nar_from_path(nar.path, len(nar.data))
        await c.close()
        return data

    got = await asyncio.gather(*(one(n) for n in nars))
    assert got == [n.data for n in nars]


async def test_add_multiple_to_store(daemon: InProcess, tmp_path: Path) -> None:
    nars = []
    for i in range(3):
        root = tmp_path / f"m{i}"
        root.mkdir()
        (root / "f").write_bytes(b"m" * (i * 1000 + 1))
        nars.append(nar_of(root))
    stream = [wire.enc_u64(len(nars))]
    for nar in nars:
        stream += [
            wire.enc_string(nar.path),
            wire.enc_string(""),
            wire.enc_string(nar.sha256.hex()),
            wire.enc_strings([]),
            wire.enc_u64(0),
            wire.enc_u64(len(nar.data)),
            wire.enc_bool(False),
            wire.enc_strings([]),
            wire.enc_string(nar.ca),
            nar.data,  # raw: the NAR's own structure says where it ends
        ]
    c = await daemon.client()
    c.send(wire.enc_u64(OP_ADD_MULTIPLE_TO_STORE), wire.enc_bool(False), wire.enc_bool(False))
    c.send(framed(b"".join(stream), frame=777))
    await c.result()
    for nar in nars:
        assert await c.nar_from_path(nar.path, len(nar.data)) == nar.data


async def test_references_must_be_valid(daemon: InProcess, tree: Path) -> None:
    nar = nar_of(tree)
    missing = "/nix/store/00000000000000000000000000000000-missing"
    c = await daemon.client()
    c.send(
        c.add_to_store_nar_args(nar.path, nar.data, refs=[missing], dont_check_sigs=True),
        framed(nar.data),
    )
    with pytest.raises(DaemonError, match="references the invalid path"):
        await c.result()
    assert not await c.is_valid(nar.path)


async def test_untrusted_client(untrusting_daemon: InProcess, tree: Path) -> None:
    nar = nar_of(tree)
    c = await untrusting_daemon.client()
    # Input-addressed (no CA), unsigned: refused even with --no-check-sigs.
    path = "/nix/store/" + "1" * 32 + "-input-addressed"
    c.send(c.add_to_store_nar_args(path, nar.data, dont_check_sigs=True), framed(nar.data))
    with pytest.raises(DaemonError, match="lacks a valid signature"):
        await c.result()
    # Content-addressed: verified by its content, so accepted from anyone.
    await _add(c, nar)
    c.send(wire.enc_u64(OP_ADD_SIGNATURES), wire.enc_string(nar.path), wire.enc_strings([]))
    with pytest.raises(DaemonError, match="not privileged"):
        await c.result()


async def test_signed_input_addressed_path(tmp_path: Path, tree: Path) -> None:
    from tests.nix_daemon.daemon_support import _start
    from tvix.nix_daemon import TrustPolicy

    key = SigningKey.generate("test-1")
    d = await _start(tmp_path / "k.sock", TrustPolicy((), (key.to_public(),)))
    try:
        nar = nar_of(tree)
        path = "/nix/store/" + "1" * 32 + "-input-addressed"
        fp = fingerprint(StorePath.from_absolute_path(path), nar.sha256, len(nar.data), ())
        c = await d.client()
        c.send(c.add_to_store_nar_args(path, nar.data, sigs=[str(key.sign(fp))]), framed(nar.data))
        await c.result()
        info = await c.path_info(path)
        assert info is not None
        assert info["sigs"] == [str(key.sign(fp))]
    finally:
        await d.server.stop()


async def test_refused_build_keeps_connection(daemon: InProcess) -> None:
    c = await daemon.client()
    c.send(
        wire.enc_u64(OP_BUILD_PATHS), wire.enc_strings(["/nix/store/" + "2" * 32 + "-x.drv!out"])
    )
    c.send(wire.enc_u64(0))
    with pytest.raises(DaemonError, match=r"is not valid|does not build"):
        await c.result()
    assert await c.is_valid("/nix/store/00000000000000000000000000000000-x") is False


async def test_add_to_store_text_and_flat(daemon: InProcess) -> None:
    c = await daemon.client()
    c.send(
        wire.enc_u64(OP_ADD_TEXT_TO_STORE),
        wire.enc_string("hello.txt"),
        wire.enc_string("hello\n"),
        wire.enc_strings([]),
    )
    await c.result()
    text_path = await c.string()
    # builtins.toFile "hello.txt" "hello\n" in Nix 2.8:
    assert text_path.endswith("-hello.txt")
    c.send(
        wire.enc_u64(OP_ADD_TO_STORE),
        wire.enc_string("regular.txt"),
        wire.enc_string("fixed:sha256"),
        wire.enc_strings([]),
        wire.enc_bool(False),
        framed(b"hello\n"),
    )
    await c.result()
    # The path nix-store --add-fixed sha256 regular.txt gives (shared/nix-oracle.md).
    assert await c.string() == "/nix/store/ms76lv6rp91bx3wb1jnmyng0sdr6vb70-regular.txt"


async def test_old_protocol_pulls_the_nar(daemon: InProcess, tree: Path) -> None:
    nar = nar_of(tree)
    c = await daemon.client(1 << 8 | 22)
    c.send(c.add_to_store_nar_args(nar.path, nar.data, ca=nar.ca))
    await c.result(source=nar.data)
    assert await c.is_valid(nar.path)
    # Before 1.26 an error is a message and a status.
    c.send(wire.enc_u64(OP_BUILD_PATHS), wire.enc_strings(["/nix/store/" + "2" * 32 + "-x"]))
    c.send(wire.enc_u64(0))
    with pytest.raises(DaemonError, match="does not build"):
        await c.result()


async def test_old_add_to_store_sends_a_raw_nar(daemon: InProcess, tree: Path) -> None:
    nar = nar_of(tree)
    c = await daemon.client(1 << 8 | 24)
    c.send(
        wire.enc_u64(OP_ADD_TO_STORE),
        wire.enc_string("tree"),
        wire.enc_bool(True),  # "fixed"
        wire.enc_u64(1),  # recursive
        wire.enc_string("sha256"),
        nar.data,
    )
    await c.result()
    assert await c.string() == nar.path
    # Flat: the NAR of the one file; the connection is in step afterwards.
    file_nar = nar_of(tree / "a")
    c.send(
        wire.enc_u64(OP_ADD_TO_STORE),
        wire.enc_string("regular.txt"),
        wire.enc_bool(True),
        wire.enc_u64(0),
        wire.enc_string("sha256"),
        file_nar.data,
    )
    await c.result()
    assert await c.string() == "/nix/store/ms76lv6rp91bx3wb1jnmyng0sdr6vb70-regular.txt"
    assert await c.is_valid(nar.path)
