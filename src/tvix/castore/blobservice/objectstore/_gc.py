"""Garbage collection of the object layout: seen times, refreshes, quarantined deletes.

The sweep itself (which objects, in which order) is
:meth:`~._service.ObjectStoreBlobService.sweep`; this module and
:class:`~._local.LocalFiles` provide what it needs of object stores and of files.

Every object's *seen* time is when it was last written or refreshed:

- ``objectstore+file``: the file's mtime; a refresh is ``utime``, which
  fails on a deleted file, so refreshing and confirming presence are one
  step (:class:`~._local.LocalFiles`).
- object stores (S3, memory): the later of the object's ``LastModified`` and
  that of its *marker*, an empty object at ``gc/seen/<key>`` (S3 refuses to
  copy an object onto itself unchanged, and obstore cannot replace
  metadata; a marker PUT costs ~0.6 ms against ~4.8 ms for copying the object
  away and back, measured on SeaweedFS). A refresh PUTs the marker *then*
  checks the object is there (:class:`RemoteObjects`).

``has`` answering yes and a writer finding a chunk or record already stored
refresh it, when its seen time is older than :data:`REFRESH_SLACK`.

A sweep deletes an object only when it is neither live nor seen since the
cutoff, re-checked object by object, and *quarantined* first: the object is
linked (files) or copied (object stores) below :data:`TRASH`, deleted, and
its seen time read once more. A refresh that landed after the first check
shows there (the same inode; the marker), and the object is put back from
the trash. A refresh after the deletion finds the object absent, and its
writer stores it again. So a writer that was told "present" at ``t`` keeps
the object unless ``t`` is older than the GC's cutoff plus the slack, as
for the packed store (see :mod:`tvix.store.gc`). A sweep killed in the
middle leaves objects in the trash; the next sweep puts them back before it
starts (they are judged again).

Order: blob records first, then chunks: a record is deleted before any
chunk it lists, and every record that stays (live, young, or refreshed
during the sweep) is read and its chunks kept, whoever else refers to them.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import obstore
from obstore.exceptions import BaseError

from tvix.castore.blobservice.objectstore._config import first_line
from tvix.castore.errors import StorageError

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = [
    "REFRESH_SLACK",
    "SEEN",
    "TRASH",
    "Found",
    "GCObjects",
    "RemoteObjects",
    "parse_key",
]

#: Objects found present are refreshed when last seen longer ago than this
#: (seconds); a GC's grace period must be longer (see :mod:`tvix.store.gc`).
REFRESH_SLACK = 60.0
#: Below the root: where a sweep quarantines what it deletes.
TRASH = "gc/trash"
#: Below the root (object stores): the markers of refreshes.
SEEN = "gc/seen"
# Refreshes this process made recently, kept at most this many.
_RECENT_MAX = 100_000


@dataclass(frozen=True, slots=True)
class Found:
    """An object a scan found: its digest, when it was last seen, and its stored size."""

    digest: bytes
    seen: float
    size: int


def parse_key(name: str) -> bytes | None:
    """The digest a key's last segment names, or ``None`` for anything else."""
    if len(name) != 64:
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


class GCObjects(Protocol):
    """What a sweep needs of the objects: blocking calls, run in worker threads."""

    def scan(self, kind: str) -> Iterator[Found]: ...
    def server_offset(self) -> float: ...
    def delete_unseen(self, key: str, cutoff: float) -> bool: ...
    def recover(self) -> int: ...
    def finish(self, cutoff: float) -> int: ...
    def remove(self, key: str) -> bool: ...


def _timestamp(meta: obstore.ObjectMeta) -> float:
    return meta["last_modified"].timestamp()


