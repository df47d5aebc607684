"""Reading NARs as a stream of events, with bounded memory.

The parsing logic lives in :class:`NarParser`, a sans-I/O parser: feed it
bytes, pull events. Thin drivers run it over the usual sources:

- :func:`read_nar` / :func:`aread_nar` over a ``read(n)`` callable, sync or
  async (a file object, an HTTP body, a socket stream). In the middle of a
  file's contents they read straight into :class:`Contents` events, so big
  files pass through without being copied or buffered.
- :func:`read_nar_chunks` / :func:`aread_nar_chunks` over an iterable of
  byte chunks (a gRPC stream of messages, say).

A NAR yields these events, in this grammar::

    nar    := node
    node   := Regular (Contents)* RegularEnd
            | Symlink
            | DirectoryStart (Entry node EntryEnd)* DirectoryEnd

The :class:`Contents` events after a :class:`Regular` carry exactly its
``size`` bytes in pieces (none for an empty file); :class:`RegularEnd`
comes once the padding and closing token were checked.

Everything Nix would not have written is rejected with :class:`NARError`,
whose message says what and at which byte offset: a bad magic, unknown or
misplaced tokens, unsorted or duplicate entries, invalid entry names (empty,
``/``, NUL, ``.``, ``..``, longer than 255 bytes), invalid symlink targets
(empty, NUL, longer than 4096 bytes), non-zero padding, truncation, trailing
bytes after the root node, and nesting deeper than ``max_depth``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import Final, NamedTuple

from tvix.nixcompat.errors import NARError
from tvix.nixcompat.nar import wire

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_MAX_DEPTH",
    "Contents",
    "DirectoryEnd",
    "DirectoryStart",
    "Entry",
    "EntryEnd",
    "NarEvent",
    "NarParser",
    "Regular",
    "RegularEnd",
    "Symlink",
    "aread_nar",
    "aread_nar_chunks",
    "read_nar",
    "read_nar_chunks",
]

#: How much the ``read(n)`` drivers ask for at once.
DEFAULT_CHUNK_SIZE: Final = 1 << 18
#: The deepest directory nesting accepted. Nix can dump nothing deeper than
#: ``PATH_MAX / 2`` (every level adds at least ``x/`` to the path).
DEFAULT_MAX_DEPTH: Final = 2048


class Regular(NamedTuple):
    """A regular file starts; *size* bytes of :class:`Contents` follow, then :class:`RegularEnd`."""

    executable: bool
    size: int


class Contents(NamedTuple):
    """The next piece of the current regular file's contents (never empty)."""

    data: bytes


class Symlink(NamedTuple):
    """A symlink node with its *target* (non-empty, no NUL)."""

    target: bytes


class Entry(NamedTuple):
    """A directory entry called *name* starts; its node follows, then :class:`EntryEnd`."""

    name: bytes


class _Marker:
    __slots__ = ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RegularEnd(_Marker):
    """The current regular file ended (its padding and ``)`` were valid)."""

    __slots__ = ()


class DirectoryStart(_Marker):
    """A directory node starts; :class:`Entry` events follow, then :class:`DirectoryEnd`."""

    __slots__ = ()


class DirectoryEnd(_Marker):
    """The current directory ended."""

    __slots__ = ()


class EntryEnd(_Marker):
    """The current directory entry ended."""

    __slots__ = ()


NarEvent = (
    Regular | Contents | Symlink | Entry | RegularEnd | DirectoryStart | DirectoryEnd | EntryEnd
)

_REGULAR_END: Final = RegularEnd()
_DIRECTORY_START: Final = DirectoryStart()
_DIRECTORY_END: Final = DirectoryEnd()
_ENTRY_END: Final = EntryEnd()

# Parser states.
_MAGIC = 0
_NODE = 1  # expecting "(" "type" <type>
_REGULAR = 2  # after "regular": expecting ["executable" ""] "contents" <size>
_CONTENTS = 3
_REGULAR_END_STATE = 4  # expecting padding and ")"
_SYMLINK = 5  # after "symlink": expecting "target" <target> ")"
_DIRECTORY = 6  # expecting "entry" "(" "name" <name> "node", or ")"
_AFTER_NODE = 7  # expecting the ")" that ends an entry
_DONE = 8

