"""Validation of a Directory closure sent leaves-first, shared by every backend."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter
from tvix.castore.errors import ValidationError

__all__ = ["BufferedDirectoryPutter", "ClosureValidator"]

# Looks up the sizes of already-stored Directories: digest -> size, absent ones left out.
SizeLookup = Callable[[list[B3Digest]], Awaitable[dict[B3Digest, int]]]


class ClosureValidator:
    """Checks a closure Directory by Directory as it arrives, leaves first.

    References to Directories not sent earlier are collected and resolved
    against the store (through a :data:`SizeLookup`) at :meth:`finalize`.
    """

    def __init__(self) -> None:
        self._sizes: dict[B3Digest, int] = {}
        self._order: list[Directory] = []
        self._external: dict[B3Digest, tuple[int, bytes]] = {}
        self._last: Directory | None = None

    def add(self, directory: Directory) -> None:
        """Accept ``directory``; raises :class:`ValidationError` on a size mismatch."""
        digest = directory.digest
        self._last = directory
        if digest in self._sizes:
            return
        if digest in self._external:
            raise ValidationError(
                f"invalid closure: Directory {digest.hex()} sent after a Directory that refers "
                f"to it as {self._external[digest][1]!r} (closures go leaves first)"
            )
        for child in directory.directories:
            size = self._sizes.get(child.digest)
            if size is None:
                known = self._external.get(child.digest)
                if known is not None and known[0] != child.size:
                    raise _wrong_size(child.name, child.digest, child.size, known[0])
                self._external[child.digest] = (child.size, child.name)
            elif size != child.size:
                raise _wrong_size(child.name, child.digest, child.size, size)
        self._sizes[digest] = directory.size
        self._order.append(directory)

    async def finalize(self, lookup: SizeLookup | None) -> tuple[B3Digest, list[Directory]]:
        """The root's digest and the new Directories leaves-first, each once.

        Raises :class:`ValidationError` if the closure is empty, refers to
        Directories that are neither in it nor stored (``lookup`` ``None``
        means nothing is stored), or holds Directories unreachable from the root.
        """
        root = self._last
        if root is None:
            raise ValidationError("invalid closure: no Directories sent")
        external = {d: v for d, v in self._external.items() if d not in self._sizes}
        if external:
            stored = await lookup(list(external)) if lookup is not None else {}
            for digest, (size, name) in external.items():
                have = stored.get(digest)
                if have is None:
                    raise ValidationError(
                        f"invalid closure: {name!r} refers to Directory {digest.hex()}, "
                        "which was not sent before it and is not stored"
                    )
                if have != size:
                    raise _wrong_size(name, digest, size, have)
        self._check_connected(root)
        return root.digest, self._order

    def _check_connected(self, root: Directory) -> None:
        by_digest = {d.digest: d for d in self._order}
        seen = {root.digest}
        stack = [root]
        while stack:
            for child in stack.pop().directories:
                if child.digest not in seen and child.digest in by_digest:
                    seen.add(child.digest)
                    stack.append(by_digest[child.digest])
        if len(seen) != len(by_digest):
            orphans = [d.hex() for d in by_digest if d not in seen]
            raise ValidationError(
                f"invalid closure: {len(orphans)} Directories not reachable from the root "
                f"{root.digest.hex()}, e.g. {orphans[0]}"
            )


def _wrong_size(name: bytes, digest: B3Digest, claimed: int, actual: int) -> ValidationError:
    return ValidationError(
        f"invalid closure: {name!r} gives size {claimed} for Directory {digest.hex()}, "
        f"whose size is {actual}"
    )


Commit = Callable[[B3Digest, list[Directory]], Awaitable[None]]


class BufferedDirectoryPutter(DirectoryPutter):
    """A putter that validates as Directories arrive and commits the closure at close.

    ``commit(root, directories)`` must store all of them or none (one
    transaction); ``lookup`` resolves references to already-stored ones.
    """

    def __init__(self, commit: Commit, lookup: SizeLookup | None) -> None:
        self._validator = ClosureValidator()
        self._commit = commit
        self._lookup = lookup
        self._root: B3Digest | None = None
        self._aborted = False

    async def put(self, directory: Directory) -> None:
        if self._root is not None or self._aborted:
            raise ValueError("put into a closed directory putter")
        self._validator.add(directory)

    async def close(self) -> B3Digest:
        if self._root is None:
            if self._aborted:
                raise ValueError("close of an aborted directory putter")
            root, directories = await self._validator.finalize(self._lookup)
            await self._commit(root, directories)
            self._root = root
        return self._root

    async def abort(self) -> None:
        self._aborted = True
