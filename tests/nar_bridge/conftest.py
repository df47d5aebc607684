"""Fixtures for tests/nar_bridge (defined in nar_bridge_support, which the tests import by name)."""

from tests.nar_bridge.nar_bridge_support import *  # noqa: F403
from tests.support.browser import browser  # noqa: F401
from tests.support.processes import store_args, tvix_store  # noqa: F401