_WHAT = {
    _MAGIC: "the NAR magic",
    _NODE: "a node",
    _REGULAR: "a regular file's header",
    _CONTENTS: "file contents",
    _REGULAR_END_STATE: "the end of a regular file",
    _SYMLINK: "a symlink",
    _DIRECTORY: "a directory entry or the directory's end",
    _AFTER_NODE: "the end of a directory entry",
    _DONE: "nothing",
}

_NODE_TYPES = {b"regular": _REGULAR, b"symlink": _SYMLINK, b"directory": _DIRECTORY}
# The longest token other than a name or symlink target is "executable".
_MAX_TOKEN_LEN = 16
_T16 = 16  # wire length of a token of 1..8 bytes ("(", ")", "entry", "regular", ...)

_ENTRY_PREFIX_LEN = len(wire.ENTRY_HEADER)
_EXEC_HEADER = wire.EXECUTABLE + wire.EMPTY + wire.CONTENTS
_U64 = 8


class NarParser:
    """A sans-I/O NAR parser: :meth:`feed` it bytes, pull events with :meth:`next_event`.

    Call :meth:`next_event` until it returns ``None``, which means it needs
    more input (or, if :attr:`done`, that the NAR is complete); then
    :meth:`feed` more bytes or call :meth:`feed_eof`. After the root node,
    any further byte is an error, and so is end of input before it.

    A driver that reads by itself may, whenever :attr:`contents_wanted` is
    non-zero, read up to that many bytes of file contents and pass them to
    :meth:`contents_read` instead of :meth:`feed`, which saves a copy.

    Memory is bounded by the largest piece fed plus one token (at most a
    4 KiB symlink target). Errors are :class:`NARError`; after one, the
    parser must not be used again.
    """

    __slots__ = (
        "_base",
        "_buf",
        "_eof",
        "_max_depth",
        "_names",
        "_pos",
        "_remaining",
        "_state",
    )

    def __init__(self, *, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        """Create a parser accepting directories nested at most *max_depth* deep."""
        self._buf = b""
        self._pos = 0
        self._base = 0  # absolute NAR offset of _buf[0]
        self._eof = False
        self._state = _MAGIC
        # Per open directory, the previous entry name (b"" sorts before any name).
        self._names: list[bytes] = []
        self._remaining = 0
        self._max_depth = max_depth

    @property
    def done(self) -> bool:
        """Whether the root node was parsed completely."""
        return self._state == _DONE

    @property
    def offset(self) -> int:
        """The NAR offset of the next unparsed byte (after the whole NAR: its size)."""
        return self._base + self._pos

    @property
    def contents_wanted(self) -> int:
        """How many contents bytes may go to :meth:`contents_read` now (0: none)."""
        if self._state == _CONTENTS and self._pos == len(self._buf):
            return self._remaining
        return 0

    def feed(self, data: bytes) -> None:
        """Append *data* to the input.

        Raises:
            NARError: after :meth:`feed_eof`.
        """
        if self._eof:
            raise NARError("cannot feed a NAR parser after its end of input")
        if not data:
            return
        pos = self._pos
        buf = self._buf
        if pos == len(buf):
            self._base += pos
            self._buf = bytes(data)
        else:
            self._base += pos
            self._buf = buf[pos:] + data
        self._pos = 0

    def feed_eof(self) -> None:
        """Signal the end of input; :meth:`next_event` then raises if the NAR is incomplete."""
        self._eof = True

    def contents_read(self, data: bytes) -> Contents:
        """Take *data* as the next file contents, read directly by the driver.

        Only valid while :attr:`contents_wanted` is non-zero. Bytes beyond the
        file's end are kept as input, as if fed.

        Returns the :class:`Contents` event to deliver.
        """
        wanted = self.contents_wanted
        if not wanted or not data:
            raise NARError("contents_read() called while no file contents are wanted")
        n = len(data)
        if n > wanted:
            self._base += len(self._buf) + wanted
            self._buf = bytes(data[wanted:])
            self._pos = 0
            data = data[:wanted]
            n = wanted
        else:
            self._base += len(self._buf) + n
            self._buf = b""
            self._pos = 0
        self._remaining -= n
        return Contents(data)

    # -- errors --

    def _fail(self, message: str, at: int | None = None) -> NARError:
        offset = self._base + (self._pos if at is None else at)
        return NARError(f"invalid NAR at offset {offset}: {message}")

    def _describe(self, at: int) -> str:
        """Describe the token at buffer index *at*, for error messages."""
        buf = self._buf
        if len(buf) - at < _U64:
            return "truncated token"
        length = int.from_bytes(buf[at : at + _U64], "little")
        if length > 64:
            return f"{length}-byte string"
        if len(buf) - at - _U64 < length:
            return f"truncated {length}-byte string"
        return f"token {buf[at + _U64 : at + _U64 + length]!r}"

    def _mismatch(self, at: int, expected: bytes, what: str) -> NARError:
        """The error for input at buffer index *at* that is not the fixed tokens *expected*."""
        buf = self._buf
        i = 0
        # Find the first token that differs; tokens are compared with their
        # padding, so the difference may be just non-zero padding.
        while i < len(expected):
            length = int.from_bytes(expected[i : i + _U64], "little")
            unpadded = _U64 + length
            padded = unpadded + (-length & 7)
            if buf[at : at + padded] == expected[i : i + padded]:
                at += padded
                i += padded
                continue
            if len(buf) - at >= padded and buf[at : at + unpadded] == expected[i : i + unpadded]:
                return self._fail("non-zero padding", at + unpadded)
            break
        return self._fail(f"unexpected {self._describe(at)}, expected {what}", at)

    def _check_padding(self, start: int, end: int) -> None:
        if self._buf[start:end].count(0) != end - start:
            raise self._fail("non-zero padding", start)

    # -- the state machine --

    def next_event(self) -> NarEvent | None:
        """Return the next event, or ``None`` if more input is needed or the NAR is done.

        Raises:
            NARError: the input is not a valid NAR (including truncation,
                once :meth:`feed_eof` was called, and trailing bytes).
        """
        while True:
            state = self._state
            buf = self._buf
            pos = self._pos
            avail = len(buf) - pos

            if state == _CONTENTS:
                remaining = self._remaining
                if remaining == 0:
                    self._state = _REGULAR_END_STATE
                    continue
                if avail == 0:
                    return self._starved(f"file contents ({remaining} bytes missing)")
                if avail <= remaining:
                    data = buf if pos == 0 else buf[pos:]
                    self._pos = len(buf)
                    self._remaining = remaining - avail
                else:
                    data = buf[pos : pos + remaining]
                    self._pos = pos + remaining
                    self._remaining = 0
                return Contents(data)

            if state == _DIRECTORY:
                if avail < _T16:
                    return self._starved(_WHAT[state])
                if buf.startswith(wire.CLOSE, pos):
                    self._pos = pos + _T16
                    self._names.pop()
                    self._node_done()
                    return _DIRECTORY_END
                if not buf.startswith(wire.ENTRY, pos):
                    raise self._mismatch(pos, wire.ENTRY, "'entry' or ')'")
                header_end = pos + _ENTRY_PREFIX_LEN
                if avail < _ENTRY_PREFIX_LEN:
                    return self._starved("a directory entry")
                if not buf.startswith(wire.ENTRY_HEADER, pos):
                    raise self._mismatch(pos, wire.ENTRY_HEADER, "'entry' '(' 'name'")
                name = self._string(
                    header_end, wire.MAX_NAME_LEN, "entry name", wire.NODE, "'node'"
                )
                if name is None:
                    return self._starved("a directory entry")
                reason = wire.invalid_name_reason(name)
                if reason is not None:
                    raise self._fail(f"invalid entry name {name!r}: {reason}", header_end)
                previous = self._names[-1]
                if name <= previous:
                    if name == previous:
                        raise self._fail(f"duplicate entry name {name!r}", header_end)
                    raise self._fail(
                        f"entry {name!r} is not sorted: it follows {previous!r}", header_end
                    )
                self._names[-1] = name
                self._state = _NODE
                return Entry(name)

            if state == _NODE:
                # "(" "type" <type>, the type at most "directory" (24 bytes).
                if avail < 2 * _T16:
                    return self._starved(_WHAT[state])
                if not buf.startswith(wire.NODE_START, pos):
                    raise self._mismatch(pos, wire.NODE_START, "'(' 'type'")
                node_type = self._string(pos + 2 * _T16, _MAX_TOKEN_LEN, "node type")
                if node_type is None:
                    return self._starved(_WHAT[state])
                new_state = _NODE_TYPES.get(node_type)
                if new_state is None:
                    raise self._fail(f"unknown node type {node_type!r}", pos + 2 * _T16)
                self._state = new_state
                if new_state == _DIRECTORY:
                    if len(self._names) >= self._max_depth:
                        raise self._fail(f"directories nested deeper than {self._max_depth}")
                    self._names.append(b"")
                    return _DIRECTORY_START
                continue

            if state == _REGULAR:
                # Both alternatives need 24 bytes: "executable", or "contents" <size>.
                if avail < _T16 + _U64:
                    return self._starved(_WHAT[state])
                if buf.startswith(wire.CONTENTS, pos):
                    executable = False
                    size_at = pos + _T16
                elif buf.startswith(wire.EXECUTABLE, pos):
                    executable = True
                    size_at = pos + len(_EXEC_HEADER)
                    if avail >= len(_EXEC_HEADER) and not buf.startswith(_EXEC_HEADER, pos):
                        raise self._mismatch(pos, _EXEC_HEADER, "'executable' '' 'contents'")
                else:
                    raise self._mismatch(pos, wire.CONTENTS, "'contents' or 'executable'")
                if len(buf) < size_at + _U64:
                    return self._starved(_WHAT[state])
                size = int.from_bytes(buf[size_at : size_at + _U64], "little")
                self._pos = size_at + _U64
                self._remaining = size
                self._state = _CONTENTS
                return Regular(executable, size)

            if state == _REGULAR_END_STATE:
                # The padding of the contents, then ")". Contents start 8-aligned,
                # so the padding length follows from the offset alone.
                pad = -(self._base + pos) & 7
                if avail < pad + _T16:
                    return self._starved(_WHAT[state])
                if pad:
                    self._check_padding(pos, pos + pad)
                if not buf.startswith(wire.CLOSE, pos + pad):
                    raise self._mismatch(pos + pad, wire.CLOSE, "')' after file contents")
                self._pos = pos + pad + _T16
                self._node_done()
                return _REGULAR_END

            if state == _AFTER_NODE:
                if avail < _T16:
                    return self._starved(_WHAT[state])
                if not buf.startswith(wire.CLOSE, pos):
                    raise self._mismatch(pos, wire.CLOSE, "')' ending the entry")
                self._pos = pos + _T16
                self._state = _DIRECTORY
                return _ENTRY_END

            if state == _SYMLINK:
                if avail < _T16 + _U64:
                    return self._starved(_WHAT[state])
                if not buf.startswith(wire.TARGET, pos):
                    raise self._mismatch(pos, wire.TARGET, "'target'")
                target = self._string(
                    pos + _T16, wire.MAX_TARGET_LEN, "symlink target", wire.CLOSE, "')'"
                )
                if target is None:
                    return self._starved(_WHAT[state])
                if not target or b"\0" in target:
                    problem = "is empty" if not target else "contains a NUL byte"
                    raise self._fail(f"symlink target {target!r} {problem}", pos + _T16)
                self._node_done()
                return Symlink(target)

            if state == _MAGIC:
                if avail < len(wire.MAGIC):
                    return self._starved(_WHAT[state])
                if not buf.startswith(wire.MAGIC, pos):
                    raise self._fail(f"not a NAR: bad magic, found {self._describe(pos)}")
                self._pos = pos + len(wire.MAGIC)
                self._state = _NODE
                continue

            # _DONE
            if avail:
                raise self._fail("trailing data after the end of the NAR")
            return None

    def _starved(self, what: str) -> NarEvent | None:
        """Return None (need more input), or raise if the input has ended."""
        if self._eof:
            raise self._fail(f"truncated: unexpected end of input in {what}")
        return None

    def _node_done(self) -> None:
        self._state = _AFTER_NODE if self._names else _DONE

    def _string(
        self, at: int, max_len: int, what: str, trailer: bytes = b"", trailer_what: str = ""
    ) -> bytes | None:
        """Parse the string at buffer index *at* (plus a fixed *trailer* token).

        On success, consumes up to the end of the trailer and returns the
        string; returns None if the buffer ends before that.
        """
        buf = self._buf
        if len(buf) < at + _U64:
            return None
        length = int.from_bytes(buf[at : at + _U64], "little")
        if length > max_len:
            raise self._fail(f"{what} is too long: {length} bytes, at most {max_len}", at)
        start = at + _U64
        end = start + length
        padded_end = end + (-length & 7)
        if len(buf) < padded_end + len(trailer):
            return None
        if padded_end != end:
            self._check_padding(end, padded_end)
        if trailer and not buf.startswith(trailer, padded_end):
            raise self._mismatch(padded_end, trailer, trailer_what)
        self._pos = padded_end + len(trailer)
        return buf[start:end]


def read_nar(
    read: Callable[[int], bytes], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Iterator[NarEvent]:
    """Parse the NAR that ``read(n)`` returns, yielding its events.

    *read(n)* returns 1 to *n* bytes, or ``b""`` at the end (like a binary
    file's ``read``); it is called with *n* at most *chunk_size*, so memory
    stays bounded whatever the file sizes. The whole input must be the NAR:
    after the root node *read* is called once more to check that nothing
    follows.

    Raises:
        NARError: the input is not exactly one valid NAR.
    """
    parser = NarParser()
    next_event = parser.next_event
    while True:
        event = next_event()
        if event is not None:
            yield event
            continue
        wanted = parser.contents_wanted
        if wanted:
            data = read(min(wanted, chunk_size))
            if data:
                yield parser.contents_read(data)
                continue
        elif parser.done:
            data = read(1)
            if data:
                parser.feed(data)
                next_event()  # raises: trailing data
            return
        else:
            data = read(chunk_size)
        if data:
            parser.feed(data)
        else:
            parser.feed_eof()


async def aread_nar(
    read: Callable[[int], Awaitable[bytes]], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> AsyncIterator[NarEvent]:
    """Like :func:`read_nar`, for an async ``read(n)`` (e.g. ``asyncio.StreamReader.read``).

    Raises:
        NARError: the input is not exactly one valid NAR.
    """
    parser = NarParser()
    next_event = parser.next_event
    while True:
        event = next_event()
        if event is not None:
            yield event
            continue
        wanted = parser.contents_wanted
        if wanted:
            data = await read(min(wanted, chunk_size))
            if data:
                yield parser.contents_read(data)
                continue
        elif parser.done:
            data = await read(1)
            if data:
                parser.feed(data)
                next_event()  # raises: trailing data
            return
        else:
            data = await read(chunk_size)
        if data:
            parser.feed(data)
        else:
            parser.feed_eof()


def read_nar_chunks(chunks: Iterable[bytes]) -> Iterator[NarEvent]:
    """Parse the NAR made of the concatenation of *chunks*, yielding its events.

    :class:`Contents` events are slices of the chunks (a whole chunk is
    passed on as is), so memory is bounded by the chunk size.

    Raises:
        NARError: the input is not exactly one valid NAR.
    """
    parser = NarParser()
    next_event = parser.next_event
    for chunk in chunks:
        parser.feed(chunk)
        while (event := next_event()) is not None:
            yield event
    parser.feed_eof()
    while (event := next_event()) is not None:
        yield event


async def aread_nar_chunks(chunks: AsyncIterable[bytes]) -> AsyncIterator[NarEvent]:
    """Like :func:`read_nar_chunks`, for an async iterable of chunks (e.g. a gRPC stream).

    Raises:
        NARError: the input is not exactly one valid NAR.
    """
    parser = NarParser()
    next_event = parser.next_event
    async for chunk in chunks:
        parser.feed(chunk)
        while (event := next_event()) is not None:
            yield event
    parser.feed_eof()
    while (event := next_event()) is not None:
        yield event
