"""Several Directory sources asked at once; the first answer that verifies wins.

Composition only (it refers to other services, so it has no URL): name it
``type = "race"`` with ``sources = ["a", "b", ...]`` in a composition file,
or build it directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.directoryservice.graph import verified_closure
from tvix.castore.errors import IntegrityError
from tvix.castore.race import RaceConfig, first_answer

__all__ = ["RaceDirectoryService", "RaceDirectoryServiceConfig"]


class RaceDirectoryService(DirectoryService):
    """Directories read from whichever of ``sources`` answers first with the right ones.

    Reads
        :meth:`get` asks every source at once; the first Directory whose
        digest is the one asked for wins (a Directory that exists is valid:
        the model checked it when it was decoded). :meth:`get_recursive`
        asks every source for the whole closure at once (one recursive get
        each), and the first closure that verifies wins: it starts with the
        root asked for, every Directory referred to is in it with the size
        its parent gives, and nothing else is (see
        :func:`~tvix.castore.directoryservice.graph.verified_closure`). A
        closure is therefore held in memory until it is verified and
        yielded (Directories are small: ~100 bytes plus their entries). The
        losers' calls are cancelled. A source that answers wrongly or fails
        is logged and skipped. Absence (``None``, nothing yielded) only when
        every source says absent; if none has it and some failed, the
        failure is raised.
    Writes
        :meth:`put_multiple_start` writes to the first source only (the
        primary), which validates the closure against what it stores; the
        others are mirrors this service only reads from.
    Not raced
        Writes. Nothing is cached: every read asks every source.

    It does not close the sources: whoever built them does.
    """

    def __init__(self, sources: Sequence[DirectoryService]) -> None:
        if not sources:
            raise ValueError("a race needs at least one source")
        self.sources = list(sources)

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        async def ask(source: DirectoryService) -> Directory | None:
            directory = await source.get(digest)
            if directory is not None and directory.digest != digest:
                raise IntegrityError(
                    f"Directory {digest.hex()}: the source returned {directory.digest.hex()}"
                )
            return directory

        found = await first_answer(self.sources, ask, f"Directory {digest.hex()}")
        return None if found is None else found[1]

    @override
    async def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        async def ask(source: DirectoryService) -> list[Directory] | None:
            fetched = [d async for d in source.get_recursive(root)]
            if not fetched:
                return None
            bfs, _leaves_first = verified_closure(root, fetched)
            return bfs

        found = await first_answer(self.sources, ask, f"closure of Directory {root.hex()}")
        if found is not None:
            for directory in found[1]:
                yield directory

    @override
    def put_multiple_start(self) -> DirectoryPutter:
        return self.sources[0].put_multiple_start()


@dataclass(frozen=True)
class RaceDirectoryServiceConfig(RaceConfig):
    """A :class:`RaceDirectoryService` (see :class:`RaceConfig`)."""

    def build(self, ctx: BuildContext) -> RaceDirectoryService:
        """The sources come from the composition."""
        return RaceDirectoryService(self.source_services(ctx))
