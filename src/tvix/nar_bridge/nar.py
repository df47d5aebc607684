"""Serving the NAR of a castore node: re-exports :mod:`tvix.store.nar.seekable`.

NAR sizing, byte ranges and the length-checked full stream are NAR code,
not HTTP, so they live in the store layer; nar-bridge's server uses them.
"""

from __future__ import annotations

from tvix.store.nar.seekable import LayoutCache, NarLayout, render_full, render_range

__all__ = ["LayoutCache", "NarLayout", "render_full", "render_range"]
