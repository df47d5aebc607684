"""Copying store paths, with their closures, into a store.

Two ways in:

:func:`copy_closure`
    from a :class:`PathSource`: a Nix binary cache (:class:`BinaryCacheSource`,
    NARs ingested into the destination's castore) or another tvix store
    (:class:`StoreSource`, blobs and Directories copied as they are). The
    closure is followed through the PathInfos' references, breadth-first,
    with a bounded number of paths in flight.
:func:`import_reference_graph`
    from the local filesystem, as upstream's ``tvix-store copy`` does: the
    paths listed in an ``exportReferencesGraph`` closure (see
    :func:`parse_reference_graph`) are ingested from disk and registered
    with the references, NAR hash and size the graph gives, after checking
    the NAR of what was ingested against them.

Order and crash safety (both): a PathInfo is put only after the PathInfos
of all its references (as Nix registers paths), so a reader never sees a
path whose closure is incomplete, and the content (blobs, Directories) of a
path is stored before its PathInfo. A copy interrupted half-way leaves a
consistent store; run again, it skips what is there.

Skipping: a path whose PathInfo the destination already has is not
fetched again; its references are still followed (through the
destination's PathInfo), so a closure left incomplete by someone else is
completed.
"""

from __future__ import annotations

import abc
import asyncio
import functools
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tvix.castore.blobservice.base import BlobService
from tvix.castore.blobservice.util import copy_blob
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, StorageError, ValidationError
from tvix.castore.ingest import ingest_path
from tvix.castore.nodes import DirectoryNode, FileNode, Node
from tvix.nixcompat import nixbase32
from tvix.nixcompat.cahash import CAHash
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.hashes import HashAlgo, parse_hash
from tvix.nixcompat.signing import Signature, VerifyingKey
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import NarMismatchError, StoreError
from tvix.store.nar.calculate import calculate_nar
from tvix.store.nar.hasher import NarHasher
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.resolve import NotFoundError

__all__ = [
    "BinaryCacheSource",
    "CopyObserver",
    "CopyResult",
    "GraphEntry",
    "InvalidReferenceGraphError",
    "PathSource",
    "StoreSource",
    "copy_closure",
    "import_reference_graph",
    "parse_reference_graph",
]

DEFAULT_JOBS = 8
# Blobs of one store path copied concurrently (StoreSource).
BLOB_JOBS = 16


class InvalidReferenceGraphError(StoreError):
    """A reference graph file is not what ``exportReferencesGraph`` writes."""


class CopyObserver(Protocol):
    """Follows a copy (e.g. for a progress bar); called in the event loop."""

    def discovered(self, path: StorePath) -> None:
        """``path`` joined the closure."""

    def done(self, info: PathInfo, copied: bool) -> None:
        """``path`` is in the destination: ``copied`` now, or found there."""


@dataclass
class CopyResult:
    """What a copy did: the PathInfos it put, and the paths that were there already."""

    copied: list[PathInfo] = field(default_factory=list)
    present: list[StorePath] = field(default_factory=list)


# -- sources ----------------------------------------------------------------------------------


class PathSource(abc.ABC):
    """Where :func:`copy_closure` gets store paths from.

    :meth:`fetch` stores the path's content in the destination's blob and
    directory services (the source was built with them) and returns its
    PathInfo, checked as the source promises; it does not put the PathInfo.
    """

    #: Shown in messages.
    description: str

    @abc.abstractmethod
    async def fetch(self, path: StorePath) -> PathInfo | None:
        """The PathInfo of ``path`` with its content stored; ``None`` if the source lacks it."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the source holds (not the destination's services)."""


class BinaryCacheSource(PathSource):
    """A Nix binary cache (``http(s)://`` or ``file://``).

    Fetching is :class:`~tvix.store.pathinfoservice.nix_http.NixHTTPPathInfoService`'s
    lookup: the narinfo's trust is checked as Nix does (a signature by a
    trusted key, or a content-addressed path), the NAR's hash and size and
    a content address are verified.
    """

    def __init__(
        self,
        url: str,
        blob_service: BlobService,
        directory_service: DirectoryService,
        *,
        trusted_keys: Iterable[VerifyingKey] = (),
        require_sigs: bool = True,
    ) -> None:
        # Imported here: aiohttp is slow to import and only needed for caches.
        from tvix.store.pathinfoservice.nix_http import BinaryCache, NixHTTPPathInfoService

        self._service = NixHTTPPathInfoService(
            BinaryCache(url),
            blob_service,
            directory_service,
            trusted_keys=list(trusted_keys),
            require_sigs=require_sigs,
        )
        self.description = f"binary cache {self._service.cache.url}"

    async def fetch(self, path: StorePath) -> PathInfo | None:
        return await self._service.get(path.digest)

    async def close(self) -> None:
        await self._service.close()


