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

Chunks and blob records also carry ``seen``: the time (unix seconds) they
were last written or *refreshed* — found present by a writer deduplicating
against them or by ``has``. Garbage collection deletes only rows seen
before its cutoff, in the transaction that checks it (:meth:`PackIndex.sweep`),
so whoever relies on a row it found has refreshed it first (see
:mod:`tvix.store.gc`).

A commit adds one pack's new entries, the blob records whose chunks are now
all stored, and the pack's new committed size and live bytes, in one
transaction. Entries already indexed (another writer won the race) are not
counted as live.
"""

from __future__ import annotations

import abc
import contextlib
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from typing_extensions import override

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
    "SweepResult",
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


@dataclass(slots=True)
class SweepResult:
    """What :meth:`PackIndex.sweep` deleted (or, dry, would delete)."""

    records: int = 0
    chunks: int = 0
    bytes: int = 0
    """Bytes of pack entries (headers included) no longer live."""


def now() -> int:
    """The ``seen`` time of a row written or refreshed now."""
    return int(time.time())


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
    supports_gc = False
    """Whether :meth:`refresh`, :meth:`sweep`, :meth:`relocate` and
    :meth:`forget_if_empty` work."""

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

    async def refresh(self, digests: Sequence[bytes], fresh_after: int) -> set[bytes]:
        """Those of ``digests`` stored (as chunks or blob records), refreshed.

        Each is now seen no earlier than ``fresh_after`` (rows seen before are
        set to now).

        Atomic with :meth:`sweep`: a digest returned is not deleted by a sweep
        whose cutoff is at most ``fresh_after``.
        """
        raise NotImplementedError

    async def sweep(self, live: set[bytes], cutoff: float, *, dry_run: bool = False) -> SweepResult:
        """Delete the blob records and chunks no longer needed, in one transaction.

        Kept: records of ``live`` blobs, records seen at or after ``cutoff``,
        the chunks those records list, chunks in ``live`` (single-chunk
        blobs) and chunks seen at or after ``cutoff``. Everything else is
        deleted and each pack's live bytes lowered by what it lost. With
        ``dry_run`` nothing changes; the result says what would go.
        """
        raise NotImplementedError

    async def relocate(
        self, old: str, new: str, size: int, moves: Sequence[Entry]
    ) -> tuple[int, bool]:
        """Point the chunks ``moves`` still in pack ``old`` at their copies in ``new``.

        Atomically; ``new`` is durable up to ``size``; ``old`` is forgotten
        once nothing is left in it. Returns the bytes moved and whether
        ``old`` is forgotten.
        """
        raise NotImplementedError

    async def forget_if_empty(self, pack: str) -> bool:
        """Drop the row of ``pack`` if no chunk is in it; whether it is gone."""
        raise NotImplementedError

    async def drop(
        self, chunks: Sequence[tuple[bytes, Location]], records: Sequence[bytes] = ()
    ) -> int:
        """Remove damaged entries, atomically; how many rows went.

        The row of each of ``chunks`` only if it still places the chunk at that
        location (a copy written or moved since is kept), and the blob records
        ``records``. A writer then finds them absent and stores them again.
        """
        raise NotImplementedError

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
    codec INTEGER NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack, offset);
CREATE TABLE IF NOT EXISTS blobs (
    digest BLOB PRIMARY KEY,
    chunks BLOB NOT NULL,
    seen INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID
"""

# Indexes made before garbage collection lack ``seen``: their rows count as
# seen long ago, which is what they are.
_ADD_SEEN = [
    ("chunks", "ALTER TABLE chunks ADD COLUMN seen INTEGER NOT NULL DEFAULT 0"),
    ("blobs", "ALTER TABLE blobs ADD COLUMN seen INTEGER NOT NULL DEFAULT 0"),
]

_LOCATE = "SELECT digest, pack, offset, length, size, codec FROM chunks WHERE digest IN ({})"


