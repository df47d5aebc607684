"""How the filesystem serves requests: its options, its error, the request wrapper, open handles.

Nothing here knows a transport: errors are :class:`FsError` carrying an errno,
which the FUSE mount and the virtiofs codec each turn into their own reply.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from tvix.castore.blobservice.base import BlobReader
from tvix.castore.errors import CastoreError
from tvix.castore.nodes import FileNode
from tvix.fs.inodes import Inode
from tvix.fs.listings import Listing
from tvix.nixcompat.errors import NixCompatError
from tvix.store.errors import StoreError

__all__ = ["DirHandle", "FileHandle", "FsError", "FsOptions", "fuse_error", "request_handler"]

log = logging.getLogger("tvix.fs.filesystem")


class _Served(Protocol):
    options: FsOptions


S = TypeVar("S", bound=_Served)
P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class FsOptions:
    """How the filesystem behaves.

    ``list_root``: list every store path at the root (the PathInfo service
    must be able to list); without it, reading the root directory is
    ``EPERM``, while looking up names in it works. ``show_xattr``: expose the
    digests as extended attributes. ``request_timeout``: seconds a request may
    wait for the services before it fails with ``EIO``. ``cache_timeout``:
    seconds the kernel may cache names and attributes.
    ``max_cached_directory_entries``: entries of fetched Directories kept in
    memory (summed over Directories). ``statfs_interval``: seconds after
    which ``statfs`` counts the store again (in the background).
    """

    list_root: bool = False
    show_xattr: bool = True
    request_timeout: float = 60.0
    cache_timeout: float = 24 * 3600.0
    max_cached_directory_entries: int = 1_000_000
    statfs_interval: float = 60.0


class FsError(Exception):
    """A request failed with ``errno`` (what the kernel, and then the caller, sees)."""

    def __init__(self, errno: int) -> None:
        super().__init__(errno)
        self.errno = errno


def fuse_error(code: int) -> FsError:
    """The error that answers a request with ``code``."""
    return FsError(code)


def request_handler(
    fn: Callable[Concatenate[S, P], Awaitable[R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Bound a request handler by the request timeout and map every failure to an errno.

    Transports let only :class:`FsError` through (a failure of anything else
    would be a bug of the transport's), so this is the one place where the store's errors become
    ``EIO`` (and are logged, since the caller only sees the errno).
    """
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            async with asyncio.timeout(self.options.request_timeout):
                return await fn(self, *args, **kwargs)
        except FsError:
            raise
        except TimeoutError:
            log.error("%s: no answer from the store within %ss", name, self.options.request_timeout)
        except (CastoreError, StoreError, NixCompatError, OSError) as e:
            log.error("%s: %s", name, e)
            log.debug("%s failed", name, exc_info=True)
        except Exception:
            log.exception("%s: unexpected failure", name)
        raise fuse_error(errno.EIO)

    return wrapper


class FileHandle:
    """An open file: its node and, once read, a reader kept between reads."""

    __slots__ = ("lock", "node", "reader")

    def __init__(self, node: FileNode) -> None:
        self.node = node
        self.reader: BlobReader | None = None
        # Reads of one handle can arrive concurrently (kernel readahead); the
        # reader has one position, so they take turns.
        self.lock = asyncio.Lock()


class DirHandle:
    """An open directory; for the root, the store paths listed when it was first read."""

    __slots__ = ("inode", "root_listing")

    def __init__(self, inode: Inode) -> None:
        self.inode = inode
        self.root_listing: Listing | None = None
