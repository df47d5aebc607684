"""The PathInfoService interface: the contract every PathInfo backend fulfils."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable

from tvix.store.errors import InvalidPathInfoError, ListNotSupportedError
from tvix.store.gcstate.base import GCState
from tvix.store.pathinfo import PathInfo

__all__ = ["Check", "PathInfoService", "check_digest"]

Check = Callable[[PathInfo], Awaitable[None]]
"""Vets a PathInfo a source returned: returns to accept it, raises to refuse it."""


def check_digest(digest: bytes) -> bytes:
    """``digest`` if it is the 20 bytes of a store path hash, else :class:`InvalidPathInfoError`."""
    if len(digest) != 20:
        raise InvalidPathInfoError(f"store path digest must be 20 bytes, not {len(digest)}")
    return bytes(digest)


class PathInfoService(abc.ABC):
    """Stores PathInfos, each under the 20-byte digest of its store path.

    PathInfo is the one record that is not content-addressed: whoever can
    put may say anything about a store path, so backends fed from untrusted
    sources sit behind a trust check (:mod:`tvix.store.trust`). Absence is a
    value (``None``), failures are exceptions
    (:class:`~tvix.castore.errors.StorageError`); damaged stored data (a
    record that does not decode, or is not the PathInfo of the store path it
    is stored under) raises :class:`~tvix.castore.errors.IntegrityError`.
    Methods may be called concurrently.

    Capabilities: a service that cannot enumerate what it stores says so
    with :attr:`supports_list`; a read-only one with :attr:`supports_put`;
    one that can delete (for garbage collection) with :attr:`supports_delete`.
    Combinators answer for what they wrap.
    """

    @property
    def supports_list(self) -> bool:
        """Whether :meth:`list` can enumerate the stored PathInfos (default: true)."""
        return True

    @property
    def supports_put(self) -> bool:
        """Whether :meth:`put` can store PathInfos (default: true; false: read-only)."""
        return True

    @property
    def supports_delete(self) -> bool:
        """Whether :meth:`delete` and :meth:`list_added` work (for GC; default false)."""
        return False

    @property
    def gc_state(self) -> GCState | None:
        """Where garbage collection of this service's store keeps its lock and pins, if here.

        A service whose records several machines share (PostgreSQL) keeps
        them beside its records, so that every machine's GC, ``delete`` and
        ``pin`` use the same ones. ``None`` (the default): the caller keeps
        them beside the store (the CLI: in the data directory). Owned by the
        service: closed when it is.
        """
        return None

    @abc.abstractmethod
    async def get(self, digest: bytes) -> PathInfo | None:
        """The PathInfo of the store path whose hash part decodes to ``digest``, or ``None``.

        Raises :class:`InvalidPathInfoError` if ``digest`` is not 20 bytes.
        """

    async def get_checked(self, digest: bytes, check: Check) -> PathInfo | None:
        """Like :meth:`get`, returning only an answer that passes ``check`` (else its error).

        The hook through which a trust check reaches the source: by default
        :meth:`get`, then ``check`` on the answer; a service with several
        sources (:class:`~tvix.store.pathinfoservice.race.RacePathInfoService`)
        checks each source's answer, so a refused one disqualifies only its
        source.
        """
        info = await self.get(digest)
        if info is not None:
            await check(info)
        return info

    @abc.abstractmethod
    async def put(self, info: PathInfo) -> PathInfo:
        """Store ``info``, replacing any earlier PathInfo of the same store path.

        Returns once it is durably stored, with the PathInfo as stored (a
        backend may add signatures). Does not check that the root node's
        contents are stored: that is the caller's job (the frontends do).
        Raises :class:`~tvix.castore.errors.StorageError` when
        :attr:`supports_put` is false.
        """

    def list(self) -> AsyncIterator[PathInfo]:
        """Every stored PathInfo, streamed, in no particular order.

        Raises :class:`~tvix.store.errors.ListNotSupportedError` when
        :attr:`supports_list` is false.
        """
        raise ListNotSupportedError(f"{type(self).__name__} cannot list PathInfos")

    async def delete(self, digest: bytes) -> bool:
        """Remove the PathInfo of ``digest``; whether there was one.

        Durable when it returns. Only the PathInfo goes: what it refers to
        stays until a garbage collection finds nothing else refers to it.
        Raises :class:`NotImplementedError` without :attr:`supports_delete`,
        :class:`InvalidPathInfoError` if ``digest`` is not 20 bytes.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot delete PathInfos")

    def list_added(self) -> AsyncIterator[tuple[PathInfo, float]]:
        """Every stored PathInfo with when it was last put (unix seconds; 0 if unknown).

        Raises :class:`NotImplementedError` without :attr:`supports_delete`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not know when PathInfos came")

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and handles; the service is unusable afterwards."""
