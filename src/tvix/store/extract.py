"""Materialise store paths on disk: their trees written out as plain files.

What is written
    Directories, regular files and symlinks (targets as stored, not
    followed), with names as stored (bytes, not necessarily UTF-8). Files get
    mode ``0o444``, executables ``0o555`` — what Nix gives files in its store
    (only the owner's x bit matters to a NAR). Directories get ``0o755``
    rather than Nix's ``0o555``: owner-writable, so a tree extracted
    anywhere can be moved, replaced or removed without a chmod pass first
    (moving a directory to another parent needs write access to it). Modes
    are passed to ``open``/``mkdir`` and so pass through the umask, as for
    any new file. Timestamps and ownership are whatever creating gives.

How
    The whole Directory closure of a root is fetched with one recursive get
    (not one request per directory), all directories, symlinks and empty
    files are created in one pass in a worker thread, then file contents are
    fetched concurrently and written:

    - blobs up to :data:`SMALL_BLOB` are fetched :data:`FETCH_CONCURRENCY` at
      a time and collected into windows of at most :data:`WINDOW_FILES` files
      or :data:`WINDOW_BYTES` bytes; each window is checked and written by one
      worker-thread job (a thread handoff costs far more than writing a
      small file, so it is paid per window, not per file) while fetching
      goes on, at most :data:`WRITES_IN_FLIGHT` windows at once;
    - larger blobs are streamed to disk in pieces, :data:`LARGE_CONCURRENCY`
      at a time, never held whole.

    Each blob's content is fetched once however many files share it.

Verification
    Every blob is checked against its digest (blake3) and its size against
    the node's, as it is written, whatever the blob service already checked
    (the gRPC client and the object store verify too). The tree is written
    into a temporary directory next to the destination (``DEST.tmp-XXXX``)
    and renamed to the destination only once everything is written and
    verified; on any failure (or cancellation) the temporary tree is removed,
    so the destination either appears complete or not at all. The rename
    never replaces anything: a destination that appeared meanwhile is an
    error too.

    A store path's root node is the store's word: when extracting store
    paths whose PathInfo is known (a whole store path, or a closure), the
    NAR of each tree written is hashed from the temporary copy before the
    rename (local, cached reads) and must be the size and sha256 its
    PathInfo claims; otherwise :class:`~tvix.castore.errors.IntegrityError`
    and nothing is placed.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tvix.castore.blobservice.base import BlobService
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError
from tvix.castore.nodes import DirectoryNode, Node
from tvix.nixcompat.nar.writer import NarWriter
from tvix.nixcompat.storepath import StorePath
from tvix.store.concurrency import gather_all
from tvix.store.errors import ExtractError, NotFoundError
from tvix.store.nar.render import load_closure
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService
from tvix.store.tree_writer import (
    DIRECTORY_MODE,
    EXECUTABLE_MODE,
    FILE_MODE,
    WRITE_THREADS,
    ExtractProgress,
    ExtractStats,
    TreePlan,
    TreeWriter,
)

__all__ = [
    "DIRECTORY_MODE",
    "EXECUTABLE_MODE",
    "FILE_MODE",
    "ExtractError",
    "ExtractProgress",
    "ExtractStats",
    "extract_node",
    "extract_store_paths",
    "path_info_closure",
]

# Directory closures fetched at once when extracting several store paths.
CLOSURE_CONCURRENCY = 16


# -- placing the result ---------------------------------------------------------------------


def _check_dest(dest: Path) -> None:
    if os.path.lexists(dest):
        raise ExtractError(f"{dest} already exists")
    parent = dest.absolute().parent
    if not parent.is_dir():
        raise ExtractError(f"{parent} is not a directory")


def _place(src: str, dest: Path, is_dir: bool) -> None:
    """Rename ``src`` to ``dest``, failing (never replacing) if ``dest`` exists."""
    if is_dir:
        # rename(2) replaces an empty directory silently: claim the name first
        # (mkdir fails if it exists), then rename over our own empty claim.
        os.mkdir(dest, 0o700)
        try:
            os.rename(src, dest)
        except BaseException:
            os.rmdir(dest)
            raise
        return
    try:
        # link(2) fails if dest exists: a rename that never replaces.
        os.link(src, dest, follow_symlinks=False)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        # A filesystem without hard links: check, then rename (racy, but rare).
        if os.path.lexists(dest):
            raise FileExistsError(errno.EEXIST, "already exists", str(dest)) from None
        os.rename(src, dest)
    else:
        os.unlink(src)


def _nar_of_tree(path: bytes) -> tuple[int, bytes]:
    """Size and sha256 of the NAR of the tree at ``path`` (not followed if a symlink)."""
    writer = NarWriter()
    hasher = hashlib.sha256()
    size = 0

    def out(data: bytes) -> None:
        nonlocal size
        hasher.update(data)
        size += len(data)

    # Iterative: trees may be nested deeper than Python's recursion limit.
    stack: list[tuple[bytes, Iterator[bytes]]] = []
    current: bytes | None = path
    while True:
        if current is not None:
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):
                out(writer.symlink(os.readlink(current)))
            elif stat.S_ISREG(st.st_mode):
                out(writer.regular(bool(st.st_mode & stat.S_IXUSR), st.st_size))
                with open(current, "rb") as f:
                    while chunk := f.read(1 << 20):
                        out(chunk)
                writer.contents_written(st.st_size)
                out(writer.end_regular())
            else:
                out(writer.begin_directory())
                stack.append((current, iter(sorted(os.listdir(current)))))
                current = None
                continue
            current = None
            if not stack:
                break
            out(writer.end_entry())
        parent, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            out(writer.end_directory())
            if not stack:
                break
            out(writer.end_entry())
            continue
        out(writer.entry(name))
        current = parent + b"/" + name
    writer.finish()
    return size, hasher.digest()


def _check_nar(tree: str, claim: PathInfo) -> None:
    size, sha256 = _nar_of_tree(os.fsencode(tree))
    if size != claim.nar_size or sha256 != claim.nar_sha256:
        raise IntegrityError(
            f"{claim.store_path}: the tree extracted has a NAR of {size} bytes, sha256 "
            f"{sha256.hex()}; its PathInfo claims {claim.nar_size} bytes, sha256 "
            f"{claim.nar_sha256.hex()}"
        )


async def _extract(
    blob_service: BlobService,
    plan: TreePlan,
    dest: Path,
    is_dir: bool,
    progress: ExtractProgress | None,
    claims: Sequence[tuple[bytes, PathInfo]] = (),
) -> ExtractStats:
    """Write ``plan`` (whose top is ``b"out"``) to a temporary sibling, then move it to ``dest``."""
    tmp = tempfile.mkdtemp(prefix=f"{dest.name}.tmp-", dir=dest.absolute().parent)
    try:
        top = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            pool = ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="tvix-extract")
            try:
                await TreeWriter(blob_service, top, pool, progress).run(plan)
            finally:
                # Jobs of a failed extraction may still be running: let them end
                # before the tree is removed.
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            os.close(top)
        for where, claim in claims:
            await asyncio.to_thread(_check_nar, os.path.join(tmp, os.fsdecode(where)), claim)
        try:
            _place(os.path.join(tmp, "out"), dest, is_dir)
        except FileExistsError:
            raise ExtractError(f"{dest} already exists") from None
    finally:
        # Synchronous on purpose: it must finish even when the task is being cancelled.
        shutil.rmtree(tmp, ignore_errors=True)
    return plan.stats()


# -- entry points ---------------------------------------------------------------------------


async def extract_node(
    blob_service: BlobService,
    directory_service: DirectoryService,
    node: Node,
    dest: str | os.PathLike[str],
    *,
    progress: ExtractProgress | None = None,
    claim: PathInfo | None = None,
) -> ExtractStats:
    """Write the tree of ``node`` (its own name plays no part) at ``dest``.

    ``claim``: the PathInfo whose root ``node`` is; the tree's NAR must be
    the one it claims (see the module docstring).

    ``dest`` must not exist; its parent must be a directory. See the module
    docstring for modes, how contents are fetched and verified, and the
    all-or-nothing rename. Raises :class:`ExtractError` for an unusable
    ``dest``, :class:`~tvix.castore.errors.StorageError` when a Directory or
    blob is missing, :class:`~tvix.castore.errors.IntegrityError` when
    content does not match its digest or size, ``OSError`` when writing fails.
    """
    target = Path(dest)
    _check_dest(target)
    closure: dict[B3Digest, Directory] = {}
    if isinstance(node, DirectoryNode):
        closure = await load_closure(directory_service, node.digest)
    plan = TreePlan()
    plan.add(b"out", node, closure)
    claims = [(b"out", claim)] if claim is not None else []
    return await _extract(
        blob_service, plan, target, isinstance(node, DirectoryNode), progress, claims
    )


async def extract_store_paths(
    blob_service: BlobService,
    directory_service: DirectoryService,
    infos: Sequence[PathInfo],
    dest: str | os.PathLike[str],
    *,
    progress: ExtractProgress | None = None,
) -> ExtractStats:
    """Write each store path at ``dest/<hash>-<name>`` (``dest`` a new directory, ``0o755``).

    As a ``/nix/store`` would hold them; used for closures (see
    :func:`path_info_closure`). The Directory closures of all of them are
    fetched concurrently (one recursive get each), and contents shared
    between store paths are fetched once. All or nothing, as
    :func:`extract_node`.
    """
    target = Path(dest)
    _check_dest(target)
    roots = {info.store_path: info.node for info in infos}
    slots = asyncio.Semaphore(CLOSURE_CONCURRENCY)

    async def load(node: DirectoryNode) -> dict[B3Digest, Directory]:
        async with slots:
            return await load_closure(directory_service, node.digest)

    wanted = {n.digest: n for n in roots.values() if isinstance(n, DirectoryNode)}
    closure: dict[B3Digest, Directory] = {}
    for part in await gather_all([load(n) for n in wanted.values()]):
        closure.update(part)
    plan = TreePlan()
    plan.directories.append(b"out")
    for store_path, node in roots.items():
        plan.add(b"out/" + store_path.base_name.encode(), node, closure)
    claims = [(b"out/" + info.store_path.base_name.encode(), info) for info in infos]
    return await _extract(blob_service, plan, target, True, progress, claims)


async def path_info_closure(
    path_info_service: PathInfoService, store_paths: Iterable[StorePath]
) -> list[PathInfo]:
    """The PathInfos of ``store_paths`` and of everything they refer to, recursively.

    Breadth-first from the ones given, each store path once; the PathInfos
    of one level are asked for concurrently. Raises
    :class:`~tvix.store.errors.NotFoundError` naming a store path that is
    not in the store (and what refers to it).
    """
    found: dict[StorePath, PathInfo] = {}
    referrer: dict[StorePath, StorePath | None] = {}
    level: list[StorePath] = []
    for sp in store_paths:
        if sp not in referrer:
            referrer[sp] = None
            level.append(sp)
    slots = asyncio.Semaphore(CLOSURE_CONCURRENCY)

    async def get(sp: StorePath) -> PathInfo | None:
        async with slots:
            return await path_info_service.get(sp.digest)

    while level:
        infos = await gather_all([get(sp) for sp in level])
        following: list[StorePath] = []
        for sp, info in zip(level, infos, strict=True):
            if info is None or info.store_path != sp:
                by = referrer[sp]
                raise NotFoundError(
                    f"{sp} is not in the store" + (f" (referred to by {by})" if by else "")
                )
            found[sp] = info
            for ref in info.references:
                if ref not in referrer:
                    referrer[ref] = sp
                    following.append(ref)
        level = following
    return list(found.values())
