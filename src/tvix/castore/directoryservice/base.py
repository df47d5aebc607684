"""The DirectoryService interface: the contract every directory backend fulfils."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence, Set
from dataclasses import dataclass, field
from types import TracebackType
from typing import ClassVar, Self

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory

__all__ = ["DirectoryPutter", "DirectoryService", "DirectorySweep"]


@dataclass(slots=True)
class DirectorySweep:
    """What :meth:`DirectoryService.sweep` deleted (or, dry, would delete)."""

    deleted: int = 0
    kept: set[B3Digest] = field(default_factory=set)
    """The Directories that stay though not asked to be kept: those written or
    refreshed at or after the cutoff, and every Directory below them."""


class DirectoryPutter(abc.ABC):
    """Receives a closure of Directories, leaves first, and stores it all or nothing.

    Each Directory may only refer (through its DirectoryNodes) to Directories
    put earlier into the same putter or already stored, with the right
    ``size``. The last Directory put is the root. Every Directory put must be
    reachable from the root. The same Directory may be put more than once; it
    is stored once.

    :meth:`put` raises :class:`~tvix.castore.errors.ValidationError` as soon as
    a Directory refers to one not sent before (unless the backend checks
    already-stored ones at :meth:`close`). As an async context manager, the
    putter closes on a clean exit and aborts when the block raises.
    """

    @abc.abstractmethod
    async def put(self, directory: Directory) -> None:
        """Add ``directory`` to the closure."""

    @abc.abstractmethod
    async def close(self) -> B3Digest:
        """Validate and store the whole closure; return the root's digest.

        Raises :class:`~tvix.castore.errors.ValidationError` (and stores
        nothing) if the closure is empty, refers to a Directory neither sent
        nor stored, gives a wrong ``size``, or holds Directories not reachable
        from the root. Calling it again returns the same digest.
        """

    async def abort(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Discard the closure; nothing of it is stored."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if e is None:
            await self.close()
        else:
            await self.abort()


class DirectoryService(abc.ABC):
    """Stores Directories, each addressed by its :attr:`~tvix.castore.Directory.digest`.

    Only complete trees are stored: a Directory is accepted once every
    Directory it refers to is stored or put with it. Absence is a value
    (``None``, an empty iteration), failures are exceptions
    (:class:`~tvix.castore.errors.StorageError`); damaged stored data (a
    record that does not decode, or does not match its digest) raises
    :class:`~tvix.castore.errors.IntegrityError`. Methods may be called
    concurrently.

    Backends with :attr:`supports_gc` remember when each Directory was last
    written or *refreshed*: putting a Directory that is stored refreshes it,
    and a closure's put refreshes the stored Directories it refers to, in
    the transaction that finds them present (a closure whose stored children
    a concurrent :meth:`sweep` deleted is refused, never stored incomplete).
    A writer that relies on a stored Directory without putting it again
    must put it again (cheap: nothing is rewritten) to be safe from a GC.
    """

    supports_gc: ClassVar[bool] = False
    """Whether :meth:`sweep` can delete Directories."""

    @abc.abstractmethod
    async def get(self, digest: B3Digest) -> Directory | None:
        """The Directory ``digest``, or ``None`` when it is not stored."""

    @abc.abstractmethod
    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        """The Directory ``root``, then every Directory below it.

        Breadth-first, each Directory after one that refers to it, each digest
        once. Yields nothing when ``root`` is not stored. Raises
        :class:`~tvix.castore.errors.StorageError` if a Directory below the
        root is missing (the store is damaged).
        """

    @abc.abstractmethod
    def put_multiple_start(self) -> DirectoryPutter:
        """A putter for a closure of Directories; see :class:`DirectoryPutter`."""

    async def put(self, directory: Directory) -> B3Digest:
        """Store one Directory whose children are already stored; return its digest.

        Raises :class:`~tvix.castore.errors.ValidationError` if a child is
        not stored or its ``size`` is wrong.
        """
        async with self.put_multiple_start() as putter:
            await putter.put(directory)
        return await putter.close()

    async def sweep(
        self, keep: Set[B3Digest], cutoff: float, *, dry_run: bool = False
    ) -> DirectorySweep:
        """Delete every Directory not in ``keep`` that may go, atomically.

        ``keep`` must be closed (every Directory below one in it is in it).
        Stays: what is in ``keep``, every Directory written or refreshed at
        or after ``cutoff`` (unix seconds), and everything below those, so
        the store stays complete. The rest is deleted in one transaction
        that puts wait for. ``dry_run``: nothing changes; the result says
        what would. Raises :class:`NotImplementedError` without
        :attr:`supports_gc`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot delete Directories")

    async def remove(self, digests: Sequence[B3Digest]) -> int:
        """Delete the Directories ``digests`` now, whatever refers to them; how many were stored.

        For repairs: a Directory that is damaged or names a child no longer
        stored is removed (with the Directories above it) so that the next
        put of its closure stores it whole again. Raises
        :class:`NotImplementedError` without :attr:`supports_gc`.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot delete Directories")

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and handles; the service is unusable afterwards."""
