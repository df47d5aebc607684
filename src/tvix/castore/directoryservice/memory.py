"""``memory://``: Directories in a dict, for tests and ephemeral use."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext, EmptyConfig
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryPutter, DirectoryService
from tvix.castore.directoryservice.closure import BufferedDirectoryPutter
from tvix.castore.directoryservice.traverse import traverse_bfs

__all__ = ["MemoryDirectoryService", "MemoryDirectoryServiceConfig"]


class MemoryDirectoryService(DirectoryService):
    """Directories held in a dict. Lost when the process ends."""

    def __init__(self) -> None:
        self._directories: dict[B3Digest, Directory] = {}

    @override
    async def get(self, digest: B3Digest) -> Directory | None:
        return self._directories.get(digest)

    async def _get_many(self, digests: Sequence[B3Digest]) -> dict[B3Digest, Directory]:
        have = self._directories
        return {d: have[d] for d in digests if d in have}

    @override
    def get_recursive(self, root: B3Digest) -> AsyncIterator[Directory]:
        return traverse_bfs(self._get_many, root)

    @override
    def put_multiple_start(self) -> DirectoryPutter:
        return BufferedDirectoryPutter(self._commit, self._get_many)

    async def _commit(self, root: B3Digest, directories: list[Directory]) -> None:
        for directory in directories:
            self._directories.setdefault(directory.digest, directory)


@dataclass(frozen=True)
class MemoryDirectoryServiceConfig(EmptyConfig):
    """``memory://`` (type ``memory``): no settings."""

    def build(self, ctx: BuildContext) -> MemoryDirectoryService:
        """A new, empty service."""
        return MemoryDirectoryService()
