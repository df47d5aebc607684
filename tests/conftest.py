"""Shared pytest configuration for the tvix test suite.

The session fixtures every directory may use: the real Nix (``nix``) and the
real servers (``weed``, ``pg`` and their per-test ``s3_url``, ``pg_url``).
Each starts on first use only.
"""

from tests.support.fixtures import pg, pg_url, s3_url, weed
from tests.support.nix import nix

__all__ = ["nix", "pg", "pg_url", "s3_url", "weed"]
