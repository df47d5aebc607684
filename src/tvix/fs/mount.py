"""Mount a :class:`~tvix.fs.TvixStoreFs` with FUSE, serve it, and always unmount."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import pyfuse3.asyncio

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.fs.filesystem import FsOptions, TvixStoreFs
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["MountError", "MountOptions", "fuse_options", "mount", "serve"]

log = logging.getLogger(__name__)


class MountError(Exception):
    """The filesystem could not be mounted (the message says where and why)."""


@dataclass(frozen=True, slots=True)
class MountOptions:
    """How to mount: the filesystem's options plus the FUSE session's.

    ``allow_other``: let users other than the mounting one in (for a non-root
    mount, ``user_allow_other`` must be set in ``/etc/fuse.conf``).
    ``workers``: requests served concurrently at most (pyfuse3 worker tasks;
    each one waiting on the services leaves the others free).
    ``read_ahead_kb``: the kernel's read-ahead for this mount (``None``: the
    kernel's default, 128 KiB). The kernel sizes read requests by it, up to
    the 1 MiB FUSE allows, and every request is a round trip through Python,
    so a bigger window means fewer, larger requests: sequential reads
    measured 1.2-1.9 GB/s from memory at 1-4 MiB, 0.4-0.7 GB/s at 128 KiB.
    Setting it needs root (it is a sysfs knob); without, the default stays.
    """

    fs: FsOptions = field(default_factory=FsOptions)
    allow_other: bool = False
    workers: int = 64
    read_ahead_kb: int | None = 4096


def fuse_options(options: MountOptions) -> set[str]:
    """The libfuse mount options for ``options``."""
    opts = {
        "fsname=tvix-store",
        "subtype=tvix-store",
        # Read-only for the kernel too: writes fail with EROFS before reaching us.
        "ro",
        # The kernel checks permission bits itself (0444/0555 for everyone).
        "default_permissions",
    }
    if options.allow_other:
        opts.add("allow_other")
    return opts


def _check_mountpoint(path: str) -> None:
    """Refuse a mount point that is missing, not a directory, or a mount that died."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MountError(
            f"cannot mount at {path}: it does not exist (create the directory)"
        ) from None
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise MountError(
                f"cannot mount at {path}: a filesystem mounted there has died; "
                f"unmount it with `fusermount3 -u {path}`"
            ) from None
        raise MountError(f"cannot mount at {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"cannot mount at {path}: not a directory")
    if os.path.ismount(path):
        log.warning("mounting over %s, which is a mount point already", path)
    elif os.listdir(path):
        log.warning("mounting over %s, which is not empty: its entries are hidden meanwhile", path)


async def mount(
    blobs: BlobService,
    directories: DirectoryService,
    path_infos: PathInfoService,
    mountpoint: str | os.PathLike[str],
    options: MountOptions | None = None,
    *,
    on_mounted: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Mount the store at ``mountpoint``, serve it until told to stop, then unmount.

    A :class:`TvixStoreFs` over the three services, served by :func:`serve`
    (see there for when serving ends and what is raised).
    """
    options = options if options is not None else MountOptions()
    fs = TvixStoreFs(blobs, directories, path_infos, options.fs)
    await serve(
        fs, mountpoint, options, on_mounted=on_mounted, stop=stop, handle_signals=handle_signals
    )


async def serve(
    fs: TvixStoreFs,
    mountpoint: str | os.PathLike[str],
    options: MountOptions | None = None,
    *,
    on_mounted: Callable[[str], None] | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve it until told to stop; then unmount.

    Serves until ``stop`` is set, SIGINT or SIGTERM arrives (with
    ``handle_signals``, in the main thread), or the filesystem is unmounted
    from outside (``fusermount3 -u``). Unmounts (lazily, so a busy mount point
    does not keep it) whatever ends the serving, failures included.
    ``on_mounted`` is called with the absolute mount point once the kernel has
    the mount. One mount per process at a time: pyfuse3 keeps its session in
    module state. (``options.fs`` is ``fs``'s business and not used here.)

    Raises :class:`MountError` if the mount point is unusable, the root should
    be listed but the PathInfo service cannot list, or FUSE refuses to mount.
    """
    options = options if options is not None else MountOptions()
    path = os.path.abspath(mountpoint)
    _check_mountpoint(path)
    if fs.options.list_root and not fs.path_infos.supports_list:
        raise MountError(
            f"cannot list the root: {type(fs.path_infos).__name__} cannot list its store paths"
        )
    pyfuse3.asyncio.enable()
    if options.read_ahead_kb is not None:
        kb = options.read_ahead_kb
        # After INIT: the kernel sets the read-ahead from its answer.
        fs.call_after_init(lambda: _set_read_ahead(path, kb))
    try:
        pyfuse3.init(fs, path, fuse_options(options))
    except RuntimeError as e:
        # libfuse has printed its reason on stderr already (e.g. no /dev/fuse).
        raise MountError(f"cannot mount at {path}: {e}") from None
    log.info("mounted at %s", path)

    loop = asyncio.get_running_loop()
    stop = stop if stop is not None else asyncio.Event()
    signals: list[signal.Signals] = []
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    serving = asyncio.ensure_future(pyfuse3.main(min_tasks=1, max_tasks=options.workers))
    stopping = asyncio.ensure_future(stop.wait())
    try:
        if on_mounted is not None:
            on_mounted(path)
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            log.info("unmounting %s", path)
            # The main loop ends once the requests in flight are answered (every
            # handler is bounded by the request timeout). Its workers use the
            # session until then, so it is waited for, never cancelled.
            _terminate()
        await serving
    finally:
        stopping.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
        if not serving.done():  # we are being cancelled ourselves
            serving.cancel()
            with contextlib.suppress(BaseException):
                await serving
        pyfuse3.close(unmount=True)
        await fs.close()
    log.info("unmounted %s", path)


def _terminate() -> None:
    """Ask pyfuse3's main loop to end."""
    try:
        pyfuse3.terminate()
    except asyncio.InvalidStateError:
        # pyfuse3's asyncio mode fails the waiter on the FUSE fd, which raises
        # when the fd became readable a moment before. terminate() has set the
        # session's exit flag first, so the loop still ends after that request.
        log.debug("FUSE fd became readable while terminating")


def _mount_device(path: str) -> str | None:
    """``major:minor`` of the FUSE mount at ``path``, from /proc/self/mountinfo.

    Read there rather than by stat(): stat on the mount would be a FUSE
    request, and nothing answers requests before the main loop runs.
    """
    escaped = path.replace("\\", "\\134").replace(" ", "\\040").replace("\n", "\\012")
    device = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            # id parent major:minor root mountpoint options... - fstype source ...
            if len(fields) > 4 and fields[4] == escaped and "fuse.tvix-store" in fields:
                device = fields[2]  # the last one listed is the newest
    return device


def _set_read_ahead(path: str, kb: int) -> None:
    try:
        device = _mount_device(path)
        if device is None:
            log.debug("no mountinfo entry for %s: read-ahead left as it is", path)
            return
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:  # not root, or no sysfs: the kernel's default stays
        log.debug("read-ahead of %s left as it is: %s", path, e)
    else:
        log.debug("read-ahead of %s set to %d KiB", path, kb)
