"""The GCState interface: where one store's garbage collection keeps its lock and pins."""

from __future__ import annotations

import abc
from contextlib import AbstractAsyncContextManager

from tvix.nixcompat.storepath import StorePath

__all__ = ["GCState"]


class GCState(abc.ABC):
    """The lock and the pins of one store's garbage collection.

    Every process that collects a store, deletes from it or pins in it must
    use the same GC state, wherever it runs: the state must live where all
    of them reach (beside an embedded store; in the database a shared
    store's machines share). :attr:`where` names it for messages.

    The lock makes a GC the only one of its store: :meth:`lock` never
    waits, and the lock goes with its holder (the block ends, the process
    dies, its connection is lost). Pins are named roots: each protects a
    store path's closure from retention by age and from ``delete``. Pin
    changes are durable when the call returns and seen at once by every
    user of the state. Methods may be called concurrently.
    """

    #: The place the state lives, for messages (a file, a database; no password).
    where: str

    @abc.abstractmethod
    def lock(self) -> AbstractAsyncContextManager[None]:
        """Hold the store's GC lock for the block.

        Raises :class:`~tvix.store.errors.GCBusyError` at once, naming
        :attr:`where`, while another holder has it: another process, on
        this machine or (for a shared state) another, or another
        :meth:`lock` of this process (it is not reentrant). Released when
        the block ends, and when the holder dies without ending it. A lock
        that can be lost while held (a database connection) is watched:
        when it is lost, the block is cancelled and
        :class:`~tvix.store.errors.GCError` raised, so that no GC goes on
        unlocked.
        """

    @abc.abstractmethod
    async def add_pin(self, name: str, path: StorePath) -> None:
        """Pin ``path`` as ``name``, replacing what ``name`` pinned."""

    @abc.abstractmethod
    async def remove_pin(self, name: str) -> bool:
        """Unpin ``name``; whether it was pinned."""

    @abc.abstractmethod
    async def pins(self) -> list[tuple[str, StorePath]]:
        """Every pin as ``(name, path)``, sorted by name."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and files (a held lock too); unusable afterwards."""
