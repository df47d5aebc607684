"""Conformance suites every store backend and combinator must pass (see tvix.castore.testing)."""

from tvix.store.testing.gcstate import GCStateTests, StateFactory
from tvix.store.testing.pathinfoservice import PathInfoServiceTests

__all__ = ["GCStateTests", "PathInfoServiceTests", "StateFactory"]
