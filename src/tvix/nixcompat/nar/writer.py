"""Writing NARs incrementally, with bounded memory.

:class:`NarWriter` is a validating encoder that *returns* the wire bytes of
each step instead of writing them, so one writer serves sync and async
callers alike, and file contents never pass through it: the caller sends
them to its sink itself (straight from a blob store, say) and only tells the
writer how much it sent. :func:`dump_path` uses it to produce the NAR of a
local path exactly as ``nix-store --dump`` does.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from typing import TypeVar

from tvix.nixcompat.errors import NARError
from tvix.nixcompat.nar import wire

__all__ = ["NarWriter", "dump_path"]

_B = TypeVar("_B", bytes, bytearray, memoryview)

# Writer states.
_ROOT = 0  # nothing written yet; expecting the root node
_NODE = 1  # after entry(): expecting the entry's node
_CONTENTS = 2  # inside a regular file's contents
_AFTER_NODE = 3  # an entry's node is complete; expecting end_entry()
_DIRECTORY = 4  # inside a directory; expecting entry() or end_directory()
_DONE = 5  # the root node is complete

_STATE_NAMES = {
    _ROOT: "expecting the root node",
    _NODE: "expecting an entry's node",
    _CONTENTS: "inside a regular file's contents",
    _AFTER_NODE: "expecting end_entry()",
    _DIRECTORY: "expecting entry() or end_directory()",
    _DONE: "the NAR is complete",
}


class NarWriter:
    """A validating, incremental NAR encoder.

    Each method returns the bytes to append to the NAR (the first node
    method's result starts with the ``nix-archive-1`` magic). Call them in
    the NAR's grammar order::

        node      := regular(executable, size) contents_chunk(...)* end_regular()
                   | regular_inline(executable, data)
                   | symlink(target)
                   | begin_directory() (entry(name) node end_entry())* end_directory()

    Entry names must be strictly increasing bytewise, the contents passed to
    :meth:`contents_chunk` must add up to the declared size, and the NAR ends
    after the root node. Any violation raises :class:`NARError` and leaves
    the writer unchanged. :attr:`size` counts every byte produced so far,
    contents included.

    The writer is not thread-safe; use one per NAR.
    """

    __slots__ = ("_names", "_remaining", "_size", "_state", "_trailer")

    def __init__(self) -> None:
        self._state = _ROOT
        # Per open directory, the last entry name written in it (b"" = none yet;
        # every valid name sorts after it).
        self._names: list[bytes] = []
        self._remaining = 0
        self._trailer = b""
        self._size = 0

    @property
    def size(self) -> int:
        """The number of NAR bytes produced so far (contents included)."""
        return self._size

    @property
    def done(self) -> bool:
        """Whether the root node is complete, i.e. the NAR is whole."""
        return self._state == _DONE

    def _error(self, action: str) -> NARError:
        return NARError(f"cannot {action} while {_STATE_NAMES[self._state]}")

    def _start_node(self, action: str) -> bytes:
        state = self._state
        if state == _NODE:
            return b""
        if state == _ROOT:
            return wire.MAGIC
        raise self._error(action)

    def _node_done(self) -> None:
        self._state = _AFTER_NODE if self._names else _DONE

    def regular(self, executable: bool, size: int) -> bytes:
        """Start a regular file of *size* bytes; returns its header.

        Follow with :meth:`contents_chunk` calls totalling *size* bytes,
        then :meth:`end_regular`.

        Raises:
            NARError: no node is expected here, or *size* is negative.
        """
        prefix = self._start_node("start a regular file")
        if size < 0:
            raise NARError(f"regular file size must not be negative, got {size}")
        header = wire.EXECUTABLE_HEADER if executable else wire.REGULAR_HEADER
        out = prefix + header + size.to_bytes(8, "little")
        self._state = _CONTENTS
        self._remaining = size
        self._trailer = wire.REGULAR_TRAILERS[-size & 7]
        self._size += len(out)
        return out

    def contents_chunk(self, data: _B) -> _B:
        """Account for *data* as the next piece of the current file's contents.

        Returns *data* itself, so it can be written without a copy.

        Raises:
            NARError: not inside a regular file, or more bytes than declared.
        """
        n = len(data)
        if self._state != _CONTENTS:
            raise self._error("write file contents")
        if n > self._remaining:
            raise NARError(
                f"file contents exceed the declared size: {n} more bytes "
                f"with only {self._remaining} left"
            )
        self._remaining -= n
        self._size += n
        return data

    def contents_written(self, n: int) -> None:
        """Like :meth:`contents_chunk` for *n* bytes the caller wrote on its own.

        Raises:
            NARError: not inside a regular file, or more bytes than declared.
        """
        if self._state != _CONTENTS:
            raise self._error("write file contents")
        if not 0 <= n <= self._remaining:
            raise NARError(
                f"file contents exceed the declared size: {n} more bytes "
                f"with only {self._remaining} left"
            )
        self._remaining -= n
        self._size += n

    def end_regular(self) -> bytes:
        """Finish the current regular file; returns its padding and ``)``.

        Raises:
            NARError: not inside a regular file, or fewer bytes than declared.
        """
        if self._state != _CONTENTS:
            raise self._error("end a regular file")
        if self._remaining:
            raise NARError(
                f"file contents are shorter than the declared size: {self._remaining} bytes missing"
            )
        out = self._trailer
        self._node_done()
        self._size += len(out)
        return out

    def regular_inline(self, executable: bool, data: bytes) -> bytes:
        """Return a whole regular file node with contents *data*, in one piece.

        Meant for small files: it saves calls at the cost of copying *data*.

        Raises:
            NARError: no node is expected here.
        """
        prefix = self._start_node("start a regular file")
        header = wire.EXECUTABLE_HEADER if executable else wire.REGULAR_HEADER
        n = len(data)
        out = b"".join(
            (prefix, header, n.to_bytes(8, "little"), data, wire.REGULAR_TRAILERS[-n & 7])
        )
        self._node_done()
        self._size += len(out)
        return out

    def symlink(self, target: bytes) -> bytes:
        """Return a symlink node pointing to *target*.

        Raises:
            NARError: no node is expected here, or the target is empty, has a
                NUL byte or is longer than :data:`~wire.MAX_TARGET_LEN`.
        """
        prefix = self._start_node("write a symlink")
        if not target or b"\0" in target or len(target) > wire.MAX_TARGET_LEN:
            raise NARError(
                f"invalid symlink target {target[:80]!r}: must be 1 to "
                f"{wire.MAX_TARGET_LEN} bytes without NUL"
            )
        out = prefix + wire.SYMLINK_HEADER + wire.token(target) + wire.CLOSE
        self._node_done()
        self._size += len(out)
        return out

    def begin_directory(self) -> bytes:
        """Start a directory node; returns its header.

        Raises:
            NARError: no node is expected here.
        """
        prefix = self._start_node("start a directory")
        out = prefix + wire.DIRECTORY_HEADER
        self._names.append(b"")
        self._state = _DIRECTORY
        self._size += len(out)
        return out

    def entry(self, name: bytes) -> bytes:
        """Start the directory entry *name*; a node must follow, then :meth:`end_entry`.

        Raises:
            NARError: not directly inside a directory, an invalid name (empty,
                ``/``, NUL, ``.``, ``..``, too long), or a name not sorting
                strictly after the previous entry's.
        """
        if self._state != _DIRECTORY:
            raise self._error("start a directory entry")
        reason = wire.invalid_name_reason(name)
        if reason is not None:
            raise NARError(f"invalid entry name {name[:80]!r}: {reason}")
        previous = self._names[-1]
        if name <= previous:
            raise NARError(
                f"entry {name!r} does not sort after the previous entry {previous!r}"
                if name != previous
                else f"duplicate entry {name!r}"
            )
        self._names[-1] = name
        out = wire.ENTRY_HEADER + wire.token(name) + wire.NODE
        self._state = _NODE
        self._size += len(out)
        return out

    def end_entry(self) -> bytes:
        """Finish the current directory entry; returns ``)``.

        Raises:
            NARError: the entry's node is not complete.
        """
        if self._state != _AFTER_NODE:
            raise self._error("end a directory entry")
        self._state = _DIRECTORY
        self._size += len(wire.CLOSE)
        return wire.CLOSE

    def end_directory(self) -> bytes:
        """Finish the current directory; returns ``)``.

        Raises:
            NARError: not directly inside a directory (e.g. an entry is open).
        """
        if self._state != _DIRECTORY:
            raise self._error("end a directory")
        self._names.pop()
        self._node_done()
        self._size += len(wire.CLOSE)
        return wire.CLOSE

    def finish(self) -> None:
        """Check that the NAR is complete.

        Raises:
            NARError: the root node is not complete.
        """
        if self._state != _DONE:
            raise NARError(f"the NAR is incomplete: {_STATE_NAMES[self._state]}")


def dump_path(path: str | bytes | os.PathLike[str], chunk_size: int = 1 << 20) -> Iterator[bytes]:
    """Yield the NAR of the local file, symlink or directory *path*.

    The result is byte-identical to ``nix-store --dump``: symlinks (the root
    included) are not followed, a regular file is executable iff its owner
    execute bit is set, entries are sorted bytewise and names are kept as
    raw bytes. File contents are read in pieces of at most *chunk_size*
    bytes, so memory stays bounded.

    Raises:
        NARError: a FIFO, socket or device is found (the message names it),
            or a file shrank while being read.
        OSError: the file system refused an operation.
    """
    writer = NarWriter()
    root = os.fsencode(path)
    # An explicit stack instead of recursion: each frame is (dir path, sorted
    # names, index of the next name).
    stack: list[tuple[bytes, list[bytes], int]] = []
    current = root
    while True:
        st = os.lstat(current)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            yield from _dump_regular(writer, current, st, chunk_size)
        elif stat.S_ISLNK(mode):
            yield writer.symlink(os.readlink(current))
        elif stat.S_ISDIR(mode):
            yield writer.begin_directory()
            stack.append((current, sorted(os.listdir(current)), 0))
        else:
            raise NARError(f"file {os.fsdecode(current)!r} has an unsupported type")
        # Find the next entry to write, closing finished directories.
        while stack:
            dir_path, names, index = stack[-1]
            if index > 0:
                yield writer.end_entry()
            if index < len(names):
                stack[-1] = (dir_path, names, index + 1)
                yield writer.entry(names[index])
                current = dir_path + b"/" + names[index]
                break
            stack.pop()
            yield writer.end_directory()
        else:
            break
    writer.finish()


def _dump_regular(
    writer: NarWriter, path: bytes, st: os.stat_result, chunk_size: int
) -> Iterator[bytes]:
    size = st.st_size
    executable = bool(st.st_mode & stat.S_IXUSR)
    with open(path, "rb", buffering=0) as f:
        if size <= chunk_size:
            data = f.read(size) if size else b""
            while len(data) < size:
                more = f.read(size - len(data))
                if not more:
                    raise NARError(f"file {os.fsdecode(path)!r} shrank while being read")
                data += more
            yield writer.regular_inline(executable, data)
            return
        yield writer.regular(executable, size)
        # Nix reads exactly the size lstat reported, ignoring any growth.
        remaining = size
        while remaining:
            data = f.read(min(chunk_size, remaining))
            if not data:
                raise NARError(f"file {os.fsdecode(path)!r} shrank while being read")
            remaining -= len(data)
            yield writer.contents_chunk(data)
        yield writer.end_regular()
