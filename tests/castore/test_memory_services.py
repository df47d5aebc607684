"""The memory backends against the conformance suites."""

from __future__ import annotations

import pytest

from tvix.castore.blobservice import BlobService, MemoryBlobService
from tvix.castore.directoryservice import DirectoryService, MemoryDirectoryService
from tvix.castore.testing import BlobServiceTests, DirectoryServiceTests


class TestMemoryBlobService(BlobServiceTests):
    @pytest.fixture
    def blob_service(self) -> BlobService:
        return MemoryBlobService()


class TestMemoryDirectoryService(DirectoryServiceTests):
    @pytest.fixture
    def directory_service(self) -> DirectoryService:
        return MemoryDirectoryService()
