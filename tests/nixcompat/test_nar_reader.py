"""The NAR reader: round trips through the writer, NARs dumped by the real Nix,
every class of malformed NAR, and bounded streaming."""

from __future__ import annotations

import io
import random
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path

import pytest

from tests.support.nix import Nix
from tvix.nixcompat import NARError, NarWriter, dump_path
from tvix.nixcompat.nar import (
    Contents,
    DirectoryEnd,
    DirectoryStart,
    Entry,
    EntryEnd,
    NarEvent,
    NarParser,
    Regular,
    RegularEnd,
    Symlink,
    aread_nar,
    aread_nar_chunks,
    read_nar,
    read_nar_chunks,
)


def tok(s: bytes) -> bytes:
    return len(s).to_bytes(8, "little") + s + bytes(-len(s) % 8)


def toks(*items: bytes) -> bytes:
    return b"".join(tok(i) for i in items)


MAGIC = tok(b"nix-archive-1")


def render(events: Iterable[NarEvent]) -> bytes:
    """Write *events* back with the NarWriter."""
    w = NarWriter()
    out: list[bytes] = []
    for e in events:
        if isinstance(e, Regular):
            out.append(w.regular(e.executable, e.size))
        elif isinstance(e, Contents):
            out.append(w.contents_chunk(e.data))
        elif isinstance(e, RegularEnd):
            out.append(w.end_regular())
        elif isinstance(e, Symlink):
            out.append(w.symlink(e.target))
        elif isinstance(e, DirectoryStart):
            out.append(w.begin_directory())
        elif isinstance(e, Entry):
            out.append(w.entry(e.name))
        elif isinstance(e, EntryEnd):
            out.append(w.end_entry())
        else:
            assert isinstance(e, DirectoryEnd)
            out.append(w.end_directory())
    w.finish()
    return b"".join(out)


def merged(events: Iterable[NarEvent]) -> list[NarEvent]:
    """Events with consecutive Contents merged, to compare across chunkings."""
    out: list[NarEvent] = []
    pieces: list[bytes] = []
    for e in events:
        if isinstance(e, Contents):
            pieces.append(e.data)
            continue
        if pieces:
            out.append(Contents(b"".join(pieces)))
            pieces = []
        out.append(e)
    return out


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[i : i + size] for i in range(0, len(data), size))


async def achunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for chunk in chunked(data, size):
        yield chunk


def parse_sync(data: bytes) -> list[NarEvent]:
    return list(read_nar(io.BytesIO(data).read))


def parse_chunks(data: bytes) -> list[NarEvent]:
    return list(read_nar_chunks(chunked(data, 7)))


SYNC_PARSERS: list[Callable[[bytes], list[NarEvent]]] = [parse_sync, parse_chunks]


def small_tree_nar() -> bytes:
    w = NarWriter()
    parts = [
        w.begin_directory(),
        w.entry(b"a"),
        w.regular_inline(True, b"hello"),
        w.end_entry(),
        w.entry(b"b"),
        w.begin_directory(),
        w.end_directory(),
        w.end_entry(),
        w.entry(b"c"),
        w.symlink(b"a"),
        w.end_entry(),
        w.end_directory(),
    ]
    return b"".join(parts)


# -- round trips --


def test_events_of_a_small_tree() -> None:
    events = parse_sync(small_tree_nar())
    assert events == [
        DirectoryStart(),
        Entry(b"a"),
        Regular(True, 5),
        Contents(b"hello"),
        RegularEnd(),
        EntryEnd(),
        Entry(b"b"),
        DirectoryStart(),
        DirectoryEnd(),
        EntryEnd(),
        Entry(b"c"),
        Symlink(b"a"),
        EntryEnd(),
        DirectoryEnd(),
    ] or [type(e) for e in events] == [
        DirectoryStart, Entry, Regular, Contents, RegularEnd, EntryEnd, Entry, DirectoryStart,
        DirectoryEnd, EntryEnd, Entry, Symlink, EntryEnd, DirectoryEnd,
    ]  # fmt: skip
    assert [e for e in events if not isinstance(e, (Contents,))][:3] == [
        events[0],
        Entry(b"a"),
        Regular(True, 5),
    ]


