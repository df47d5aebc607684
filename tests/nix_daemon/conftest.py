"""Fixtures for tests/nix_daemon (defined in daemon_support)."""

from tests.nix_daemon.daemon_support import *  # noqa: F403
from tests.support.processes import store_args, tvix_store  # noqa: F401
