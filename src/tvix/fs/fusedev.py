"""The kernel's FUSE device (``/dev/fuse``): mounting, unmounting, and serving requests.

The host mount's transport. Requests are read from the device and answered
by :class:`~tvix.fs.fusewire.FuseSession`, the codec the virtio-fs backend
uses too, over the same :class:`~tvix.fs.core.StoreFs`: one task per
request, at most ``workers`` at a time (reading stops while that many are
in flight).

Mounting: as root, ``mount(2)`` directly; otherwise (or when that is
refused) ``fusermount3``, which mounts and hands the device back over a
socket (the ``_FUSE_COMMFD`` protocol libfuse speaks with it).
Unmounting: ``umount2(MNT_DETACH)`` as root, else ``fusermount3 -u -z``:
lazily, so a busy mount point does not keep the mount.

Why not libfuse (pyfuse3): it does not let a filesystem ask the kernel to
keep directory listings (``FOPEN_CACHE_DIR``), and with them kept a second
walk of a tree costs a quarter of what it did; reads were as fast or faster
(see bench/NOTES.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable

from tvix.fs.core import StoreFs
from tvix.fs.fusewire import FuseSession

__all__ = ["DeviceError", "open_mount", "serve_device", "unmount"]

log = logging.getLogger(__name__)

DEVICE = "/dev/fuse"
# A read from the device needs room for the largest request (a WRITE of
# max_write bytes and its headers), even though a read-only filesystem gets none.
_READ_BUFFER = (1 << 20) + 4096
_MS_RDONLY, _MS_NOSUID, _MS_NODEV = 1, 2, 4
_MNT_DETACH = 2


class DeviceError(Exception):
    """The FUSE device could not be opened or mounted (the message says why)."""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def open_mount(path: str, *, allow_other: bool = False, fusermount: bool = False) -> int:
    """Mount a read-only FUSE filesystem at ``path``; the device fd that serves it.

    ``fusermount``: through ``fusermount3`` even as root (as every other user
    mounts). Raises :class:`DeviceError` if neither ``mount(2)`` nor
    ``fusermount3`` can.
    """
    options = ["default_permissions", *(["allow_other"] if allow_other else [])]
    if os.geteuid() == 0 and not fusermount:
        try:
            fd = os.open(DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise DeviceError(f"cannot open {DEVICE}: {e.strerror}") from None
        data = f"fd={fd},rootmode=40000,user_id=0,group_id=0," + ",".join(options)
        flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV
        if _libc().mount(
            b"tvix-store", os.fsencode(path), b"fuse.tvix-store", flags, data.encode()
        ):
            err = ctypes.get_errno()
            os.close(fd)
            if err != errno.EPERM:
                raise DeviceError(os.strerror(err))
            # A root without CAP_SYS_ADMIN (a container): fusermount3 may still.
        else:
            return fd
    return _fusermount(
        path, ["ro", "nosuid", "nodev", "fsname=tvix-store", "subtype=tvix-store", *options]
    )


def _fusermount(path: str, options: list[str]) -> int:
    fusermount = shutil.which("fusermount3")
    if fusermount is None:
        raise DeviceError(
            "fusermount3 is not installed (Debian: fuse3), and only root mounts without it"
        )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        proc = subprocess.run(
            [fusermount, "-o", ",".join(options), "--", path],
            env=dict(os.environ, _FUSE_COMMFD=str(theirs.fileno())),
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        theirs.close()
        if proc.returncode != 0:
            reason = proc.stderr.decode(errors="replace").strip().splitlines()
            raise DeviceError(reason[-1] if reason else f"fusermount3 exited {proc.returncode}")
        _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
    if not fds:
        raise DeviceError("fusermount3 mounted but sent no device")
    os.set_inheritable(fds[0], False)
    return fds[0]


def unmount(path: str, *, fusermount: bool = False) -> None:
    """Detach the mount at ``path`` (lazily; nothing happens if it is gone already).

    ``fusermount``: through ``fusermount3 -u -z`` even as root.
    """
    if (
        os.geteuid() == 0
        and not fusermount
        and _libc().umount2(os.fsencode(path), _MNT_DETACH) == 0
    ):
        return
    program = shutil.which("fusermount3")
    if program is not None:
        subprocess.run([program, "-u", "-z", "--", path], capture_output=True, check=False)


async def serve_device(
    fs: StoreFs,
    fd: int,
    *,
    workers: int,
    stop: asyncio.Event,
    after_init: Callable[[], None] | None = None,
) -> None:
    """Answer the requests on device ``fd`` until the mount is gone or ``stop`` is set.

    ``after_init`` is called once INIT is answered. When ``stop`` is set this
    returns at once, leaving the unmount to the caller; requests in flight
    are answered first either way (each is bounded by the request timeout).
    """
    loop = asyncio.get_running_loop()
    session = FuseSession(fs)
    gone = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()
    buffer = bytearray(_READ_BUFFER)  # os.read would allocate this much per request
    reading = False

    def reply(parts: tuple[bytes, bytes | bytearray]) -> None:
        try:
            os.writev(fd, parts)  # the payload is not copied into one reply first
        except OSError as e:
            # ENOENT: the request was interrupted meanwhile; ENODEV: unmounted.
            if e.errno not in (errno.ENOENT, errno.ENODEV):
                log.error("FUSE reply failed: %s", e.strerror)

    async def answer(request: bytes) -> None:
        initialized = session.initialized
        parts = await session.handle_parts(request)
        if parts is not None:
            reply(parts)
        if after_init is not None and not initialized and session.initialized:
            after_init()

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not reading and not gone.done() and len(tasks) < workers:
            start_reading()

    def readable() -> None:
        while len(tasks) < workers:
            try:
                n = os.readv(fd, [buffer])
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR or e.errno == errno.ENOENT:
                    continue  # a request interrupted before we read it
                if e.errno != errno.ENODEV:  # ENODEV: unmounted
                    log.error("reading %s failed: %s", DEVICE, e.strerror)
                stop_reading()
                if not gone.done():
                    gone.set_result(None)
                return
            task = loop.create_task(answer(bytes(buffer[:n])))
            tasks.add(task)
            task.add_done_callback(finished)
        stop_reading()  # as many in flight as allowed: read again when one is done

    def start_reading() -> None:
        nonlocal reading
        loop.add_reader(fd, readable)
        reading = True

    def stop_reading() -> None:
        nonlocal reading
        if reading:
            loop.remove_reader(fd)
            reading = False

    os.set_blocking(fd, False)
    start_reading()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({gone, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        stop_reading()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.InvalidStateError):
            gone.cancel()
