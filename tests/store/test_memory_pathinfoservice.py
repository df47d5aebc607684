"""The memory PathInfo service against the conformance suite."""

from __future__ import annotations

import pytest

from tvix.store.pathinfoservice import MemoryPathInfoService, PathInfoService
from tvix.store.testing import PathInfoServiceTests


class TestMemoryPathInfoService(PathInfoServiceTests):
    @pytest.fixture
    def path_info_service(self) -> PathInfoService:
        return MemoryPathInfoService()
