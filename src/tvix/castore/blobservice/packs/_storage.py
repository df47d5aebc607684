"""Where pack bytes live: files in a directory, or objects in an S3 bucket.

Every method blocks; the service calls them in worker threads.

``LocalPacks`` (``packs+file``): ``DIR/packs/<name>.pack``. Each service
appends to one pack at a time, holding an exclusive ``flock`` on it, so
writers in other processes never append to the same pack; readers need no
lock (they read only below a pack's committed size, which only grows).
An append is written and ``fdatasync``-ed before the index commit that
makes its entries visible, so a crash leaves at worst an unindexed tail.
When a writer needs a pack it first takes over an unlocked indexed pack
that is not full (truncating it to its committed size: a torn tail is
reclaimed there), else creates one: under a temporary name, locked, then
renamed, so a ``.pack`` file nobody holds is either indexed or an orphan
of a crash. Orphans (no committed entries) are deleted when a writer opens.

``S3Packs`` (``packs+s3``): ``PREFIX/packs/<name>.pack``, each written once
with one PUT (put-if-not-exists), read with ranged GETs. A crash between
the PUT and the index commit leaves an orphan object, which ``verify``
reports as reclaimable.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import os
import secrets
import threading
import time

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store
from typing_extensions import override

from tvix.castore.blobservice.packs._format import MAGIC
from tvix.castore.blobservice.packs._index import SQLiteIndex
from tvix.castore.errors import StorageError

__all__ = ["LocalPacks", "PackStorage", "S3Packs"]

# Seconds between checks for read descriptors of packs deleted meanwhile.
PRUNE_EVERY = 30.0
# A temporary pack file older than this with nobody holding it is a crash's leftover.
_STALE_TMP = 60.0


def _new_name() -> str:
    return f"{int(time.time()):x}-{secrets.token_hex(8)}"


class PackStorage(abc.ABC):
    """Pack bytes: durable appends, reads of byte ranges."""

    @abc.abstractmethod
    def append(self, parts: list[bytes], limit: int, sync: bool = True) -> tuple[str, int, int]:
        """Store ``parts`` (entries) back to back in one pack.

        Durably if ``sync``; else :meth:`sync` makes them so, until the pack
        :meth:`rolls`.

        Returns the pack's name, the offset of the first byte and the pack's
        size after them. ``limit``: the pack size at which to start a new one.
        """

    def rolls(self, limit: int) -> bool:
        """Whether the next append goes to another pack than the last."""
        return True

    def sync(self) -> None:  # noqa: B027 - optional hook
        """Make what was appended to the current pack durable."""

    @abc.abstractmethod
    def read(self, pack: str, start: int, end: int) -> bytes | memoryview:
        """Bytes ``[start, end)`` of ``pack``: one ``pread`` or one ranged GET."""

    def will_read(self, pack: str, start: int, end: int) -> None:  # noqa: B027 - optional hook
        """A hint: bytes ``[start, end)`` of ``pack`` will be read soon (never fails)."""

    @abc.abstractmethod
    def listing(self) -> dict[str, int]:
        """Every stored pack and its stored size."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and locks."""

    # -- compaction ----------------------------------------------------------------------------

    def compactor(self) -> PackStorage:
        """Another appender to this storage that only ever writes new packs.

        For compaction: it must not take over a pack being compacted.
        """
        raise NotImplementedError

    def claim(self, pack: str) -> object | None:
        """Keep writers from appending to ``pack`` until :meth:`unclaim`.

        ``None`` when a writer holds it (it is skipped this time).
        """
        return True

    def unclaim(self, claim: object) -> None:  # noqa: B027 - optional hook
        """Let go of a :meth:`claim`."""

    def let_go(self) -> None:  # noqa: B027 - optional hook
        """Stop appending to the current pack, so that it can be compacted.

        Everything appended is committed; the next append picks a pack anew.
        """

    @abc.abstractmethod
    def delete(self, pack: str) -> None:
        """Delete ``pack`` (the index no longer knows it); absent is fine."""

    def reclaim(self) -> None:  # noqa: B027 - optional hook
        """Delete packs a crash left that the index never learnt of."""


