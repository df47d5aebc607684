"""Copying store paths, with their closures, into a store.

Two ways in:

:func:`copy_closure`
    from a :class:`PathSource`: a Nix binary cache (:class:`BinaryCacheSource`,
    NARs ingested into the destination's castore) or another tvix store
    (:class:`StoreSource`, blobs and Directories copied as they are). The
    closure is followed through the PathInfos' references, breadth-first,
    with a bounded number of paths in flight.
:func:`~tvix.store.reference_graph.import_reference_graph`
    from the local filesystem, as upstream's ``tvix-store copy`` does (see
    :mod:`tvix.store.reference_graph`).

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from typing_extensions import override

from tvix.castore.blobservice.base import BlobService
from tvix.castore.blobservice.util import copy_blob
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.directoryservice.graph import leaves_to_root
from tvix.castore.errors import IntegrityError, StorageError, ValidationError
from tvix.castore.nodes import DirectoryNode, FileNode, Node
from tvix.nixcompat.signing import VerifyingKey
from tvix.nixcompat.storepath import StorePath
from tvix.store.concurrency import bounded, first_error
from tvix.store.errors import (
    NotFoundError,
)
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.trust import TrustPolicy

__all__ = [
    "BinaryCacheSource",
    "CopyObserver",
    "CopyResult",
    "PathSource",
    "StoreSource",
    "copy_closure",
]

DEFAULT_JOBS = 8
# Blobs of one store path copied concurrently (StoreSource).
BLOB_JOBS = 16


class CopyObserver(Protocol):
    """Follows a copy (e.g. for a progress bar); called in the event loop."""

    def discovered(self, path: StorePath) -> None:
        """``path`` joined the closure."""

    def closure_known(self) -> None:
        """Every path of the closure is discovered: their number is the total."""

    def moved(self, nbytes: int) -> None:
        """``nbytes`` more of the paths' contents are stored, as they stream.

        NAR bytes from a binary cache, file bytes otherwise. Called by
        ``import_reference_graph``; :func:`copy_closure` leaves it to the
        source (given it as its ``progress``).
        """

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
    A source given a ``progress`` callable calls it with the size of each
    piece of content it stores, as it does.
    """

    #: Shown in messages.
    description: str

    @abc.abstractmethod
    async def fetch(self, path: StorePath) -> PathInfo | None:
        """The PathInfo of ``path`` with its content stored; ``None`` if the source lacks it."""

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the source holds (not the destination's services)."""

    async def root_stored(self, info: PathInfo) -> bool:
        """Whether the destination holds the root of ``info``'s content.

        A path whose PathInfo the destination has but whose root it lacks was
        left incomplete (``tvix-store verify --repair`` removes the root of a
        damaged tree): it is fetched again.
        """
        return True


async def _root_stored(blobs: BlobService, directories: DirectoryService, node: Node) -> bool:
    if isinstance(node, FileNode):
        return await blobs.has(node.digest)
    if isinstance(node, DirectoryNode):
        return await directories.get(node.digest) is not None
    return True


class BinaryCacheSource(PathSource):
    """A Nix binary cache (``http(s)://`` or ``file://``).

    Fetching is :class:`~tvix.store.pathinfoservice.nix_http.NixHTTPPathInfoService`'s
    lookup: the narinfo's trust is checked as Nix does (a signature by a
    trusted key, or a content-addressed path; or ``policy``), the NAR's
    hash and size and a content address are verified.
    """

    def __init__(
        self,
        url: str,
        blob_service: BlobService,
        directory_service: DirectoryService,
        *,
        trusted_keys: Iterable[VerifyingKey] = (),
        require_sigs: bool = True,
        policy: TrustPolicy | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        # Imported here: aiohttp is slow to import and only needed for caches.
        from tvix.store.binary_cache import BinaryCache
        from tvix.store.pathinfoservice.nix_http import NixHTTPPathInfoService

        self._dest = (blob_service, directory_service)
        self._service = NixHTTPPathInfoService(
            BinaryCache(url),
            blob_service,
            directory_service,
            trusted_keys=list(trusted_keys),
            require_sigs=require_sigs,
            policy=policy,
            nar_progress=progress,
        )
        self.description = f"binary cache {self._service.cache.url}"

    @override
    async def fetch(self, path: StorePath) -> PathInfo | None:
        return await self._service.get(path.digest)

    @override
    async def root_stored(self, info: PathInfo) -> bool:
        return await _root_stored(*self._dest, info.node)

    @override
    async def close(self) -> None:
        await self._service.close()


class StoreSource(PathSource):
    """Another tvix store, given by its three services.

    Blobs and Directories are copied as they are (each verified against its
    digest on the way; what the destination has is skipped: a stored
    Directory implies its whole tree). PathInfos are checked by ``policy``
    (default: from ``trusted_keys`` and ``require_sigs``, as Nix checks
    substitutes unless ``require_sigs`` is false): a signature by one of
    ``trusted_keys``, or a content-addressed store path, before anything is
    copied; and then the NAR of the copied
    content must have the signed (or content-addressed) hash and size,
    since a signature covers the NAR hash, not the root node that says
    where the content is. Without ``require_sigs`` the source is trusted as
    it is.
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
        policy: TrustPolicy | None = None,
        description: str = "source store",
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._blobs = blob_service
        self._progress = progress
        self._dirs = directory_service
        self._infos = path_info_service
        self._dest_blobs = dest_blob_service
        self._dest_dirs = dest_directory_service
        self.policy = policy or TrustPolicy(
            trusted_keys, require_sigs=require_sigs, accept_ca=require_sigs, verify_nar=require_sigs
        )
        self.description = description

    @override
    async def root_stored(self, info: PathInfo) -> bool:
        return await _root_stored(self._dest_blobs, self._dest_dirs, info.node)

    @override
    async def fetch(self, path: StorePath) -> PathInfo | None:
        info = await self._infos.get(path.digest)
        if info is None:
            return None
        if info.store_path != path:
            raise IntegrityError(f"{self.description} returned the PathInfo of {info.store_path}")
        self.policy.check_signatures(info)
        await self._copy_node(info.node)
        # Checked in the destination: what was copied is what will be served.
        await self.policy.check_content(info, self._dest_blobs, self._dest_dirs)
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
            if not await copy_blob(self._blobs, self._dest_blobs, digest, self._progress):
                raise StorageError(f"{self.description}: blob {digest.hex()} is missing")

        await bounded([functools.partial(one, d) for d in digests], BLOB_JOBS)


def leaves_first(tree: Mapping[B3Digest, Directory], root: B3Digest) -> list[Directory]:
    """The Directories of ``tree`` below and including ``root``, each after its children.

    See :func:`~tvix.castore.directoryservice.graph.leaves_to_root`.
    """
    return list(leaves_to_root(tree, root))


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
    :class:`~tvix.store.errors.NotFoundError` if the source lacks a path
    of the closure, and whatever the source raises for a path it cannot
    vouch for; paths copied before a failure stay copied (see the module
    docs), the others are not registered.
    """
    result = CopyResult()
    semaphore = asyncio.Semaphore(jobs)
    registered: dict[StorePath, asyncio.Future[None]] = {}
    loop = asyncio.get_running_loop()

    # Paths discovered whose references are not yet: the closure is known at 0.
    unexpanded = 0

    async def visit(path: StorePath, group: asyncio.TaskGroup) -> None:
        nonlocal unexpanded
        async with semaphore:
            info = await dest.get(path.digest)
            if info is not None and not await source.root_stored(info):
                info = None  # left incomplete by a repair: fetched again
            copied = info is None
            if info is None:
                info = await source.fetch(path)
                if info is None:
                    raise NotFoundError(f"{path} is not in the {source.description}")
        for ref in info.references:
            schedule(ref, group)
        unexpanded -= 1
        if unexpanded == 0 and observer is not None:
            observer.closure_known()
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
        nonlocal unexpanded
        if path in registered:
            return
        registered[path] = loop.create_future()
        unexpanded += 1
        if observer is not None:
            observer.discovered(path)
        group.create_task(visit(path, group))

    try:
        async with asyncio.TaskGroup() as group:
            for root in roots:
                schedule(root, group)
    except BaseExceptionGroup as eg:
        raise first_error(eg) from None
    finally:
        for future in registered.values():
            if not future.done():
                future.cancel()
    return result
