"""Fixtures for tests/nix_daemon (defined in daemon_support, which the tests import by name)."""

from daemon_support import *  # noqa: F403
