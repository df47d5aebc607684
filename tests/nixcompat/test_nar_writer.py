"""The NAR writer and dump_path, against known answers and nix-store --dump."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from tests.support.nix import Nix
from tvix.nixcompat import NARError, NarWriter, dump_path, nixbase32


def dump(path: Path | bytes) -> bytes:
    return b"".join(dump_path(path))


def nix32_sha256(data: bytes) -> str:
    return nixbase32.encode(hashlib.sha256(data).digest())


# -- known answers (nix-oracle.md) --


def test_known_answer_empty_dir(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    nar = dump(d)
    assert len(nar) == 96
    assert nix32_sha256(nar) == "0sjjj9z1dhilhpc8pq4154czrb79z9cm044jvn75kxcjv6v5l2m5"


def test_known_answer_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to("regular.txt")
    nar = dump(link)
    assert len(nar) == 128
    assert nix32_sha256(nar) == "0f4jygka2xdl5mf6bwmp08jaca6a2y2rgx8cyp563i7jw0yjya2a"


def test_known_answer_hello_file(tmp_path: Path) -> None:
    f = tmp_path / "regular.txt"
    f.write_bytes(b"hello\n")
    nar = dump(f)
    assert len(nar) == 120
    assert nix32_sha256(nar) == "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"


def test_exact_bytes_of_a_small_file() -> None:
    w = NarWriter()
    nar = w.regular_inline(True, b"abc")

    def tok(s: bytes) -> bytes:
        return len(s).to_bytes(8, "little") + s + bytes(-len(s) % 8)

    expected = b"".join(
        tok(t)
        for t in (
            b"nix-archive-1",
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"abc",
            b")",
        )
    )
    assert nar == expected
    assert w.done
    assert w.size == len(expected)


# -- dump_path vs nix-store --dump --


@pytest.mark.nix
def test_dump_path_matches_nix(nix: Nix, tree: Path) -> None:
    ours = dump(tree)
    assert ours == nix.dump(tree)
    # Every single node of the tree as the root, too.
    for entry in sorted(os.listdir(tree)):
        path = tree / os.fsdecode(entry)
        assert dump(path) == nix.dump(path), path


@pytest.mark.nix
def test_dump_path_matches_nix_hash(nix: Nix, tree: Path) -> None:
    assert nix32_sha256(dump(tree)) == nix.hash_path(tree)


def test_dump_path_bytes_path_and_small_chunks(tree: Path) -> None:
    whole = dump(tree)
    pieces = list(dump_path(os.fsencode(tree), chunk_size=4096))
    assert b"".join(pieces) == whole
    assert max(len(p) for p in pieces) <= 4096 + 4096  # a piece: a header or one chunk


def test_executable_is_owner_x_bit_only(tmp_path: Path) -> None:
    for mode, executable in ((0o654, False), (0o645, False), (0o700, True), (0o744, True)):
        f = tmp_path / f"m{mode:o}"
        f.write_bytes(b"x")
        f.chmod(mode)
        assert (b"executable" in dump(f)) == executable, oct(mode)


def test_unsupported_file_types_name_the_path(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.mkfifo(d / "fifo")
    with pytest.raises(NARError, match=r"file '.*/d/fifo' has an unsupported type"):
        dump(d)
    s = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(s))
        with pytest.raises(NARError, match="unsupported type"):
            dump(s)


# -- the writer's validation --


def test_writer_streams_contents_without_copying() -> None:
    w = NarWriter()
    header = w.regular(False, 10)
    chunk = memoryview(bytearray(b"0123456789"))
    assert w.contents_chunk(chunk[:4]).obj is chunk.obj
    w.contents_written(6)
    trailer = w.end_regular()
    assert trailer == bytes(6) + (1).to_bytes(8, "little") + b")" + bytes(7)
    assert w.size == len(header) + 10 + len(trailer)
    w.finish()


def test_writer_rejects_size_mismatches() -> None:
    w = NarWriter()
    w.regular(False, 3)
    with pytest.raises(NARError, match="exceed the declared size"):
        w.contents_chunk(b"abcd")
    w.contents_chunk(b"ab")
    with pytest.raises(NARError, match="shorter than the declared size: 1 bytes missing"):
        w.end_regular()
    with pytest.raises(NARError, match="exceed the declared size"):
        w.contents_written(2)
    w.contents_written(1)
    w.end_regular()
    with pytest.raises(NARError, match="negative"):
        NarWriter().regular(False, -1)


def test_writer_rejects_unsorted_and_duplicate_entries() -> None:
    w = NarWriter()
    w.begin_directory()
    for name in (b"B", b"a", b"a-b"):  # bytewise: "B" < "a" < "a-b"
        w.entry(name)
        w.symlink(b"t")
        w.end_entry()
    with pytest.raises(NARError, match="duplicate entry b'a-b'"):
        w.entry(b"a-b")
    with pytest.raises(NARError, match="does not sort after the previous entry"):
        w.entry(b"a")
    w.entry(b"\xff")
    w.begin_directory()
    w.entry(b"a")  # a nested directory starts its own order
    w.regular_inline(False, b"")
    w.end_entry()
    w.end_directory()
    w.end_entry()
    w.end_directory()
    assert w.done


@pytest.mark.parametrize(
    ("name", "phrase"),
    [
        (b"", "is empty"),
        (b".", "'.' or '..'"),
        (b"..", "'.' or '..'"),
        (b"a/b", "contains '/'"),
        (b"a\0b", "NUL"),
        (b"x" * 256, "longer than 255 bytes"),
    ],
)
def test_writer_rejects_invalid_names(name: bytes, phrase: str) -> None:
    w = NarWriter()
    w.begin_directory()
    with pytest.raises(NARError, match=phrase):
        w.entry(name)


@pytest.mark.parametrize("target", [b"", b"a\0b", b"x" * 4097])
def test_writer_rejects_invalid_symlink_targets(target: bytes) -> None:
    with pytest.raises(NARError, match="invalid symlink target"):
        NarWriter().symlink(target)


def test_writer_rejects_calls_out_of_order() -> None:
    w = NarWriter()
    with pytest.raises(NARError, match="cannot start a directory entry while expecting the root"):
        w.entry(b"a")
    with pytest.raises(NARError, match="cannot end a directory"):
        w.end_directory()
    with pytest.raises(NARError, match="cannot write file contents"):
        w.contents_chunk(b"x")
    with pytest.raises(NARError, match="incomplete"):
        w.finish()
    w.begin_directory()
    w.entry(b"a")
    with pytest.raises(NARError, match="cannot end a directory while expecting an entry's node"):
        w.end_directory()
    with pytest.raises(NARError, match="cannot end a directory entry"):
        w.end_entry()
    w.regular(False, 1)
    with pytest.raises(NARError, match="inside a regular file's contents"):
        w.symlink(b"x")
    w.contents_chunk(b"x")
    w.end_regular()
    with pytest.raises(NARError, match="expecting end_entry"):
        w.entry(b"b")
    w.end_entry()
    w.end_directory()
    with pytest.raises(NARError, match="the NAR is complete"):
        w.symlink(b"x")
    w.finish()