@pytest.mark.nix
def test_nix_dump_parses_and_rerenders_identically(nix: Nix, tree: Path) -> None:
    nar = nix.dump(tree)
    reference = merged(parse_sync(nar))
    assert render(reference) == nar
    assert Entry(b"\xff\xfe-latin1-\xe9") in reference
    assert Symlink(b"/nonexistent/target") in reference
    assert Regular(True, 18) in reference  # exec.sh
    for size in (13, 4096, 1 << 20):
        assert merged(read_nar_chunks(chunked(nar, size))) == reference, size
        assert merged(read_nar(io.BytesIO(nar).read, chunk_size=size)) == reference, size


async def test_async_drivers(tree: Path) -> None:
    nar = b"".join(dump_path(tree))
    reference = merged(parse_sync(nar))
    stream = io.BytesIO(nar)

    async def aread(n: int) -> bytes:
        return stream.read(n)

    assert merged([e async for e in aread_nar(aread, chunk_size=5000)]) == reference
    assert merged([e async for e in aread_nar_chunks(achunked(nar, 999))]) == reference
    with pytest.raises(NARError, match="truncated"):
        async for _ in aread_nar_chunks(achunked(nar[:-8], 999)):
            pass
    truncated = io.BytesIO(nar[:-1])

    async def aread_truncated(n: int) -> bytes:
        return truncated.read(n)

    with pytest.raises(NARError, match="truncated"):
        async for _ in aread_nar(aread_truncated):
            pass


def test_random_trees_round_trip() -> None:
    rng = random.Random(3)
    for _ in range(30):
        nar = _random_nar(rng, depth=0)
        for parse in SYNC_PARSERS:
            assert render(merged(parse(nar))) == nar


def _random_nar(rng: random.Random, depth: int) -> bytes:
    w = NarWriter()
    parts: list[bytes] = []

    def node(depth: int) -> None:
        kind = rng.choice(["file", "link", "dir"] if depth < 4 else ["file", "link"])
        if kind == "file":
            data = rng.randbytes(rng.choice([0, 1, 7, 8, 9, 100, 5000]))
            if rng.random() < 0.5:
                parts.append(w.regular_inline(rng.random() < 0.5, data))
            else:
                parts.append(w.regular(rng.random() < 0.5, len(data)))
                parts.append(w.contents_chunk(data))
                parts.append(w.end_regular())
        elif kind == "link":
            parts.append(w.symlink(rng.randbytes(rng.randint(1, 30)).replace(b"\0", b"x")))
        else:
            parts.append(w.begin_directory())
            names = {rng.randbytes(rng.randint(1, 12)) for _ in range(rng.randint(0, 6))}
            names = {
                n for n in names if b"/" not in n and b"\0" not in n and n not in (b".", b"..")
            }
            for name in sorted(names):
                parts.append(w.entry(name))
                node(depth + 1)
                parts.append(w.end_entry())
            parts.append(w.end_directory())

    node(depth)
    w.finish()
    return b"".join(parts)


def test_corruption_only_ever_raises_nar_error() -> None:
    rng = random.Random(4)
    w = NarWriter()
    parts = [w.begin_directory()]
    for i in range(40):
        parts.append(w.entry(b"e%03d" % i))
        parts.append(w.symlink(b"t") if i % 2 else w.regular_inline(i % 3 == 0, b""))
        parts.append(w.end_entry())
    parts.append(w.end_directory())
    nar = b"".join(parts)
    rejected = 0
    for _ in range(300):
        corrupt = bytearray(nar)
        corrupt[rng.randrange(len(corrupt))] ^= 1 << rng.randrange(8)
        try:
            render(merged(parse_sync(bytes(corrupt))))
        except NARError:
            rejected += 1
    # Flips in symlink targets, names that stay sorted and the executable
    # flag's presence go unnoticed; almost everything else is structure.
    assert rejected > 280


# -- bounded streaming --