class RemoteObjects:
    """Seen times, refreshes and quarantined deletes on an obstore store (S3, memory)."""

    refresh_slack = REFRESH_SLACK
    """Objects seen this recently (seconds) are not refreshed again."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix
        self._lock = threading.Lock()
        self._recent: dict[str, float] = {}

    def _marker(self, key: str) -> str:
        return f"{self._prefix}{SEEN}/{key.removeprefix(self._prefix)}"

    def _trash(self, key: str) -> str:
        return f"{self._prefix}{TRASH}/{key.removeprefix(self._prefix)}"

    def _head(self, key: str) -> obstore.ObjectMeta | None:
        try:
            return obstore.head(self._store, key)
        except FileNotFoundError:
            return None

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            obstore.delete(self._store, key)

    def _fresh(self, key: str, modified: float | None) -> bool:
        now = time.time()
        if modified is not None and modified >= now - self.refresh_slack:
            return True
        with self._lock:
            return self._recent.get(key, 0.0) >= now - self.refresh_slack

    def remember(self, key: str, at: float) -> None:
        """``key`` was written (or refreshed) at ``at``: no refresh needed for a while."""
        with self._lock:
            if len(self._recent) >= _RECENT_MAX:
                self._recent.clear()
            self._recent[key] = at

    async def found(self, key: str) -> bool:
        """Whether ``key`` is stored; if so, refreshed (marker first, then the object checked)."""
        try:
            meta = await obstore.head_async(self._store, key)
            if self._fresh(key, _timestamp(meta)):
                return True
            at = time.time()
            await obstore.put_async(self._store, self._marker(key), b"")
            await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return False
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: checking {key} failed: {first_line(e)}") from e
        self.remember(key, at)
        return True

    def refresh_sync(self, key: str, *, force: bool = False) -> bool:
        """Like :meth:`found`, blocking, for a writer that found ``key`` already stored.

        ``force``: even if this process refreshed it recently (after a plain PUT).
        """
        if not force and self._fresh(key, None):
            return True
        at = time.time()
        obstore.put(self._store, self._marker(key), b"")
        if self._head(key) is None:
            return False
        self.remember(key, at)
        return True

    def remove(self, key: str) -> bool:
        """Delete ``key`` unconditionally (a damaged object); whether it was there."""
        found = self._head(key) is not None
        self._delete(key)
        self._delete(self._marker(key))
        with self._lock:
            self._recent.pop(key, None)
        return found

    def scan(self, kind: str) -> Iterator[Found]:
        markers: dict[bytes, float] = {}
        for batch in obstore.list(self._store, f"{self._prefix}{SEEN}/{kind}/b3/"):
            for m in batch:
                digest = parse_key(m["path"].rpartition("/")[2])
                if digest is not None:
                    markers[digest] = _timestamp(m)
        for batch in obstore.list(self._store, f"{self._prefix}{kind}/b3/"):
            for m in batch:
                digest = parse_key(m["path"].rpartition("/")[2])
                if digest is not None:
                    seen = max(_timestamp(m), markers.get(digest, 0.0))
                    yield Found(digest, seen, m["size"])

    def server_offset(self) -> float:
        """Seconds the store's clock (``LastModified``) runs ahead of ours."""
        key = f"{self._prefix}gc/clock"
        before = time.time()
        obstore.put(self._store, key, b"")
        meta = self._head(key)
        # LastModified has whole seconds: an offset below 2 s is not measurable.
        offset = 0.0 if meta is None else _timestamp(meta) - before
        return offset if abs(offset) > 2 else 0.0

    def delete_unseen(self, key: str, cutoff: float) -> bool:
        marker, trash = self._marker(key), self._trash(key)
        meta = self._head(key)
        if meta is None:
            return False
        seen = _timestamp(meta)
        if (m := self._head(marker)) is not None:
            seen = max(seen, _timestamp(m))
        if seen >= cutoff:
            return False
        try:
            obstore.copy(self._store, key, trash)
        except FileNotFoundError:
            return False
        self._delete(key)
        m = self._head(marker)
        if m is not None and _timestamp(m) >= cutoff:
            # Refreshed meanwhile: its writer relies on it. Put it back (S3 has no
            # copy-if-absent; if a writer stored it again, the bytes are the same).
            obstore.copy(self._store, trash, key)
            self._delete(trash)
            return False
        self._delete(trash)
        if m is not None:
            self._delete(marker)
        return True

    def recover(self) -> int:
        restored = 0
        base = f"{self._prefix}{TRASH}/"
        for batch in obstore.list(self._store, base):
            for m in batch:
                key = self._prefix + m["path"].removeprefix(base)
                if self._head(key) is None:
                    obstore.copy(self._store, m["path"], key)
                    restored += 1
                self._delete(m["path"])
        return restored

    def finish(self, cutoff: float) -> int:
        """Delete markers older than ``cutoff`` whose object is gone; how many."""
        removed = 0
        base = f"{self._prefix}{SEEN}/"
        for batch in obstore.list(self._store, base):
            for m in batch:
                if _timestamp(m) >= cutoff:
                    continue
                key = self._prefix + m["path"].removeprefix(base)
                if self._head(key) is None:
                    self._delete(m["path"])
                    removed += 1
        return removed
