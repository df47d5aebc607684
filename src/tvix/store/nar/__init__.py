"""NARs from and to castore: rendering (whole or seekable), size/sha256 calculation, ingestion."""

from tvix.store.nar.calculate import NarCalculator, calculate_nar
from tvix.store.nar.ingest import ingest_nar, ingest_nar_stream
from tvix.store.nar.render import render_nar
from tvix.store.nar.seekable import NarLayout, render_range

__all__ = [
    "NarCalculator",
    "NarLayout",
    "calculate_nar",
    "ingest_nar",
    "ingest_nar_stream",
    "render_nar",
    "render_range",
]