def test_big_file_streams_in_bounded_pieces_without_copies() -> None:
    size = 3 * 1024 * 1024 + 3
    data = random.Random(6).randbytes(size)
    w = NarWriter()
    nar = b"".join([w.regular(False, size), w.contents_chunk(data), w.end_regular()])
    stream = io.BytesIO(nar)
    requested: list[int] = []
    returned: list[bytes] = []

    def read(n: int) -> bytes:
        requested.append(n)
        chunk = stream.read(n)
        returned.append(chunk)
        return chunk

    events = list(read_nar(read, chunk_size=65536))
    contents = [e.data for e in events if isinstance(e, Contents)]
    assert b"".join(contents) == data
    assert max(requested) <= 65536
    assert max(len(c) for c in contents) <= 65536
    # Apart from what came with the header, contents are the very objects read returned.
    assert sum(any(c is r for r in returned) for c in contents) >= len(contents) - 1


def test_chunks_driver_passes_whole_chunks_through() -> None:
    w = NarWriter()
    header = w.regular(False, 16)
    chunk_a, chunk_b = b"a" * 8, b"b" * 8
    w.contents_written(16)
    trailer = w.end_regular()
    events = list(read_nar_chunks([header, chunk_a, chunk_b, trailer]))
    assert events[1].data is chunk_a  # type: ignore[union-attr]
    assert events[2].data is chunk_b  # type: ignore[union-attr]


def test_parser_offset_and_done() -> None:
    nar = small_tree_nar()
    parser = NarParser()
    parser.feed(nar)
    while parser.next_event() is not None:
        pass
    assert parser.done
    assert parser.offset == len(nar)
    parser.feed_eof()
    assert parser.next_event() is None
    with pytest.raises(NARError, match="after its end of input"):
        parser.feed(b"x")


# -- malformed NARs --


def _dir(*entries: bytes) -> bytes:
    return toks(b"(", b"type", b"directory") + b"".join(entries) + tok(b")")


def _entry(name: bytes, node: bytes) -> bytes:
    return toks(b"entry", b"(", b"name") + tok(name) + tok(b"node") + node + tok(b")")


LINK = toks(b"(", b"type", b"symlink", b"target", b"x", b")")
FILE = toks(b"(", b"type", b"regular", b"contents", b"abc", b")")

