"""Shared test types: the three memory services, the CLI runner's type."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.store.pathinfoservice import MemoryPathInfoService

#: Runs ``tvix-store ARGS`` in a separate process (see tests/cli/conftest.py).
Run = Callable[..., subprocess.CompletedProcess[bytes]]


@dataclass
class Services:
    """The three memory services."""

    blobs: MemoryBlobService
    dirs: MemoryDirectoryService
    infos: MemoryPathInfoService
