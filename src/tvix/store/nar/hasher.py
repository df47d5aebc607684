"""NAR size and sha256 of a tree as it is ingested, without reading anything back."""

from __future__ import annotations

import hashlib

from tvix.nixcompat.nar.writer import NarWriter

__all__ = ["NarHasher"]


class NarHasher:
    """An :class:`~tvix.castore.ingest.IngestObserver` that hashes the NAR of what it sees.

    The ingestion walk is in the NAR's own order (depth-first, entries sorted
    bytewise) and passes every byte of every file, so the framing written
    here around those bytes is exactly the NAR ``nix-store --dump`` would
    produce of the same tree. After the walk, :attr:`size` and
    :meth:`digest` give the NAR's size and sha256.
    """

    def __init__(self) -> None:
        self._writer = NarWriter()
        self._sha = hashlib.sha256()
        self.size = 0
        self._depth = 0
        self._remaining = 0

    def _out(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)

    def _entry(self, name: bytes) -> None:
        if self._depth:
            self._out(self._writer.entry(name))

    def _node_done(self) -> None:
        if self._depth:
            self._out(self._writer.end_entry())

    def directory_start(self, name: bytes) -> None:
        """See :meth:`IngestObserver.directory_start`."""
        self._entry(name)
        self._out(self._writer.begin_directory())
        self._depth += 1

    def directory_end(self) -> None:
        """See :meth:`IngestObserver.directory_end`."""
        self._out(self._writer.end_directory())
        self._depth -= 1
        self._node_done()

    def regular(self, name: bytes, executable: bool, size: int) -> None:
        """See :meth:`IngestObserver.regular`."""
        self._entry(name)
        self._out(self._writer.regular(executable, size))
        self._remaining = size
        if not size:
            self._end_regular()

    def data(self, chunk: bytes) -> None:
        """See :meth:`IngestObserver.data`."""
        self._writer.contents_written(len(chunk))
        self._out(chunk)
        self._remaining -= len(chunk)
        if not self._remaining:
            self._end_regular()

    def _end_regular(self) -> None:
        self._out(self._writer.end_regular())
        self._node_done()

    def symlink(self, name: bytes, target: bytes) -> None:
        """See :meth:`IngestObserver.symlink`."""
        self._entry(name)
        self._out(self._writer.symlink(target))
        self._node_done()

    def digest(self) -> bytes:
        """The sha256 of the whole NAR (call once the walk is done)."""
        self._writer.finish()
        return self._sha.digest()