class StoreSource(PathSource):
    """Another tvix store, given by its three services.

    Blobs and Directories are copied as they are (each verified against its
    digest on the way; what the destination has is skipped: a stored
    Directory implies its whole tree). PathInfos are checked as Nix checks
    substitutes, unless ``require_sigs`` is false: a signature by one of
    ``trusted_keys``, or a content-addressed store path, and then the NAR of
    the copied content must have the signed (or content-addressed) hash and
    size, since a signature covers the NAR hash, not the root node that
    says where the content is. Without ``require_sigs`` the source is
    trusted as it is.
    """

    def __init__(
        self,
        blob_service: BlobService,
        directory_service: DirectoryService,
        path_info_service: PathInfoService,
        dest_blob_service: BlobService,
        dest_directory_service: DirectoryService,
        *,
        trusted_keys: Iterable[VerifyingKey] = (),
        require_sigs: bool = True,
        description: str = "source store",
    ) -> None:
        self._blobs = blob_service
        self._dirs = directory_service
        self._infos = path_info_service
        self._dest_blobs = dest_blob_service
        self._dest_dirs = dest_directory_service
        self._keys = {k.name: k for k in trusted_keys}
        self._require_sigs = require_sigs
        self.description = description

    async def fetch(self, path: StorePath) -> PathInfo | None:
        from tvix.store.pathinfoservice.nix_http import check_ca_content, check_trust

        info = await self._infos.get(path.digest)
        if info is None:
            return None
        if info.store_path != path:
            raise IntegrityError(f"{self.description} returned the PathInfo of {info.store_path}")
        check_trust(info.to_narinfo(), self._keys, self._require_sigs)
        await self._copy_node(info.node)
        if self._require_sigs:
            size, sha256 = await calculate_nar(self._dest_blobs, self._dest_dirs, info.node)
            if (size, sha256) != (info.nar_size, info.nar_sha256):
                raise IntegrityError(
                    f"{self.description}: the content of {path} is not the NAR its PathInfo "
                    f"describes (NAR size {size}, claimed {info.nar_size})"
                )
            if info.ca is not None:
                await check_ca_content(self._dest_blobs, self._dest_dirs, info, info.ca)
        return info

    async def _copy_node(self, node: Node) -> None:
        if isinstance(node, FileNode):
            await self._copy_blobs([node])
        elif isinstance(node, DirectoryNode):
            stored = await self._dest_dirs.get(node.digest)
            if stored is not None:
                try:
                    # Put again: refreshes the tree, so a concurrent garbage collection
                    # keeps it (see DirectoryService); refused if one just took part of it.
                    await self._dest_dirs.put(stored)
                    return
                except ValidationError:
                    pass  # copy it whole
            tree = {d.digest: d async for d in self._dirs.get_recursive(node.digest)}
            if node.digest not in tree:
                raise StorageError(f"{self.description}: Directory {node.digest.hex()} is missing")
            files = [f for d in tree.values() for f in d.files]
            await self._copy_blobs(files)
            async with self._dest_dirs.put_multiple_start() as putter:
                for directory in leaves_first(tree, node.digest):
                    await putter.put(directory)

    async def _copy_blobs(self, files: Sequence[FileNode]) -> None:
        digests = list(dict.fromkeys(f.digest for f in files))

        async def one(digest: B3Digest) -> None:
            if await self._dest_blobs.has(digest):
                return
            if not await copy_blob(self._blobs, self._dest_blobs, digest):
                raise StorageError(f"{self.description}: blob {digest.hex()} is missing")

        await _bounded([functools.partial(one, d) for d in digests], BLOB_JOBS)


