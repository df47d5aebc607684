"""Several PathInfo sources asked at once; the first acceptable answer wins.

Composition only (it refers to other services, so it has no URL): name it
``type = "race"`` with ``sources = ["a", "b", ...]`` in a composition file,
or build it directly. Each kind has its race combinator and config.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext
from tvix.castore.errors import CastoreError, IntegrityError
from tvix.castore.race import RaceConfig, first_answer
from tvix.store.errors import StoreError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import Check, PathInfoService, check_digest

__all__ = ["Check", "RacePathInfoService", "RacePathInfoServiceConfig"]

log = logging.getLogger(__name__)


class RacePathInfoService(PathInfoService):
    """PathInfos read from whichever of ``sources`` answers first with an acceptable one.

    A PathInfo is not content-addressed, so "verifies" means: it is for the
    store path asked for, and it passes ``check`` (when given) — a
    :data:`Check`, typically a signature check (see
    :class:`~tvix.store.pathinfoservice.trust.TrustedPathInfoService`, which
    hands its check to what it wraps through :meth:`get_checked`, so that
    an unsigned answer from a fast source does not hide a signed one from a
    slower source).

    Reads
        :meth:`get` asks every source at once; the first acceptable answer
        wins and the other calls are cancelled. A source whose answer is
        refused, or which fails, is logged and skipped. ``None`` only when
        every source says absent; if none gave an acceptable answer and some
        failed or were refused, that is raised (e.g. the check's own error).
        :meth:`get_checked` does the same with another check (run inside
        the race, after ``check``).
        :meth:`list` is not raced: it streams each source's listing in turn,
        each store path once (the first source's copy; later copies are
        not compared), leaving out (with a warning) what ``check`` refuses;
        :attr:`supports_list` holds when
        every source can list; :attr:`supports_put` is the first source's.
    Writes
        :meth:`put` stores into the first source only (the primary) and
        returns what it stored; the others are mirrors this service only
        reads from.
    Not raced
        Writes and listings. Nothing is cached: every read asks every source.

    It does not close the sources: whoever built them does.
    """

    def __init__(self, sources: Sequence[PathInfoService], check: Check | None = None) -> None:
        if not sources:
            raise ValueError("a race needs at least one source")
        self.sources = list(sources)
        self.check = check

    @override
    @property
    def supports_list(self) -> bool:
        return all(s.supports_list for s in self.sources)

    @override
    @property
    def supports_put(self) -> bool:
        return self.sources[0].supports_put

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        return await self._race(digest, self.check)

    @override
    async def get_checked(self, digest: bytes, check: Check) -> PathInfo | None:
        return await self._race(digest, self._and_own_check(check))

    def _and_own_check(self, check: Check) -> Check:
        own = self.check
        if own is None:
            return check

        async def both(info: PathInfo) -> None:
            await own(info)
            await check(info)

        return both

    async def _race(self, digest: bytes, check: Check | None) -> PathInfo | None:
        digest = check_digest(digest)

        async def ask(source: PathInfoService) -> PathInfo | None:
            info = await source.get(digest)
            if info is None:
                return None
            if info.store_path.digest != digest:
                raise IntegrityError(
                    f"PathInfo {digest.hex()}: the source answered with {info.store_path}"
                )
            if check is not None:
                await check(info)
            return info

        found = await first_answer(self.sources, ask, f"PathInfo {digest.hex()}")
        return None if found is None else found[1]

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        return await self.sources[0].put(info)

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        seen: set[bytes] = set()
        for source in self.sources:
            async for info in source.list():
                digest = info.store_path.digest
                if digest in seen:
                    continue
                seen.add(digest)
                if self.check is not None:
                    try:
                        await self.check(info)
                    except (StoreError, CastoreError) as e:
                        log.warning("race: listing: skipping %s: %s", info.store_path, e)
                        continue
                yield info


@dataclass(frozen=True)
class RacePathInfoServiceConfig(RaceConfig):
    """A :class:`RacePathInfoService` (see :class:`RaceConfig`)."""

    def build(self, ctx: BuildContext) -> RacePathInfoService:
        """The sources come from the composition."""
        return RacePathInfoService(self.source_services(ctx))
