"""Fixtures for tests/nix_daemon (defined in daemon_support)."""

from tests.nix_daemon.daemon_support import *  # noqa: F403
