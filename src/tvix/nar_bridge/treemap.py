"""A squarified treemap layout (Bruls, Huizing, van Wijk 2000), for SVG pictures of sizes.

Pure geometry: sizes in, rectangles out; the browser's templates draw them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Tile", "squarify"]

T = TypeVar("T")


@dataclass(frozen=True)
class Tile(Generic[T]):
    """One item's rectangle: ``x``, ``y``, ``w``, ``h`` in the area's units."""

    item: T
    size: int
    x: float
    y: float
    w: float
    h: float


def _worst(row: Sequence[float], side: float) -> float:
    """The worst aspect ratio of ``row`` (areas) laid along a side of length ``side``."""
    total = sum(row)
    if total <= 0 or side <= 0:
        return float("inf")
    lo, hi = min(row), max(row)
    return max(side * side * hi / (total * total), total * total / (side * side * lo))


def squarify(items: Sequence[tuple[T, int]], width: float, height: float) -> list[Tile[T]]:
    """Rectangles tiling ``width`` x ``height``, each with an area proportional to its size.

    Items of size 0 or less get no tile. Biggest first gives the best shapes.
    """
    kept = sorted(((i, s) for i, s in items if s > 0), key=lambda kv: -kv[1])
    total = sum(s for _, s in kept)
    if not kept or width <= 0 or height <= 0:
        return []
    scale = width * height / total
    areas = [s * scale for _, s in kept]
    tiles: list[Tile[T]] = []
    x, y, w, h = 0.0, 0.0, float(width), float(height)
    i = 0
    while i < len(kept):
        side = min(w, h)
        row = [areas[i]]
        j = i + 1
        while j < len(kept) and _worst([*row, areas[j]], side) <= _worst(row, side):
            row.append(areas[j])
            j += 1
        row_total = sum(row)
        if w >= h:  # a column on the left
            col_w = row_total / h if h else 0.0
            cy = y
            for k, area in enumerate(row):
                th = area / col_w if col_w else 0.0
                tiles.append(Tile(kept[i + k][0], kept[i + k][1], x, cy, col_w, th))
                cy += th
            x, w = x + col_w, w - col_w
        else:  # a row at the top
            row_h = row_total / w if w else 0.0
            cx = x
            for k, area in enumerate(row):
                tw = area / row_h if row_h else 0.0
                tiles.append(Tile(kept[i + k][0], kept[i + k][1], cx, y, tw, row_h))
                cx += tw
            y, h = y + row_h, h - row_h
        i = j
    return tiles