class LocalPacks(PackStorage):
    """Pack files below ``root/packs`` (see the module docs)."""

    def __init__(self, root: str, index: SQLiteIndex, *, take_over: bool = True) -> None:
        self.root = root
        self.dir = os.path.join(root, "packs")
        os.makedirs(self.dir, exist_ok=True)
        self._index = index
        self._take_over = take_over
        self._read_fds: dict[str, int] = {}
        # Read descriptors of packs deleted since (by a GC, perhaps in another
        # process), closed at the next prune: late enough that no read still
        # uses them, soon enough that their disk space is returned.
        self._retired: list[int] = []
        self._pruned = time.monotonic()
        self._lock = threading.Lock()
        # The pack this service appends to (touched by the writer thread only).
        self._fd: int | None = None
        self._name = ""
        self._size = 0
        self._reclaimed = False

    def path(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.pack")

    # -- appending ---------------------------------------------------------------------------

    def rolls(self, limit: int) -> bool:
        return self._fd is None or self._size >= limit

    def sync(self) -> None:
        if self._fd is not None:
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                raise StorageError(f"pack {self.path(self._name)}: sync failed: {e}") from e

    def append(self, parts: list[bytes], limit: int, sync: bool = True) -> tuple[str, int, int]:
        if self._fd is None or self._size >= limit:
            self._next_pack(limit)
        fd = self._fd
        assert fd is not None
        start = self._size
        data = b"".join(parts)
        try:
            view = memoryview(data)
            pos = start
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
            if sync:
                os.fdatasync(fd)
        except OSError as e:
            # Leave the pack as it was; if even that fails, the tail stays unindexed.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise StorageError(f"pack {self.path(self._name)}: writing failed: {e}") from e
        self._size = start + len(data)
        return self._name, start, self._size

    def _next_pack(self, limit: int) -> None:
        self._release()
        if not self._reclaimed:
            self._reclaimed = True
            self._reclaim()
        for info in sorted(self._index.packs_sync(), key=lambda p: p.size):
            if info.size >= limit or not self._take_over:
                break
            fd = self._try_lock(self.path(info.name), os.O_RDWR)
            if fd is None:
                continue
            # Read again under the lock: the last holder may have committed since.
            size = self._index.pack_size_sync(info.name)
            if size is None or size >= limit:
                os.close(fd)
                continue
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)  # a torn or uncommitted tail: reclaimed
            self._fd, self._name, self._size = fd, info.name, size
            return
        self._create()

    def _create(self) -> None:
        name = _new_name()
        tmp = os.path.join(self.dir, f"{name}.tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, MAGIC)
            os.fdatasync(fd)
            os.rename(tmp, self.path(name))
            _fsync_dir(self.dir)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StorageError(f"pack directory {self.dir}: cannot create a pack: {e}") from e
        self._fd, self._name, self._size = fd, name, len(MAGIC)

    @staticmethod
    def _try_lock(path: str, flags: int) -> int | None:
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _reclaim(self) -> None:
        """Delete pack files of crashed writers that never committed anything."""
        indexed = {p.name for p in self._index.packs_sync()}
        now = time.time()
        for entry in os.scandir(self.dir):
            name, dot, ext = entry.name.rpartition(".")
            if not dot or name in indexed or ext not in ("pack", "tmp"):
                continue
            fd = self._try_lock(entry.path, os.O_RDONLY)
            if fd is None:
                continue
            try:
                st = os.fstat(fd)
                if ext == "tmp" and now - st.st_mtime < _STALE_TMP:
                    continue  # perhaps being created right now
                # Ask again under the lock: its writer may have committed and let go.
                if self._index.pack_size_sync(name) is None:
                    os.unlink(entry.path)
            finally:
                os.close(fd)

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None

    # -- reading -----------------------------------------------------------------------------

    def _read_fd(self, pack: str) -> int:
        if time.monotonic() - self._pruned > PRUNE_EVERY:
            self._prune()
        fd = self._read_fds.get(pack)
        if fd is None:
            with self._lock:
                fd = self._read_fds.get(pack)
                if fd is None:
                    try:
                        fd = os.open(self.path(pack), os.O_RDONLY)
                    except OSError as e:
                        raise StorageError(f"pack {self.path(pack)}: {e.strerror}") from e
                    self._read_fds[pack] = fd
        return fd

    @override
    def will_read(self, pack: str, start: int, end: int) -> None:
        # The kernel reads it in the background, while the bytes before it are
        # verified and served: a cold read keeps the disk busy.
        # Only a hint: the read itself reports what is wrong.
        with contextlib.suppress(OSError, StorageError):
            os.posix_fadvise(self._read_fd(pack), start, end - start, os.POSIX_FADV_WILLNEED)

    def read(self, pack: str, start: int, end: int) -> bytes:
        fd = self._read_fd(pack)
        want = end - start
        try:
            data = os.pread(fd, want, start)
            if len(data) < want:
                parts = [data]
                got = len(data)
                while got < want:
                    more = os.pread(fd, want - got, start + got)
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                data = b"".join(parts)
        except OSError as e:
            raise StorageError(f"pack {self.path(pack)}: reading failed: {e.strerror}") from e
        if len(data) < want:
            raise StorageError(
                f"pack {self.path(pack)} ends at {start + len(data)}, expected {end} bytes "
                "(the store is damaged)"
            )
        return data

    def listing(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in os.scandir(self.dir):
            if entry.name.endswith(".pack"):
                out[entry.name.removesuffix(".pack")] = entry.stat().st_size
        return out

    def _prune(self) -> None:
        """Retire the read descriptors of deleted packs; close those retired before."""
        with self._lock:
            self._pruned = time.monotonic()
            retired, self._retired = self._retired, []
            for name, fd in list(self._read_fds.items()):
                try:
                    gone = os.fstat(fd).st_nlink == 0
                except OSError:
                    gone = True
                if gone:
                    self._retired.append(self._read_fds.pop(name))
        for fd in retired:
            os.close(fd)

    def close(self) -> None:
        self._release()
        with self._lock:
            fds = [*self._read_fds.values(), *self._retired]
            self._read_fds, self._retired = {}, []
        for fd in fds:
            os.close(fd)

    @override
    def let_go(self) -> None:
        self._release()

    @override
    def compactor(self) -> LocalPacks:
        return LocalPacks(self.root, self._index, take_over=False)

    @override
    def claim(self, pack: str) -> object | None:
        return self._try_lock(self.path(pack), os.O_RDWR)

    @override
    def unclaim(self, claim: object) -> None:
        assert isinstance(claim, int)
        os.close(claim)

    @override
    def delete(self, pack: str) -> None:
        with self._lock:
            fd = self._read_fds.pop(pack, None)
            if fd is not None:
                self._retired.append(fd)  # closed at the next prune
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(pack))
        _fsync_dir(self.dir)

    @override
    def reclaim(self) -> None:
        self._reclaim()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class S3Packs(PackStorage):
    """Pack objects below ``prefix`` in an S3 bucket (see the module docs)."""

    def __init__(self, store: S3Store, prefix: str) -> None:
        self._store = store
        self._prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self._create_mode = True

    def key(self, name: str) -> str:
        return f"{self._prefix}packs/{name}.pack"

    def append(self, parts: list[bytes], limit: int, sync: bool = True) -> tuple[str, int, int]:
        name = _new_name()  # one object per append: a PUT is durable when done
        payload = b"".join([MAGIC, *parts])
        key = self.key(name)
        try:
            if self._create_mode:
                try:
                    obstore.put(self._store, key, payload, mode="create", use_multipart=False)
                except obstore.exceptions.NotSupportedError:
                    self._create_mode = False
            if not self._create_mode:
                obstore.put(self._store, key, payload, use_multipart=False)
        except (BaseError, OSError) as e:
            raise StorageError(f"S3: writing {key} failed: {_first_line(e)}") from e
        return name, len(MAGIC), len(payload)

    def read(self, pack: str, start: int, end: int) -> bytes | memoryview:
        key = self.key(pack)
        if start == end:
            return b""  # an empty chunk: no request (S3 has no empty ranges)
        try:
            data = memoryview(obstore.get_range(self._store, key, start=start, end=end))
        except FileNotFoundError as e:
            raise StorageError(f"S3: pack {key} is missing (the store is damaged)") from e
        except (BaseError, OSError) as e:
            raise StorageError(f"S3: reading {key} failed: {_first_line(e)}") from e
        if len(data) != end - start:
            raise StorageError(f"S3: pack {key} is shorter than its index says (damaged)")
        return data

    @override
    def compactor(self) -> S3Packs:
        return self  # every append is a new object

    @override
    def delete(self, pack: str) -> None:
        key = self.key(pack)
        try:
            obstore.delete(self._store, key)
        except FileNotFoundError:
            pass
        except (BaseError, OSError) as e:
            raise StorageError(f"S3: deleting {key} failed: {_first_line(e)}") from e

    def listing(self) -> dict[str, int]:
        out: dict[str, int] = {}
        prefix = f"{self._prefix}packs/"
        try:
            for batch in obstore.list(self._store, prefix=prefix):
                for meta in batch:
                    name = meta["path"].removeprefix(prefix)
                    if name.endswith(".pack"):
                        out[name.removesuffix(".pack")] = meta["size"]
        except (BaseError, OSError) as e:
            raise StorageError(f"S3: listing {prefix} failed: {_first_line(e)}") from e
        return out