def leaves_first(tree: Mapping[B3Digest, Directory], root: B3Digest) -> list[Directory]:
    """The Directories of ``tree`` below and including ``root``, each after its children.

    (A breadth-first listing reversed is not always such an order: a
    Directory referred to from two levels comes after the first referrer
    only.)
    """
    out: list[Directory] = []
    done: set[B3Digest] = set()
    stack: list[tuple[B3Digest, bool]] = [(root, False)]
    while stack:
        digest, expanded = stack.pop()
        if digest in done:
            continue
        if expanded:
            done.add(digest)
            out.append(tree[digest])
            continue
        stack.append((digest, True))
        for child in tree[digest].directories:
            if child.digest not in done:
                stack.append((child.digest, False))
    return out


async def _bounded(jobs: Sequence[Callable[[], Awaitable[None]]], limit: int) -> None:
    """Run ``jobs``, at most ``limit`` at a time; the first failure cancels the rest."""
    semaphore = asyncio.Semaphore(limit)

    async def run(job: Callable[[], Awaitable[None]]) -> None:
        async with semaphore:
            await job()

    try:
        async with asyncio.TaskGroup() as group:
            for job in jobs:
                group.create_task(run(job))
    except BaseExceptionGroup as eg:
        raise _first(eg) from None


def _first(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


# -- closures ---------------------------------------------------------------------------------


async def copy_closure(
    source: PathSource,
    dest: PathInfoService,
    roots: Iterable[StorePath],
    *,
    jobs: int = DEFAULT_JOBS,
    observer: CopyObserver | None = None,
) -> CopyResult:
    """Copy ``roots`` and everything they refer to, transitively, from ``source`` to ``dest``.

    At most ``jobs`` paths are fetched at a time. Raises
    :class:`~tvix.store.resolve.NotFoundError` if the source lacks a path
    of the closure, and whatever the source raises for a path it cannot
    vouch for; paths copied before a failure stay copied (see the module
    docs), the others are not registered.
    """
    result = CopyResult()
    semaphore = asyncio.Semaphore(jobs)
    registered: dict[StorePath, asyncio.Future[None]] = {}
    loop = asyncio.get_running_loop()

    async def visit(path: StorePath, group: asyncio.TaskGroup) -> None:
        async with semaphore:
            info = await dest.get(path.digest)
            copied = info is None
            if info is None:
                info = await source.fetch(path)
                if info is None:
                    raise NotFoundError(f"{path} is not in the {source.description}")
        for ref in info.references:
            schedule(ref, group)
        if copied:
            # Dependencies first: wait until every reference is registered.
            await asyncio.gather(*(registered[r] for r in info.references if r != path))
            await dest.put(info)
            result.copied.append(info)
        else:
            result.present.append(path)
        if observer is not None:
            observer.done(info, copied)
        registered[path].set_result(None)

    def schedule(path: StorePath, group: asyncio.TaskGroup) -> None:
        if path in registered:
            return
        registered[path] = loop.create_future()
        if observer is not None:
            observer.discovered(path)
        group.create_task(visit(path, group))

    try:
        async with asyncio.TaskGroup() as group:
            for root in roots:
                schedule(root, group)
    except BaseExceptionGroup as eg:
        raise _first(eg) from None
    finally:
        for future in registered.values():
            if not future.done():
                future.cancel()
    return result


# -- reference graphs -------------------------------------------------------------------------


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


def parse_reference_graph(data: Mapping[str, Any] | str | bytes) -> list[GraphEntry]:
    """The ``closure`` of an ``exportReferencesGraph`` JSON document (or of ``.attrs.json``).

    Each item has ``path``, ``narHash`` (``sha256:<nixbase32>`` as Nix writes
    it there, or SRI / hex as ``nix path-info --json`` does), ``narSize``,
    ``references`` (full store paths); optional ``ca``, ``deriver`` and
    ``signatures`` are kept, other keys (``closureSize``, ...) ignored.
    Raises :class:`InvalidReferenceGraphError` naming the problem.
    """
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except ValueError as e:
            raise InvalidReferenceGraphError(f"reference graph is not JSON: {e}") from None
    closure = data.get("closure") if isinstance(data, Mapping) else None
    if not isinstance(closure, list):
        raise InvalidReferenceGraphError("reference graph has no 'closure' list")
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
        raise _first(eg) from None
    return result
