"""The pack index: which pack holds each chunk, blob records, and per-pack accounting.

Three tables, the same in SQLite (``packs+file``) and PostgreSQL (``packs+s3``):

``packs(id, name, size, live)``
    Every pack with committed entries: ``size`` is its committed length
    (bytes past it are a torn tail, never read), ``live`` the bytes of the
    entries (headers included) that ``chunks`` points at. ``size - live -
    len(MAGIC)`` is dead (a chunk stored twice by racing writers, an
    uncommitted tail that was written over): what compaction would win.
``chunks(digest, pack, offset, length, size, codec)``
    Where each chunk's payload is (see :mod:`._format`).
``blobs(digest, chunks)``
    The chunk list of each blob stored in more than one chunk:
    ``(digest, u32 size)`` pairs, concatenated.

A commit adds one pack's new entries, the blob records whose chunks are now
all stored, and the pack's new committed size and live bytes, in one
transaction. Entries already indexed (another writer won the race) are not
counted as live.
"""

from __future__ import annotations

import abc
import os
import sqlite3
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from tvix.castore.blobservice.base import ChunkMeta
from tvix.castore.blobservice.packs._format import HEADER_SIZE, Location
from tvix.castore.digest import B3Digest
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.sql.sqlite import connect_immutable, out_of_space

__all__ = [
    "Entry",
    "PackIndex",
    "PackInfo",
    "SQLiteIndex",
    "decode_record",
    "encode_record",
    "sqlite_path",
]

_RECORD = struct.Struct("<32sI")
# Parameters per ``IN (...)``: below SQLite's limit of 32766.
_SQLITE_BATCH = 4000


@dataclass(frozen=True, slots=True)
class Entry:
    """A chunk newly appended to a pack: where its payload is."""

    digest: bytes
    offset: int
    length: int
    size: int
    codec: int


@dataclass(frozen=True, slots=True)
class PackInfo:
    """A pack as the index knows it."""

    name: str
    size: int
    live: int


def encode_record(chunks: Sequence[ChunkMeta]) -> bytes:
    return b"".join(_RECORD.pack(c.digest, c.size) for c in chunks)


def decode_record(raw: bytes, digest: bytes) -> list[ChunkMeta]:
    if not raw or len(raw) % _RECORD.size:
        raise IntegrityError(f"blob {digest.hex()}: damaged blob record")
    return [ChunkMeta(B3Digest(d), s) for d, s in _RECORD.iter_unpack(raw)]


