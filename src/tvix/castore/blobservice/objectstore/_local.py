"""``objectstore+file``'s objects as plain files, in the layout of obstore's ``LocalStore``.

obstore's ``LocalStore.put`` costs a fixed 0.6-0.7 ms of CPU per object,
against ~40 us for open/write/link here (see ``bench/NOTES.md``); with one
object per file of a source tree, that was most of an import.
"""

from __future__ import annotations

import itertools
import os
import threading

from tvix.castore.blobservice.objectstore._codec import MIB

__all__ = ["LocalFiles"]


class LocalFiles:
    """Objects as files below ``root``, laid out as obstore's LocalStore does."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._dirs: set[str] = set()
        self._tmp = itertools.count()

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

    def put(self, key: str, payload: bytes) -> None:
        """Write ``payload`` at ``key`` unless an object is there already."""
        path = f"{self.root}/{key}"
        parent = path.rpartition("/")[0]
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        tmp = f"{path}#{os.getpid()}.{threading.get_ident()}.{next(self._tmp)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            # The directory went away since it was made (someone cleaned up).
            os.makedirs(parent, exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces an existing object
        except FileExistsError:
            pass  # the same content, written earlier or concurrently
        finally:
            os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return os.path.exists(f"{self.root}/{key}")
