"""A real headless browser for end-to-end tests: Debian's Chromium, driven by Playwright.

Playwright's own browser download cannot work offline, so it drives the
system Chromium (``./dev setup`` installs Debian's ``chromium``). Screenshots
are test artifacts, kept under ``test-artifacts/browser/`` in the checkout
(or ``$TVIX_TEST_ARTIFACTS/browser``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
# Headless as root in a container, and quiet: no connections to Google's hosts
# (this machine's network is closed; Chromium would retry them at every start).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def artifacts_dir() -> Path:
    """Where screenshots go (created)."""
    root = os.environ.get("TVIX_TEST_ARTIFACTS")
    base = Path(root) if root else Path(__file__).resolve().parents[2] / "test-artifacts"
    out = base / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``), shared by a module's tests.

    Not by the session's: while Playwright's sync API is open, its event loop
    counts as running in the main thread, and pytest-asyncio cannot run the
    async tests of other modules.
    """
    if shutil.which(CHROMIUM) is None:
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (./dev setup)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()
