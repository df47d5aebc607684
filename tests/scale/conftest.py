"""Fixtures for tests/scale (defined in scale_support, which the tests import by name)."""

from scale_support import *  # noqa: F403
