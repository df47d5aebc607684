"""Building services from URLs: the valid and the rejected."""

from __future__ import annotations

import pytest

from tvix.castore import InvalidURLError, blobservice, directoryservice


@pytest.mark.parametrize("url", ["memory://", "memory:///"])
def test_valid(url: str) -> None:
    assert isinstance(blobservice.from_url(url), blobservice.MemoryBlobService)
    assert isinstance(directoryservice.from_url(url), directoryservice.MemoryDirectoryService)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("memory://host", "no host expected"),
        ("memory:///some/path", "no path expected"),
        ("memory://?foo=bar", "unknown option.*foo"),
        ("memory://?a=1&a=2", "'a' given twice"),
        ("nope://", "unknown scheme 'nope'"),
        ("memory", "expected scheme://"),
        ("", "expected scheme://"),
    ],
)
def test_invalid(url: str, message: str) -> None:
    with pytest.raises(InvalidURLError, match=message):
        blobservice.from_url(url)
    with pytest.raises(InvalidURLError, match=message):
        directoryservice.from_url(url)
