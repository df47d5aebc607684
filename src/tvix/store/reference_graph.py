"""Registering store paths from the local filesystem, described by a reference graph.

As upstream's ``tvix-store copy`` does: the paths listed in an
``exportReferencesGraph`` closure (see :func:`parse_reference_graph`) are
ingested from disk and registered with the references, NAR hash and size the
graph gives, after checking the NAR of what was ingested against them. The
order and crash-safety rules of :mod:`tvix.store.copy` hold: a PathInfo is put
only after those of its references, and after its content.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.ingest import ingest_path
from tvix.nixcompat import nixbase32
from tvix.nixcompat.cahash import CAHash
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.hashes import HashAlgo, parse_hash
from tvix.nixcompat.signing import Signature
from tvix.nixcompat.storepath import StorePath
from tvix.store.concurrency import first_error
from tvix.store.copy import CopyObserver, CopyResult
from tvix.store.errors import InvalidReferenceGraphError, NarMismatchError
from tvix.store.nar.hasher import NarHasher
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = [
    "GraphEntry",
    "InvalidReferenceGraphError",
    "import_reference_graph",
    "parse_reference_graph",
]


@dataclass(frozen=True)
class GraphEntry:
    """One path of an ``exportReferencesGraph`` closure."""

    path: StorePath
    nar_sha256: bytes
    nar_size: int
    references: tuple[StorePath, ...]
    ca: CAHash | None = None
    deriver: StorePath | None = None
    signatures: tuple[Signature, ...] = ()


def parse_reference_graph(
    data: Mapping[str, Any] | list[Any] | str | bytes,
) -> list[GraphEntry]:
    """The ``closure`` of an ``exportReferencesGraph`` JSON document (or of ``.attrs.json``).

    A JSON list (what ``nix path-info --json -r`` prints) is taken as the closure.

    Each item has ``path``, ``narHash`` (``sha256:<nixbase32>`` as Nix writes
    it there, or SRI / hex as ``nix path-info --json`` does), ``narSize``,
    ``references`` (full store paths); optional ``ca``, ``deriver`` and
    ``signatures`` are kept, other keys (``closureSize``, ...) ignored.
    Raises :class:`InvalidReferenceGraphError` naming the problem.
    """
    parsed: Any = data
    if isinstance(data, str | bytes):
        try:
            parsed = json.loads(data)
        except ValueError as e:
            raise InvalidReferenceGraphError(f"reference graph is not JSON: {e}") from None
    # `nix path-info --json -r` prints the closure as a list of the same objects.
    closure = parsed if isinstance(parsed, list) else None
    if isinstance(parsed, Mapping):
        closure = parsed.get("closure")
    if not isinstance(closure, list):
        raise InvalidReferenceGraphError(
            "reference graph has no 'closure' list (nor is it `nix path-info --json -r` output)"
        )
    entries = []
    for i, item in enumerate(closure):
        try:
            entries.append(_graph_entry(item))
        except (KeyError, TypeError, ValueError, NixCompatError) as e:
            what = item.get("path") if isinstance(item, dict) else None
            raise InvalidReferenceGraphError(
                f"reference graph: closure item {i} ({what or 'no path'}): "
                f"{'missing key ' if isinstance(e, KeyError) else ''}{e}"
            ) from None
    return entries


def _graph_entry(item: Any) -> GraphEntry:
    if not isinstance(item, dict):
        raise TypeError("not an object")
    algo, digest = parse_hash(item["narHash"])
    if algo is not HashAlgo.SHA256:
        raise ValueError(f"narHash must be sha256, not {algo}")
    size = item["narSize"]
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ValueError(f"narSize must be a positive integer, not {size!r}")
    refs = item["references"]
    if not isinstance(refs, list):
        raise TypeError("references must be a list")
    deriver = item.get("deriver")
    return GraphEntry(
        path=StorePath.from_absolute_path(item["path"]),
        nar_sha256=digest,
        nar_size=size,
        references=tuple(dict.fromkeys(StorePath.from_absolute_path(r) for r in refs)),
        ca=CAHash.parse(item["ca"]) if item.get("ca") else None,
        deriver=StorePath.from_absolute_path(deriver) if deriver else None,
        signatures=tuple(Signature.parse(s) for s in item.get("signatures", [])),
    )


def _dependencies_first(entries: Sequence[GraphEntry]) -> list[GraphEntry]:
    """``entries`` ordered so each comes after the ones it refers to (self-references aside)."""
    by_path = {e.path: e for e in entries}
    out: list[GraphEntry] = []
    state: dict[StorePath, bool] = {}  # False: being visited, True: done
    for start in by_path:
        stack: list[tuple[StorePath, bool]] = [(start, False)]
        while stack:
            path, expanded = stack.pop()
            if expanded:
                state[path] = True
                out.append(by_path[path])
                continue
            if path in state:
                continue  # done, or on the stack: a cycle (impossible for store paths)
            state[path] = False
            stack.append((path, True))
            for ref in by_path[path].references:
                if ref != path and ref in by_path and ref not in state:
                    stack.append((ref, False))
    return out


class _Moved:
    """An ingestion's progress, as bytes moved for a copy's observer."""

    def __init__(self, observer: CopyObserver) -> None:
        self._observer = observer

    def advance(self, files: int, nbytes: int) -> None:
        self._observer.moved(nbytes)


async def import_reference_graph(
    blob_service: BlobService,
    directory_service: DirectoryService,
    path_info_service: PathInfoService,
    entries: Sequence[GraphEntry],
    *,
    store_root: str | os.PathLike[str] = "",
    jobs: int = 4,
    observer: CopyObserver | None = None,
) -> CopyResult:
    """Ingest the paths of a reference graph from the local filesystem and register them.

    Each path is read at ``store_root`` + its store path (``store_root``
    empty: the real ``/nix/store``; a chroot store's root otherwise). The
    NAR of what was ingested is computed while ingesting and must have the
    graph's hash and size (else :class:`~tvix.store.errors.NarMismatchError`
    and the path is not registered). Paths whose PathInfo the destination
    has with the same NAR hash are skipped. PathInfos are put dependencies
    first, each as soon as the paths it refers to are registered.
    """
    result = CopyResult()
    ordered = _dependencies_first(entries)
    progress = _Moved(observer) if observer is not None else None
    root = os.fspath(store_root)
    semaphore = asyncio.Semaphore(jobs)

    async def ingest(entry: GraphEntry) -> tuple[PathInfo, bool]:
        async with semaphore:
            have = await path_info_service.get(entry.path.digest)
            if have is not None and have.nar_sha256 == entry.nar_sha256:
                return have, False
            fs_path = root.rstrip("/") + entry.path.absolute_path if root else str(entry.path)
            hasher = NarHasher()
            node = await ingest_path(
                blob_service,
                directory_service,
                fs_path,
                name=entry.path.base_name.encode(),
                observer=hasher,
                progress=progress,
            )
            sha256 = hasher.digest()
            if (hasher.size, sha256) != (entry.nar_size, entry.nar_sha256):
                raise NarMismatchError(
                    f"{entry.path}: the NAR of {fs_path} has size {hasher.size} and sha256 "
                    f"{nixbase32.encode(sha256)}, the reference graph says size "
                    f"{entry.nar_size} and sha256 {nixbase32.encode(entry.nar_sha256)}"
                )
            info = PathInfo(
                store_path=entry.path,
                node=node,
                nar_size=entry.nar_size,
                nar_sha256=entry.nar_sha256,
                references=entry.references,
                signatures=entry.signatures,
                deriver=entry.deriver,
                ca=entry.ca,
            )
            return info, True

    try:
        async with asyncio.TaskGroup() as group:
            tasks = {}
            for entry in ordered:
                tasks[entry.path] = group.create_task(ingest(entry))
                if observer is not None:
                    observer.discovered(entry.path)
            if observer is not None:
                observer.closure_known()
            # Registered in dependency order while later paths are still being ingested.
            for entry in ordered:
                info, copied = await tasks[entry.path]
                if copied:
                    await path_info_service.put(info)
                    result.copied.append(info)
                else:
                    result.present.append(entry.path)
                if observer is not None:
                    observer.done(info, copied)
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
    return result
