"""The squarified treemap: tiles cover the area, proportional to their sizes, inside it."""

from __future__ import annotations

import pytest

from tvix.nar_bridge.treemap import squarify


@pytest.mark.parametrize(
    "sizes", [[1], [5, 5], [100, 1, 1, 1], [6, 6, 4, 3, 2, 2, 1], list(range(1, 300))]
)
def test_tiles_are_proportional_and_inside(sizes: list[int]) -> None:
    width, height = 960.0, 360.0
    tiles = squarify([(str(i), s) for i, s in enumerate(sizes)], width, height)
    assert len(tiles) == len(sizes)
    total = sum(sizes)
    for t in tiles:
        assert t.w * t.h == pytest.approx(width * height * t.size / total, rel=1e-6)
        assert t.x >= -1e-6
        assert t.x + t.w <= width + 1e-6
        assert t.y >= -1e-6
        assert t.y + t.h <= height + 1e-6
    assert sum(t.w * t.h for t in tiles) == pytest.approx(width * height)


def test_nothing_to_draw() -> None:
    assert squarify([("a", 0)], 10, 10) == []
    assert squarify([], 10, 10) == []
