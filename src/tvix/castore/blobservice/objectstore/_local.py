"""``objectstore+file``'s objects as plain files, in the layout of obstore's ``LocalStore``.

obstore's ``LocalStore.put`` costs a fixed 0.6-0.7 ms of CPU per object,
against ~40 us for open/write/link here (see ``bench/NOTES.md``); with one
object per file of a source tree, that was most of an import.

Staging: an object is written to a file in :data:`STAGING` (below the root,
so on the same filesystem) named after the writer (``<pid>.<thread>.<n>``),
then hard-linked into place. A write that fails (a full disk) removes its
staging file; one whose writer was killed is left behind, and swept when a
store is next opened (:meth:`LocalFiles.sweep`): a staging file is removed
when its writer's process is gone, or when it is older than
:data:`STALE_AFTER` (no object takes that long to write, so no live writer
still owns it, even if its pid was reused).

Garbage collection (see :mod:`._gc`): an object's *seen* time is its
file's mtime. :meth:`LocalFiles.refresh` moves it to now (``utime``, which
fails on a deleted file: refreshing and confirming presence are one
system call). :meth:`LocalFiles.delete_unseen` quarantines an object before
deleting it: a hard link below :data:`~._gc.TRASH` shares the inode, so a
refresh that lands between the GC's check and its ``unlink`` shows in the
link's mtime, and the object is linked back.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator

from tvix.castore.blobservice.objectstore._codec import MIB
from tvix.castore.blobservice.objectstore._gc import REFRESH_SLACK, TRASH, Found, parse_key

__all__ = ["STAGING", "STALE_AFTER", "LocalFiles"]

#: The directory below the root where objects are staged.
STAGING = ".tvix-staging"
#: Seconds after which a staging file is stale whoever wrote it.
STALE_AFTER = 3600.0


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalFiles:
    """Objects as files below ``root``, laid out as obstore's LocalStore does.

    Opening sweeps stale staging files; :attr:`swept` lists those removed.
    """

    refresh_slack = REFRESH_SLACK
    """Objects seen this recently (seconds) are not refreshed again."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self.staging = f"{self.root}/{STAGING}"
        self._dirs: set[str] = set()
        self._tmp = itertools.count()
        self.swept: list[str] = self.sweep()

    def sweep(self) -> list[str]:
        """Remove the staging files no live writer owns; the paths removed."""
        try:
            names = os.listdir(self.staging)
        except (FileNotFoundError, NotADirectoryError):
            return []
        now = time.time()
        removed = []
        for name in names:
            path = f"{self.staging}/{name}"
            try:
                age = now - os.lstat(path).st_mtime
            except FileNotFoundError:
                continue  # finished meanwhile
            pid = name.partition(".")[0]
            if pid.isdigit() and _alive(int(pid)) and age < STALE_AFTER:
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return removed

    def get(self, key: str) -> bytes | None:
        try:
            fd = os.open(f"{self.root}/{key}", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            first = os.read(fd, 4 * MIB)
            if len(first) < 4 * MIB:
                return first  # a short read of a regular file is its end: one syscall
            parts = [first]
            while chunk := os.read(fd, 4 * MIB):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def _ensure_dir(self, path: str) -> None:
        if path not in self._dirs:
            os.makedirs(path, exist_ok=True)
            self._dirs.add(path)

    def put(self, key: str, payload: bytes) -> None:
        """Write ``payload`` at ``key`` unless an object is there already.

        On any failure the staging file is removed (only a killed writer
        leaves one behind).
        """
        path = f"{self.root}/{key}"
        parent = path.rpartition("/")[0]
        self._ensure_dir(parent)
        self._ensure_dir(self.staging)
        tmp = f"{self.staging}/{os.getpid()}.{threading.get_ident()}.{next(self._tmp)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            # The directory went away since it was made (someone cleaned up).
            os.makedirs(self.staging, exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        linked = False
        try:
            try:
                view = memoryview(payload)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)  # atomic, and never replaces an existing object
            except FileExistsError:
                # The same content, written earlier or concurrently: refreshed
                # (a GC may have deleted it since the link failed: then link again).
                if not self.refresh(key):
                    with contextlib.suppress(FileExistsError):
                        os.link(tmp, path)
            except FileNotFoundError:
                os.makedirs(parent, exist_ok=True)  # removed since it was made
                with contextlib.suppress(FileExistsError):
                    os.link(tmp, path)
            linked = True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            if not linked:
                # Nothing left behind: not even the object's directory, if empty.
                self._dirs.discard(parent)
                with contextlib.suppress(OSError):
                    os.rmdir(parent)

    def exists(self, key: str) -> bool:
        return os.path.exists(f"{self.root}/{key}")

    def refresh(self, key: str) -> bool:
        """Whether ``key`` is stored; if so, its seen time is within :attr:`refresh_slack`."""
        path = f"{self.root}/{key}"
        try:
            if os.stat(path).st_mtime >= time.time() - self.refresh_slack:
                return True
            os.utime(path)
        except FileNotFoundError:
            return False
        return True

    def remove(self, key: str) -> bool:
        """Delete ``key`` unconditionally (a damaged object); whether it was there."""
        try:
            os.unlink(f"{self.root}/{key}")
        except FileNotFoundError:
            return False
        return True

    def scan(self, kind: str) -> Iterator[Found]:
        """Every object below ``kind/b3/``: its digest, seen time and size."""
        base = f"{self.root}/{kind}/b3"
        try:
            shards = os.listdir(base)
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                entries = list(os.scandir(f"{base}/{shard}"))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for e in entries:
                digest = parse_key(e.name)
                if digest is None:
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield Found(digest, st.st_mtime, st.st_size)

    def server_offset(self) -> float:
        """Seconds the clock of seen times runs ahead of ours: none, it is our file system."""
        return 0.0

    def delete_unseen(self, key: str, cutoff: float) -> bool:
        """Delete ``key`` if still seen before ``cutoff``; whether it was deleted.

        Linked into the trash first (the same inode), then unlinked, then the
        inode's mtime checked again: a refresh in between (``utime`` of the
        object's path) is seen there, and the object is linked back.
        """
        path = f"{self.root}/{key}"
        trash = f"{self.root}/{TRASH}/{key}"
        try:
            if os.stat(path).st_mtime >= cutoff:
                return False
        except FileNotFoundError:
            return False
        os.makedirs(trash.rpartition("/")[0], exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(trash)  # left by a killed sweep: the same bytes
        try:
            os.link(path, trash)
        except FileNotFoundError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if os.stat(trash).st_mtime >= cutoff:
            with contextlib.suppress(FileExistsError):
                os.link(trash, path)  # refreshed meanwhile: it stays
            os.unlink(trash)
            return False
        os.unlink(trash)
        return True

    def recover(self) -> int:
        """Put back what a killed sweep left in the trash; how many objects."""
        restored = 0
        for root, _dirs, files in os.walk(f"{self.root}/{TRASH}"):
            for name in files:
                trash = f"{root}/{name}"
                key = trash.removeprefix(f"{self.root}/{TRASH}/")
                os.makedirs(f"{self.root}/{key}".rpartition("/")[0], exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.link(trash, f"{self.root}/{key}")
                    restored += 1
                os.unlink(trash)
        return restored

    def finish(self, cutoff: float) -> int:
        """Nothing to tidy after a sweep (seen times are the files' own)."""
        return 0