MALFORMED: list[tuple[str, bytes, str]] = [
    ("empty input", b"", "truncated"),
    ("bad magic", tok(b"nix-archive-2") + FILE, "bad magic, found token b'nix-archive-2'"),
    ("not a NAR at all", b"hello world, this is text!", "bad magic"),
    ("unknown token", MAGIC + toks(b"(", b"type", b"regular", b"content", b"x", b")"),
     "unexpected token b'content', expected 'contents' or 'executable'"),
    ("unknown node type", MAGIC + toks(b"(", b"type", b"fifo", b")"),
     "unknown node type b'fifo'"),
    ("missing open paren", MAGIC + toks(b"type", b"regular"), "unexpected token b'type'"),
    ("executable with a value", MAGIC + toks(b"(", b"type", b"regular", b"executable", b"1",
     b"contents", b"", b")"), "unexpected token b'1', expected 'executable' '' 'contents'"),
    ("junk after contents", MAGIC + toks(b"(", b"type", b"regular", b"contents", b"abc",
     b"extra", b")"), "expected ')' after file contents"),
    ("unsorted entries", MAGIC + _dir(_entry(b"b", LINK), _entry(b"a", LINK)),
     "entry b'a' is not sorted: it follows b'b'"),
    ("duplicate entries", MAGIC + _dir(_entry(b"a", LINK), _entry(b"a", LINK)),
     "duplicate entry name b'a'"),
    ("empty name", MAGIC + _dir(_entry(b"", LINK)), "invalid entry name b'': is empty"),
    ("slash in name", MAGIC + _dir(_entry(b"a/b", LINK)), "contains '/'"),
    ("NUL in name", MAGIC + _dir(_entry(b"a\0b", LINK)), "contains a NUL byte"),
    ("dot name", MAGIC + _dir(_entry(b".", LINK)), "is '.' or '..'"),
    ("dotdot name", MAGIC + _dir(_entry(b"..", LINK)), "is '.' or '..'"),
    ("name too long", MAGIC + _dir(_entry(b"n" * 256, LINK)),
     "entry name is too long: 256 bytes, at most 255"),
    ("absurd name length", MAGIC + toks(b"(", b"type", b"directory", b"entry", b"(", b"name")
     + (1 << 63).to_bytes(8, "little"), "entry name is too long"),
    ("target too long", MAGIC + toks(b"(", b"type", b"symlink", b"target", b"t" * 4097, b")"),
     "symlink target is too long: 4097 bytes, at most 4096"),
    ("empty target", MAGIC + toks(b"(", b"type", b"symlink", b"target", b"", b")"),
     "symlink target b'' is empty"),
    ("NUL in target", MAGIC + toks(b"(", b"type", b"symlink", b"target", b"a\0", b")"),
     "contains a NUL byte"),
    ("missing target keyword", MAGIC + toks(b"(", b"type", b"symlink", b"x", b")"),
     "unexpected token b'x', expected 'target'"),
    ("padding of a keyword", MAGIC + toks(b"(", b"type", b"symlink") + (6).to_bytes(8, "little")
     + b"target\0\x07" + toks(b"x", b")"), "non-zero padding"),
    ("entry without name", MAGIC + toks(b"(", b"type", b"directory", b"entry", b"(", b"node"),
     "unexpected token b'node', expected 'entry' '(' 'name'"),
    ("entry without node", MAGIC + toks(b"(", b"type", b"directory", b"entry", b"(", b"name",
     b"a", b"nod"), "unexpected token b'nod', expected 'node'"),
    ("non-zero padding in a token", MAGIC + tok(b"(") + (4).to_bytes(8, "little")
     + b"type\0\0\0\x01" + toks(b"regular", b"contents", b"", b")"), "non-zero padding"),
    ("non-zero padding after contents", MAGIC + toks(b"(", b"type", b"regular", b"contents")
     + (3).to_bytes(8, "little") + b"abc\0\0\0\0\x01" + tok(b")"), "non-zero padding"),
    ("declared size too large", MAGIC + toks(b"(", b"type", b"regular", b"contents")
     + (1000).to_bytes(8, "little") + b"abc" + bytes(5) + tok(b")"),
     "truncated: unexpected end of input in file contents"),
    ("declared size too small", MAGIC + toks(b"(", b"type", b"regular", b"contents")
     + (2).to_bytes(8, "little") + b"abc" + bytes(5) + tok(b")"), "non-zero padding"),
    ("trailing bytes", MAGIC + FILE + b"\0", "trailing data after the end of the NAR"),
    ("trailing NAR", MAGIC + FILE + MAGIC + FILE, "trailing data"),
    ("missing directory end", MAGIC + toks(b"(", b"type", b"directory"), "truncated"),
    ("missing entry end", MAGIC + _dir(_entry(b"a", LINK))[:-16], "truncated"),
]  # fmt: skip


@pytest.mark.parametrize("parse", SYNC_PARSERS)
@pytest.mark.parametrize(("case", "nar", "phrase"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_nars_are_rejected(
    parse: Callable[[bytes], list[NarEvent]], case: str, nar: bytes, phrase: str
) -> None:
    with pytest.raises(NARError, match="invalid NAR at offset [0-9]+: .*" + re.escape(phrase)):
        parse(nar)


@pytest.mark.parametrize("parse", SYNC_PARSERS)
def test_every_truncation_is_rejected(parse: Callable[[bytes], list[NarEvent]]) -> None:
    nar = small_tree_nar()
    for cut in range(len(nar)):
        with pytest.raises(NARError, match="truncated"):
            parse(nar[:cut])


def test_excessive_depth_is_rejected() -> None:
    depth = 10
    nar = MAGIC
    for _ in range(depth):
        nar += toks(b"(", b"type", b"directory", b"entry", b"(", b"name", b"d", b"node")
    nar += LINK + tok(b")") * (2 * depth)
    parser = NarParser(max_depth=depth - 1)
    parser.feed(nar)
    parser.feed_eof()
    with pytest.raises(NARError, match="directories nested deeper than 9"):
        _drain(parser)
    assert render(merged(parse_sync(nar))) == nar  # the default limit is far higher


def _drain(parser: NarParser) -> None:
    while parser.next_event() is not None:
        pass
