"""The worker protocol's wire format: encoders, generator decoders, limits, stderr messages."""

from __future__ import annotations

import pytest

from tvix.nix_daemon import wire
from tvix.nix_daemon.errors import WireError


def test_u64_and_strings_round_trip() -> None:
    data = (
        wire.enc_u64(2**64 - 1)
        + wire.enc_bool(True)
        + wire.enc_string("/nix/store/x")
        + wire.enc_strings(["a", "", "12345678"])
        + b"rest"
    )
    assert wire.decode(wire.read_u64(), data)[0] == 2**64 - 1
    rest = wire.decode(wire.read_u64(), data)[1]
    flag, rest = wire.decode(wire.read_bool(), rest)
    text, rest = wire.decode(wire.read_string(), rest)
    items, rest = wire.decode(wire.read_strings(), rest)
    assert (flag, text, items, rest) == (True, "/nix/store/x", ["a", "", "12345678"], b"rest")


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        (b"", bytes(8)),
        (b"a", b"\x01" + bytes(7) + b"a" + bytes(7)),
        (b"12345678", b"\x08" + bytes(7) + b"12345678"),
    ],
)
def test_strings_are_padded_to_eight_bytes(text: bytes, encoded: bytes) -> None:
    assert wire.enc_bytes(text) == encoded
    assert wire.decode(wire.read_bytes(), encoded) == (text, b"")


def test_limits_are_checked_before_reading() -> None:
    huge = wire.enc_u64(1 << 40)
    with pytest.raises(WireError, match="longer than the limit"):
        wire.decode(wire.read_bytes(), huge)
    with pytest.raises(WireError, match="longer than the limit"):
        wire.decode(wire.read_strings(), huge)
    with pytest.raises(WireError, match="larger than the limit"):
        wire.decode(wire.read_frame_length(), wire.enc_u64(wire.MAX_FRAME + 1))
    assert wire.decode(wire.read_frame_length(), wire.enc_u64(0)) == (0, b"")


def test_malformed_input() -> None:
    with pytest.raises(WireError, match="truncated"):
        wire.decode(wire.read_string(), wire.enc_string("hello")[:-4])
    with pytest.raises(WireError, match="padding"):
        wire.decode(wire.read_bytes(), b"\x01" + bytes(7) + b"a" + b"\x01" + bytes(6))
    with pytest.raises(WireError, match="not UTF-8"):
        wire.decode(wire.read_string(), wire.enc_bytes(b"\xff"))


def test_error_message_by_client_version() -> None:
    new = wire.error_message("boom", 1 << 8 | 34)
    values = []
    rest = new
    value, rest = wire.decode(wire.read_u64(), rest)
    values.append(value)
    for decoder in (wire.read_string, wire.read_u64, wire.read_string, wire.read_string):
        value, rest = wire.decode(decoder(), rest)  # type: ignore[operator]
        values.append(value)
    assert values == [wire.STDERR_ERROR, "Error", 0, "Error", "boom"]
    assert rest == wire.enc_u64(0) + wire.enc_u64(0)  # no position, no traces

    old = wire.error_message("boom", 1 << 8 | 25, status=3)
    assert old == wire.enc_u64(wire.STDERR_ERROR) + wire.enc_string("boom") + wire.enc_u64(3)


def test_stderr_messages() -> None:
    assert wire.next_message("hi") == wire.enc_u64(wire.STDERR_NEXT) + wire.enc_string("hi\n")
    assert wire.read_message(5) == wire.enc_u64(wire.STDERR_READ) + wire.enc_u64(5)
    act = wire.start_activity(7, 3, 100, "copying", [1, "x"], parent=2)
    assert act.startswith(wire.enc_u64(wire.STDERR_START_ACTIVITY) + wire.enc_u64(7))
    assert act.endswith(wire.enc_u64(1) + wire.enc_string("x") + wire.enc_u64(2))
    assert wire.stop_activity(7) == wire.enc_u64(wire.STDERR_STOP_ACTIVITY) + wire.enc_u64(7)
