"""Conformance suites every castore backend, combinator and client must pass.

Subclass a suite in a test module and provide its service as a fixture::

    class TestMyBlobService(BlobServiceTests):
        @pytest.fixture
        async def blob_service(self) -> AsyncIterator[BlobService]:
            svc = MyBlobService(...)
            yield svc
            await svc.close()

Requires pytest and pytest-asyncio (``asyncio_mode = "auto"``).
"""

from tvix.castore.testing.blobservice import BlobServiceTests
from tvix.castore.testing.directoryservice import DirectoryServiceTests

__all__ = ["BlobServiceTests", "DirectoryServiceTests"]