class SQLiteIndex(PackIndex):
    """The index of ``packs+file``: an SQLite database in WAL mode, ``synchronous=FULL``.

    Several processes share it (WAL: readers never block, writers queue on
    the busy timeout). Lookups are point queries on a connection of the
    calling thread, run without a thread handoff (tens of microseconds,
    less than a handoff); commits run in the pack writer's thread.
    """

    sync_commit = True
    supports_gc = True

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
            missing = [
                alter
                for table, alter in _ADD_SEEN
                if "seen" not in {r[1] for r in c.execute(f"PRAGMA table_info({table})")}
            ]
            if missing:
                c.execute("BEGIN IMMEDIATE")
                for alter in missing:
                    # Ask again under the lock: another process may have added it.
                    table = alter.split()[2]
                    if "seen" not in {r[1] for r in c.execute(f"PRAGMA table_info({table})")}:
                        c.execute(alter)
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

    @contextlib.contextmanager
    def _writing(self, conn: sqlite3.Connection, *, dry_run: bool = False) -> Iterator[None]:
        """A write transaction on ``conn``: committed when the block ends, else rolled back.

        Rolled back too with ``dry_run``. ``IMMEDIATE`` takes the write lock
        up front, so a writer in another process waits (busy timeout) instead
        of failing half-way. SQLite's errors become :class:`StorageError`.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("ROLLBACK" if dry_run else "COMMIT")
        except sqlite3.Error as e:
            raise StorageError(f"pack index {self.path}: {_describe(e)}") from e

    def commit_sync(
        self, pack: str, size: int, entries: Sequence[Entry], records: Sequence[tuple[bytes, bytes]]
    ) -> None:
        conn = self._writable()
        with self._writing(conn):
            if entries:
                self._add_entries(conn, pack, size, entries)
            t = now()
            conn.executemany(
                "INSERT INTO blobs VALUES (?, ?, ?) ON CONFLICT (digest) DO UPDATE "
                "SET seen = excluded.seen",
                [(d, c, t) for d, c in records],
            )

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
        t = now()
        for e in entries:
            cur = conn.execute(
                "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?)",
                (e.digest, pack_id, e.offset, e.length, e.size, e.codec, t),
            )
            if cur.rowcount:
                live += HEADER_SIZE + e.length
            else:
                # Stored by another writer: this copy is dead, the row is refreshed.
                conn.execute("UPDATE chunks SET seen = ? WHERE digest = ?", (t, e.digest))
        if live:
            conn.execute("UPDATE packs SET live = live + ? WHERE id = ?", (live, pack_id))

    def drop_sync(
        self, chunks: Sequence[tuple[bytes, Location]], records: Sequence[bytes] = ()
    ) -> int:
        """:meth:`drop`, blocking."""
        conn = self._writable()
        dropped = 0
        with self._writing(conn):
            for digest, loc in chunks:
                cur = conn.execute(
                    "DELETE FROM chunks WHERE digest = ? AND offset = ? AND pack = "
                    "(SELECT id FROM packs WHERE name = ?)",
                    (digest, loc.offset, loc.pack),
                )
                if cur.rowcount:
                    dropped += 1
                    conn.execute(
                        "UPDATE packs SET live = live - ? WHERE name = ?",
                        (HEADER_SIZE + loc.length, loc.pack),
                    )
            for digest in records:
                dropped += conn.execute("DELETE FROM blobs WHERE digest = ?", (digest,)).rowcount
        return dropped

    @override
    async def drop(
        self, chunks: Sequence[tuple[bytes, Location]], records: Sequence[bytes] = ()
    ) -> int:
        return self.drop_sync(chunks, records)

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

    @override
    async def refresh(self, digests: Sequence[bytes], fresh_after: int) -> set[bytes]:
        conn = self.conn()
        present: set[bytes] = set()
        stale: list[bytes] = []
        try:
            for table in ("chunks", "blobs"):
                for i in range(0, len(digests), _SQLITE_BATCH):
                    part = digests[i : i + _SQLITE_BATCH]
                    marks = ",".join("?" * len(part))
                    for d, seen in conn.execute(
                        f"SELECT digest, seen FROM {table} WHERE digest IN ({marks})", part
                    ):
                        if seen >= fresh_after:
                            present.add(d)
                        else:
                            stale.append(d)
        except sqlite3.Error as e:
            raise StorageError(f"pack index {self.path}: {e}") from e
        if stale:
            with self._writing(conn):
                t = now()
                for table in ("chunks", "blobs"):
                    for i in range(0, len(stale), _SQLITE_BATCH):
                        part = stale[i : i + _SQLITE_BATCH]
                        marks = ",".join("?" * len(part))
                        conn.execute(
                            f"UPDATE {table} SET seen = ? WHERE digest IN ({marks})", [t, *part]
                        )
                        present.update(
                            r[0]
                            for r in conn.execute(
                                f"SELECT digest FROM {table} WHERE digest IN ({marks})", part
                            )
                        )
        return present

    @override
    async def sweep(self, live: set[bytes], cutoff: float, *, dry_run: bool = False) -> SweepResult:
        conn = self.conn()
        result = SweepResult()
        with self._writing(conn, dry_run=dry_run):
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS gc_live (digest BLOB PRIMARY KEY) WITHOUT ROWID"
            )
            conn.execute("DELETE FROM gc_live")
            conn.executemany("INSERT OR IGNORE INTO gc_live VALUES (?)", ((d,) for d in live))
            cur = conn.execute(
                "DELETE FROM blobs WHERE seen < ? AND digest NOT IN (SELECT digest FROM gc_live)",
                (cutoff,),
            )
            result.records = cur.rowcount
            # The chunks of every record that stays are live.
            for digest, raw in conn.execute("SELECT digest, chunks FROM blobs").fetchall():
                conn.executemany(
                    "INSERT OR IGNORE INTO gc_live VALUES (?)",
                    ((c.digest,) for c in decode_record(raw, digest)),
                )
            dead = "seen < ? AND digest NOT IN (SELECT digest FROM gc_live)"
            freed = conn.execute(
                f"SELECT pack, count(*), sum(length + {HEADER_SIZE}) FROM chunks "
                f"WHERE {dead} GROUP BY pack",
                (cutoff,),
            ).fetchall()
            conn.execute(f"DELETE FROM chunks WHERE {dead}", (cutoff,))
            for pack_id, count, nbytes in freed:
                result.chunks += count
                result.bytes += nbytes
                conn.execute("UPDATE packs SET live = live - ? WHERE id = ?", (nbytes, pack_id))
            conn.execute("DELETE FROM gc_live")
        return result

    @override
    async def relocate(
        self, old: str, new: str, size: int, moves: Sequence[Entry]
    ) -> tuple[int, bool]:
        conn = self.conn()
        with self._writing(conn):
            row = conn.execute("SELECT id FROM packs WHERE name = ?", (old,)).fetchone()
            moved = 0
            if row is not None:
                conn.execute(
                    "INSERT INTO packs (name, size, live) VALUES (?, ?, 0) "
                    "ON CONFLICT (name) DO UPDATE SET size = max(size, excluded.size)",
                    (new, size),
                )
                (new_id,) = conn.execute("SELECT id FROM packs WHERE name = ?", (new,)).fetchone()
                for e in moves:
                    cur = conn.execute(
                        "UPDATE chunks SET pack = ?, offset = ?, length = ?, codec = ? "
                        "WHERE digest = ? AND pack = ?",
                        (new_id, e.offset, e.length, e.codec, e.digest, row[0]),
                    )
                    if cur.rowcount:
                        moved += HEADER_SIZE + e.length
                conn.execute("UPDATE packs SET live = live + ? WHERE id = ?", (moved, new_id))
                conn.execute("UPDATE packs SET live = live - ? WHERE id = ?", (moved, row[0]))
            gone = self._forget_if_empty(conn, old)
        return moved, gone

    @staticmethod
    def _forget_if_empty(conn: sqlite3.Connection, pack: str) -> bool:
        row = conn.execute("SELECT id FROM packs WHERE name = ?", (pack,)).fetchone()
        if row is None:
            return True
        if conn.execute("SELECT 1 FROM chunks WHERE pack = ? LIMIT 1", (row[0],)).fetchone():
            return False
        conn.execute("DELETE FROM packs WHERE id = ?", (row[0],))
        return True

    @override
    async def forget_if_empty(self, pack: str) -> bool:
        conn = self.conn()
        with self._writing(conn):
            gone = self._forget_if_empty(conn, pack)
        return gone

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