class PackIndex(abc.ABC):
    """Where chunks are, the records of multi-chunk blobs, and the packs' accounting.

    ``commit_sync`` (when :attr:`sync_commit`) is called in the writer's
    thread right after the pack data is durable; otherwise :meth:`commit`.
    """

    sync_commit = False

    @abc.abstractmethod
    async def locate(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        """The locations of those of ``digests`` that are indexed chunks."""

    @abc.abstractmethod
    async def present(self, digests: Sequence[bytes]) -> dict[bytes, bool]:
        """``True`` for each of ``digests`` that is an indexed chunk (cheaper than locate)."""

    @abc.abstractmethod
    async def records(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """The encoded records of those of ``digests`` that are multi-chunk blobs."""

    async def commit(
        self, pack: str, size: int, entries: Sequence[Entry], records: Sequence[tuple[bytes, bytes]]
    ) -> None:
        """Index ``entries`` of ``pack`` (durable up to ``size``) and ``records``, atomically."""
        raise NotImplementedError

    def commit_sync(
        self, pack: str, size: int, entries: Sequence[Entry], records: Sequence[tuple[bytes, bytes]]
    ) -> None:
        """:meth:`commit`, blocking (for indexes with :attr:`sync_commit`)."""
        raise NotImplementedError

    @abc.abstractmethod
    async def packs(self) -> list[PackInfo]:
        """Every pack with committed entries."""

    @abc.abstractmethod
    async def entries(self, pack: str) -> list[tuple[bytes, Location]]:
        """Every chunk the index places in ``pack``, by offset."""

    @abc.abstractmethod
    async def all_records(self) -> list[tuple[bytes, bytes]]:
        """Every blob record (for ``verify``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections."""


SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS packs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    live INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    digest BLOB PRIMARY KEY,
    pack INTEGER NOT NULL REFERENCES packs(id),
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    size INTEGER NOT NULL,
    codec INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack, offset);
CREATE TABLE IF NOT EXISTS blobs (
    digest BLOB PRIMARY KEY,
    chunks BLOB NOT NULL
) WITHOUT ROWID
"""

_LOCATE = "SELECT digest, pack, offset, length, size, codec FROM chunks WHERE digest IN ({})"


class SQLiteIndex(PackIndex):
    """The index of ``packs+file``: an SQLite database in WAL mode, ``synchronous=FULL``.

    Several processes share it (WAL: readers never block, writers queue on
    the busy timeout). Lookups are point queries on a connection of the
    calling thread, run without a thread handoff (tens of microseconds,
    less than a handoff); commits run in the pack writer's thread.
    """

    sync_commit = True

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._names: dict[int, str] = {}  # pack id -> name, filled as chunks are located
        self.conn()  # create the schema now: fail early on an unusable path

    def conn(self) -> sqlite3.Connection:
        """This thread's connection.

        Opening writes nothing when the schema is there. On a disk too full
        to open the database normally (a WAL database needs its shared-memory
        file), it is opened read-only as immutable when its log is empty, so
        reads keep working; writes then fail saying the disk is full (see
        :meth:`commit_sync`, which reopens normally once there is room).
        """
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            if self._closed:
                raise StorageError(f"pack index {self.path} is closed")
            try:
                c = self._open()
            except sqlite3.OperationalError as e:
                if not out_of_space(self.path):
                    raise StorageError(f"pack index {self.path}: {e}") from e
                c = self._open_read_only(e)
            except sqlite3.Error as e:
                raise StorageError(f"pack index {self.path}: {e}") from e
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def _open(self) -> sqlite3.Connection:
        c = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            have = {r[0] for r in c.execute("SELECT name FROM sqlite_master")}
            if not {"packs", "chunks", "blobs", "chunks_by_pack"} <= have:
                c.execute("BEGIN IMMEDIATE")
                for stmt in SQLITE_SCHEMA.split(";"):
                    c.execute(stmt)
                c.execute("COMMIT")
        except BaseException:
            c.close()
            raise
        self._local.read_only = False
        return c

    def _open_read_only(self, cause: sqlite3.OperationalError) -> sqlite3.Connection:
        if not os.path.exists(self.path):
            raise StorageError(f"pack index {self.path}: {_describe(cause)}") from cause
        try:
            c = connect_immutable(self.path, cause, check_same_thread=False)
        except sqlite3.OperationalError:
            raise StorageError(f"pack index {self.path}: {_describe(cause)}") from cause
        self._local.read_only = True
        return c

    def _writable(self) -> sqlite3.Connection:
        """This thread's connection for a write: reopened normally if it was read-only."""
        c = self.conn()
        if getattr(self._local, "read_only", False):
            try:
                fresh = self._open()
            except sqlite3.Error as e:
                raise StorageError(
                    f"pack index {self.path}: no space left on device "
                    f"(opened read-only while the disk was full: {e})"
                ) from e
            with self._lock:
                self._all.remove(c)
                self._all.append(fresh)
            c.close()
            self._local.conn = c = fresh
        return c

    def locate_sync(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        """:meth:`locate`, blocking (it is a few microseconds per digest)."""
        out: dict[bytes, Location] = {}
        conn = self.conn()
        names = self._names
        try:
            for i in range(0, len(digests), _SQLITE_BATCH):
                part = digests[i : i + _SQLITE_BATCH]
                sql = _LOCATE.format(",".join("?" * len(part)))
                for d, pack, off, length, size, codec in conn.execute(sql, part):
                    name = names.get(pack)
                    if name is None:
                        name = self._pack_name(pack)
                    out[d] = Location(name, off, length, size, codec)
        except sqlite3.Error as e:
            raise StorageError(f"pack index {self.path}: {e}") from e
        return out

    def _pack_name(self, pack: int) -> str:
        row = self.conn().execute("SELECT name FROM packs WHERE id = ?", (pack,)).fetchone()
        if row is None:
            raise StorageError(f"pack index {self.path}: chunk in unknown pack {pack}")
        name: str = row[0]
        self._names[pack] = name  # ids are never reused
        return name

    async def locate(self, digests: Sequence[bytes]) -> dict[bytes, Location]:
        return self.locate_sync(digests)

    def present_sync(self, digests: Sequence[bytes]) -> dict[bytes, bool]:
        """:meth:`present`, blocking."""
        out: dict[bytes, bool] = {}
        conn = self.conn()
        try:
            for i in range(0, len(digests), _SQLITE_BATCH):
                part = digests[i : i + _SQLITE_BATCH]
                marks = ",".join("?" * len(part))
                sql = f"SELECT digest FROM chunks WHERE digest IN ({marks})"
                out.update((d, True) for (d,) in conn.execute(sql, part))
        except sqlite3.Error as e:
            raise StorageError(f"pack index {self.path}: {e}") from e
        return out

    async def present(self, digests: Sequence[bytes]) -> dict[bytes, bool]:
        return self.present_sync(digests)

    async def records(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        return self.records_sync(digests)

    def records_sync(self, digests: Sequence[bytes]) -> dict[bytes, bytes]:
        """:meth:`records`, blocking."""
        out: dict[bytes, bytes] = {}
        conn = self.conn()
        try:
            for i in range(0, len(digests), _SQLITE_BATCH):
                part = digests[i : i + _SQLITE_BATCH]
                marks = ",".join("?" * len(part))
                sql = f"SELECT digest, chunks FROM blobs WHERE digest IN ({marks})"
                out.update(conn.execute(sql, part).fetchall())
        except sqlite3.Error as e:
            raise StorageError(f"pack index {self.path}: {e}") from e
        return out

    def commit_sync(
        self, pack: str, size: int, entries: Sequence[Entry], records: Sequence[tuple[bytes, bytes]]
    ) -> None:
        conn = self._writable()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                if entries:
                    self._add_entries(conn, pack, size, entries)
                conn.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?)", records)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StorageError(f"pack index {self.path}: {_describe(e)}") from e

    @staticmethod
    def _add_entries(
        conn: sqlite3.Connection, pack: str, size: int, entries: Sequence[Entry]
    ) -> None:
        conn.execute(
            "INSERT INTO packs (name, size, live) VALUES (?, ?, 0) "
            "ON CONFLICT (name) DO UPDATE SET size = max(size, excluded.size)",
            (pack, size),
        )
        (pack_id,) = conn.execute("SELECT id FROM packs WHERE name = ?", (pack,)).fetchone()
        live = 0
        for e in entries:
            cur = conn.execute(
                "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?)",
                (e.digest, pack_id, e.offset, e.length, e.size, e.codec),
            )
            if cur.rowcount:
                live += HEADER_SIZE + e.length
        if live:
            conn.execute("UPDATE packs SET live = live + ? WHERE id = ?", (live, pack_id))

    def pack_size_sync(self, pack: str) -> int | None:
        """The committed size of ``pack`` (``None``: not indexed), read fresh."""
        row = self.conn().execute("SELECT size FROM packs WHERE name = ?", (pack,)).fetchone()
        return None if row is None else int(row[0])

    def packs_sync(self) -> list[PackInfo]:
        rows = self.conn().execute("SELECT name, size, live FROM packs ORDER BY id").fetchall()
        return [PackInfo(*r) for r in rows]

    async def packs(self) -> list[PackInfo]:
        return self.packs_sync()

    async def entries(self, pack: str) -> list[tuple[bytes, Location]]:
        rows = self.conn().execute(
            "SELECT c.digest, c.offset, c.length, c.size, c.codec FROM chunks c "
            "JOIN packs p ON p.id = c.pack WHERE p.name = ? ORDER BY c.offset",
            (pack,),
        )
        return [(d, Location(pack, o, n, s, k)) for d, o, n, s, k in rows]

    async def all_records(self) -> list[tuple[bytes, bytes]]:
        return self.conn().execute("SELECT digest, chunks FROM blobs").fetchall()

    async def close(self) -> None:
        self._closed = True
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            c.close()


def _describe(e: sqlite3.Error) -> str:
    """The error, said plainly when it is the disk being full."""
    if "disk is full" in str(e) or "disk I/O error" in str(e):
        return f"no space left on device ({e})"
    return str(e)


def sqlite_path(directory: str) -> str:
    """The index database of the packs+file store in ``directory``."""
    return os.path.join(directory, "index.sqlite")
