"""Shared test types: the three memory services, the CLI runner's type, an unlistable service."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.store.errors import ListNotSupportedError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService

#: Runs ``tvix-store ARGS`` in a separate process (see tests/cli/conftest.py).
Run = Callable[..., subprocess.CompletedProcess[bytes]]


@dataclass
class Services:
    """The three memory services."""

    blobs: MemoryBlobService
    dirs: MemoryDirectoryService
    infos: MemoryPathInfoService


class Unlistable(MemoryPathInfoService):
    """A memory PathInfo service that cannot list (as a remote cache cannot)."""

    supports_list = False

    def list(self) -> AsyncIterator[PathInfo]:
        raise ListNotSupportedError("no")
