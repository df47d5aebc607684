"""Filesystem ingestion: a local path becomes blobs, Directories and a root node.

See :func:`ingest_path`.
"""

from tvix.castore.ingest.fs import IngestError, IngestObserver, IngestProgress, ingest_path

__all__ = ["IngestError", "IngestObserver", "IngestProgress", "ingest_path"]
