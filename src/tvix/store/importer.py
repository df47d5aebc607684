"""Import local paths as content-addressed store paths, as ``nix-store --add`` does."""

from __future__ import annotations

import hashlib
import os
import stat

from typing_extensions import override

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.ingest import IngestProgress, ingest_path
from tvix.castore.nodes import FileNode
from tvix.nixcompat.cahash import CAHash, CAKind
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.hashes import HashAlgo
from tvix.nixcompat.storepath import build_ca_path
from tvix.store.errors import ImportPathError
from tvix.store.nar.hasher import NarHasher
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["ImportPathError", "import_file_flat", "import_path"]


async def import_path(
    blob_service: BlobService,
    directory_service: DirectoryService,
    path_info_service: PathInfoService,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    progress: IngestProgress | None = None,
) -> PathInfo:
    """Ingest ``path`` and register it as a recursive (NAR sha256) content-addressed path.

    The store path is the one ``nix-store --add PATH`` gives (name: the base
    name of ``path`` unless ``name`` is given). Returns the PathInfo as
    stored. Raises :class:`ImportPathError` if the name is not a valid store path
    name, and :class:`~tvix.castore.ingest.IngestError` if the path cannot be
    ingested.
    """
    if name is None:
        name = os.path.basename(os.path.normpath(os.path.abspath(os.fspath(path))))
    try:
        # Validates the name before any work is done.
        build_ca_path(name, CAHash(CAKind.NAR, HashAlgo.SHA256, bytes(32)))
    except NixCompatError as e:
        raise ImportPathError(f"{os.fspath(path)}: {e}") from None
    # The NAR hash is computed from the very bytes ingested, as they are read.
    hasher = NarHasher()
    node = await ingest_path(
        blob_service, directory_service, path, name=b"import", progress=progress, observer=hasher
    )
    nar_size, nar_sha256 = hasher.size, hasher.digest()
    ca = CAHash(CAKind.NAR, HashAlgo.SHA256, nar_sha256)
    store_path = build_ca_path(name, ca)
    info = PathInfo(
        store_path=store_path,
        node=node.renamed(store_path.base_name.encode()),
        nar_size=nar_size,
        nar_sha256=nar_sha256,
        ca=ca,
    )
    return await path_info_service.put(info)


class _FlatHasher(NarHasher):
    """The NAR hash of a file and the sha256 of its bytes, in one pass."""

    def __init__(self) -> None:
        super().__init__()
        self.flat = hashlib.sha256()

    @override
    def data(self, chunk: bytes) -> None:
        self.flat.update(chunk)
        super().data(chunk)


async def import_file_flat(
    blob_service: BlobService,
    directory_service: DirectoryService,
    path_info_service: PathInfoService,
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
) -> PathInfo:
    """Add the regular file ``path`` with flat hashing, as ``nix store add-file`` does.

    The store path is content-addressed by the sha256 of the file's bytes
    (``fixed:sha256``); the file keeps its executable bit, as Nix 2.8 keeps
    it (the flat hash does not cover it).
    Raises :class:`ImportPathError` for anything but a regular file or an
    invalid name.
    """
    fs_path = os.fspath(path)
    if name is None:
        name = os.path.basename(os.path.normpath(os.path.abspath(fs_path)))
    try:
        st = os.stat(fs_path)
    except OSError as e:
        raise ImportPathError(f"{fs_path}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImportPathError(f"{fs_path}: flat import takes a regular file")
    try:
        build_ca_path(name, CAHash(CAKind.FLAT, HashAlgo.SHA256, bytes(32)))
    except NixCompatError as e:
        raise ImportPathError(f"{fs_path}: {e}") from None
    hasher = _FlatHasher()
    ingested = await ingest_path(
        blob_service, directory_service, fs_path, name=b"import", observer=hasher
    )
    if not isinstance(ingested, FileNode):
        raise ImportPathError(f"{fs_path}: flat import takes a regular file")
    nar_size, nar_sha256 = hasher.size, hasher.digest()
    ca = CAHash(CAKind.FLAT, HashAlgo.SHA256, hasher.flat.digest())
    store_path = build_ca_path(name, ca)
    node = ingested.renamed(store_path.base_name.encode())
    info = PathInfo(
        store_path=store_path, node=node, nar_size=nar_size, nar_sha256=nar_sha256, ca=ca
    )
    return await path_info_service.put(info)
