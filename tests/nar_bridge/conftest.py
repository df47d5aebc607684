"""Fixtures for tests/nar_bridge (defined in nar_bridge_support, which the tests import by name)."""

from tests.nar_bridge.nar_bridge_support import *  # noqa: F403
