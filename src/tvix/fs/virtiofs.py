"""``tvix-store virtiofs``: the filesystem core served to a VM as a vhost-user-fs backend.

The frontend (QEMU's ``vhost-user-fs-pci`` device) connects to a Unix socket
we listen on and drives us over the vhost-user control protocol: it hands
over the guest's memory (file descriptors to map), the rings of each
virtqueue, and eventfds to be kicked through and to interrupt the guest
with. The guest's virtio-fs driver puts FUSE requests on the queues: queue 0
("hiprio") carries FORGETs only, queues 1.. carry everything else, each
request a descriptor chain of readable buffers (the request) followed by
writable ones (room for the reply). :class:`~tvix.fs.fusewire.FuseSession`
answers them from a fresh :class:`~tvix.fs.core.StoreFs` per connection;
requests are served concurrently and completed in whatever order they finish.

Offered: virtio ``VERSION_1``, ``INDIRECT_DESC`` and ``EVENT_IDX``, vhost-user
``PROTOCOL_FEATURES`` with ``MQ`` and ``REPLY_ACK``. Handled messages:
GET/SET_FEATURES, GET/SET_PROTOCOL_FEATURES, SET_OWNER, RESET_OWNER,
SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS,
SET_VRING_NUM/ADDR/BASE/KICK/CALL/ERR/ENABLE, GET_VRING_BASE; anything else is
logged and ignored (with a REPLY_ACK failure when an answer is asked for).
One frontend at a time; when it disconnects the next one is served.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import mmap
import os
import platform
import socket
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from tvix.fs.core import StoreFs
from tvix.fs.fusewire import FuseSession
from tvix.fs.virtqueue import BadAddress, Chain, GuestMemory, Region, SplitQueue

__all__ = ["QUEUES", "VirtiofsError", "serve_connection", "serve_virtiofs"]

log = logging.getLogger(__name__)


class VirtiofsError(Exception):
    """The backend cannot serve (the message says why and what to do)."""


class _Unsupported(Exception):
    """A vhost-user message this backend does not handle."""


class Msg:
    """vhost-user request codes (frontend to backend)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38


_NAMES = {v: k for k, v in vars(Msg).items() if isinstance(v, int)}

# Hiprio plus up to 8 request queues (QEMU's num-request-queues, default 1;
# Linux 6.x puts every request on the first, but the device may have more).
QUEUES = 1 + 8
MAX_MEM_SLOTS = 32

_F_INDIRECT_DESC = 1 << 28
_F_EVENT_IDX = 1 << 29
_F_PROTOCOL_FEATURES = 1 << 30
_F_VERSION_1 = 1 << 32
FEATURES = _F_VERSION_1 | _F_PROTOCOL_FEATURES | _F_INDIRECT_DESC | _F_EVENT_IDX
_P_MQ = 1 << 0
_P_REPLY_ACK = 1 << 3
_P_CONFIGURE_MEM_SLOTS = 1 << 15
PROTOCOL_FEATURES = _P_MQ | _P_REPLY_ACK | _P_CONFIGURE_MEM_SLOTS

_HEADER = struct.Struct("<III")  # request flags size
_FLAG_VERSION = 0x1
_FLAG_REPLY = 0x4
_FLAG_NEED_REPLY = 0x8
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")  # index num
_ADDR = struct.Struct("<IIQQQQ")  # index flags desc used avail log
_REGION = struct.Struct("<QQQQ")  # guest_phys size user_addr mmap_offset
_MAX_FDS = 8
_MAX_PAYLOAD = 4096

_NO_SHARED_MEMORY = (
    "the frontend shared no guest memory: start QEMU with a shared memory backend for the "
    "guest's RAM, e.g. -object memory-backend-memfd,id=mem,size=256M,share=on "
    "-numa node,memdev=mem"
)


@dataclass
class _Vring:
    """The state of one virtqueue as the frontend set it."""

    index: int
    num: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    queue: SplitQueue | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    signal_pending: bool = False


class _Connection:
    """One frontend: its control socket, memory, vrings and FUSE session."""

    def __init__(self, sock: socket.socket, fs: StoreFs) -> None:
        self.sock = sock
        self.fs = fs
        self.session = FuseSession(fs)
        self.memory = GuestMemory()
        self.vrings = [_Vring(i) for i in range(QUEUES)]
        self.features = 0
        self.protocol_features = 0
        self.loop = asyncio.get_running_loop()
        self.requests = 0

    # -- control socket --------------------------------------------------------------------

    async def _readable(self) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()
        fd = self.sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(fd, ready)
        try:
            await fut
        finally:
            self.loop.remove_reader(fd)

    async def _receive(self) -> tuple[int, int, bytes, list[int]] | None:
        """The next message: request, flags, payload, fds; ``None`` when the frontend left."""
        await self._readable()
        fds = array.array("i")
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                _HEADER.size, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
            )
        except ConnectionResetError:
            return None
        for level, kind, cmsg in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cmsg[: len(cmsg) - len(cmsg) % fds.itemsize])
        if len(data) < _HEADER.size:
            for fd in fds:
                os.close(fd)
            return None
        request, flags, size = _HEADER.unpack(data)
        if size > _MAX_PAYLOAD:
            raise VirtiofsError(f"vhost-user message {request} of {size} bytes: not vhost-user?")
        payload = b""
        while len(payload) < size:
            chunk = self.sock.recv(size - len(payload))
            if not chunk:
                return None
            payload += chunk
        return request, flags, payload, list(fds)

    def _send(self, request: int, payload: bytes) -> None:
        self.sock.sendall(
            _HEADER.pack(request, _FLAG_VERSION | _FLAG_REPLY, len(payload)) + payload
        )

    async def run(self) -> None:
        """Serve messages until the frontend disconnects."""
        self.sock.setblocking(True)
        try:
            while True:
                message = await self._receive()
                if message is None:
                    log.info("frontend disconnected after %d FUSE requests", self.requests)
                    return
                request, flags, payload, fds = message
                try:
                    reply = await self._handle(request, payload, fds)
                except _Unsupported as e:
                    # Not offered, so not needed: say so if asked, carry on.
                    log.warning("%s", e)
                    if flags & _FLAG_NEED_REPLY and self.protocol_features & _P_REPLY_ACK:
                        self._send(request, _U64.pack(1))
                    continue
                except (BadAddress, struct.error, ValueError, OSError) as e:
                    log.error("vhost-user %s: %s", _NAMES.get(request, request), e)
                    if flags & _FLAG_NEED_REPLY and self.protocol_features & _P_REPLY_ACK:
                        self._send(request, _U64.pack(1))
                        continue
                    raise VirtiofsError(f"{_NAMES.get(request, request)}: {e}") from None
                if reply is not None:
                    self._send(request, reply)
                elif flags & _FLAG_NEED_REPLY and self.protocol_features & _P_REPLY_ACK:
                    self._send(request, _U64.pack(0))
        finally:
            await self.close()

    async def close(self) -> None:
        """Stop every ring, unmap the memory, close every fd, end the FUSE session."""
        for vring in self.vrings:
            await self._stop(vring, wait=False)
            for name in ("call", "err"):
                fd = getattr(vring, name)
                if fd is not None:
                    os.close(fd)
                    setattr(vring, name, None)
        self.memory.close()
        await self.fs.close()

    # -- messages --------------------------------------------------------------------------

    async def _handle(self, request: int, payload: bytes, fds: list[int]) -> bytes | None:
        """Act on one message; its reply payload, if it has one."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "vhost-user %s (%d bytes, %d fds)",
                _NAMES.get(request, request),
                len(payload),
                len(fds),
            )
        keep: set[int] = set()
        try:
            return (
                self._dispatch(request, payload, fds, keep)
                if request != Msg.GET_VRING_BASE
                else await self._get_vring_base(payload)
            )
        finally:
            for fd in fds:
                if fd not in keep:
                    os.close(fd)

    def _dispatch(
        self, request: int, payload: bytes, fds: list[int], keep: set[int]
    ) -> bytes | None:
        if request == Msg.GET_FEATURES:
            return _U64.pack(FEATURES)
        if request == Msg.SET_FEATURES:
            self.features = _U64.unpack_from(payload)[0]
            if not self.features & _F_PROTOCOL_FEATURES:
                for vring in self.vrings:  # without it, rings are enabled when started
                    vring.enabled = True
            return None
        if request == Msg.GET_PROTOCOL_FEATURES:
            return _U64.pack(PROTOCOL_FEATURES)
        if request == Msg.SET_PROTOCOL_FEATURES:
            self.protocol_features = _U64.unpack_from(payload)[0] & PROTOCOL_FEATURES
            return None
        if request == Msg.GET_QUEUE_NUM:
            return _U64.pack(QUEUES)
        if request == Msg.GET_MAX_MEM_SLOTS:
            return _U64.pack(MAX_MEM_SLOTS)
        if request in (Msg.SET_OWNER, Msg.RESET_OWNER):
            return None
        if request == Msg.SET_MEM_TABLE:
            self._set_mem_table(payload, fds)
            return None
        if request == Msg.ADD_MEM_REG:
            if not fds:
                raise VirtiofsError(_NO_SHARED_MEMORY)
            self.memory.regions.append(_map(_REGION.unpack_from(payload, 8), fds[0]))
            return None
        if request == Msg.REM_MEM_REG:
            guest_phys, size, _user, _off = _REGION.unpack_from(payload, 8)
            for r in [
                r for r in self.memory.regions if (r.guest_phys, r.size) == (guest_phys, size)
            ]:
                self.memory.regions.remove(r)
                r.close()
            return None
        if request in (Msg.SET_VRING_KICK, Msg.SET_VRING_CALL, Msg.SET_VRING_ERR):
            value = _U64.unpack_from(payload)[0]
            vring = self._vring(value & 0xFF)
            fd = fds[0] if fds and not value & 0x100 else None
            if fd is not None:
                keep.add(fd)
            if request == Msg.SET_VRING_KICK:
                self._start(vring, fd)
            else:
                name = "call" if request == Msg.SET_VRING_CALL else "err"
                old = getattr(vring, name)
                setattr(vring, name, fd)
                if old is not None:
                    os.close(old)
            return None
        if request == Msg.SET_VRING_ADDR:
            index, _flags, desc, used, avail, _log = _ADDR.unpack_from(payload)
            vring = self._vring(index)
            vring.desc, vring.used, vring.avail = desc, used, avail
            return None
        if request in (Msg.SET_VRING_NUM, Msg.SET_VRING_BASE, Msg.SET_VRING_ENABLE):
            index, num = _STATE.unpack_from(payload)
            vring = self._vring(index)
            if request == Msg.SET_VRING_NUM:
                if not 0 < num <= 32768 or num & (num - 1):
                    raise ValueError(f"queue size {num} is not a power of 2 up to 32768")
                vring.num = num
            elif request == Msg.SET_VRING_BASE:
                vring.base = num
            else:
                vring.enabled = bool(num)
                if vring.enabled:
                    self._drain(vring)
            return None
        raise _Unsupported(f"vhost-user message {request} is not supported: ignored")

    def _vring(self, index: int) -> _Vring:
        if index >= len(self.vrings):
            raise ValueError(f"no queue {index} (there are {len(self.vrings)})")
        return self.vrings[index]

    def _set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        count = _STATE.unpack_from(payload)[0]
        if count == 0 or len(fds) < count:
            raise VirtiofsError(_NO_SHARED_MEMORY)
        old, self.memory.regions = self.memory.regions, []
        for i in range(count):
            self.memory.regions.append(_map(_REGION.unpack_from(payload, 8 + i * 32), fds[i]))
        for r in old:
            r.close()

    # -- rings -----------------------------------------------------------------------------

    def _start(self, vring: _Vring, kick: int | None) -> None:
        """The ring starts: map its parts, watch its kick eventfd."""
        if vring.kick is not None:
            self.loop.remove_reader(vring.kick)
            os.close(vring.kick)
        vring.kick = kick
        if not self.memory.regions:
            raise VirtiofsError(_NO_SHARED_MEMORY)
        if vring.queue is not None:
            vring.queue.release()
        vring.queue = SplitQueue(
            self.memory,
            vring.num,
            vring.desc,
            vring.avail,
            vring.used,
            vring.base,
            indirect=bool(self.features & _F_INDIRECT_DESC),
            event_idx=bool(self.features & _F_EVENT_IDX),
        )
        if kick is not None:
            self.loop.add_reader(kick, self._kicked, vring)
        self._drain(vring)

    def _kicked(self, vring: _Vring) -> None:
        if vring.kick is None:
            return
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(vring.kick)
        self._drain(vring)

    def _drain(self, vring: _Vring) -> None:
        """Take every request the driver made available and serve each in a task."""
        queue = vring.queue
        if queue is None or not vring.enabled:
            return
        try:
            while True:
                while (chain := queue.pop()) is not None:
                    task = self.loop.create_task(self._serve(vring, queue, chain))
                    vring.tasks.add(task)
                    task.add_done_callback(vring.tasks.discard)
                if queue.empty():
                    break
        except BadAddress as e:
            log.error("queue %d: %s; the queue stops", vring.index, e)
            vring.queue = None

    async def _serve(self, vring: _Vring, queue: SplitQueue, chain: Chain) -> None:
        self.requests += 1
        reply = await self.session.handle(chain.request())
        if vring.queue is not queue:
            return  # the ring was stopped or reset meanwhile
        written = 0
        if reply is not None:
            written = chain.reply(reply)
            if written < len(reply):
                log.error("a FUSE reply of %d bytes got %d bytes of room", len(reply), written)
        queue.push(chain.head, written)
        if not vring.signal_pending:
            vring.signal_pending = True
            self.loop.call_soon(self._signal, vring, queue)

    def _signal(self, vring: _Vring, queue: SplitQueue) -> None:
        vring.signal_pending = False
        if vring.call is not None and vring.queue is queue and queue.wants_interrupt():
            with contextlib.suppress(OSError):
                os.eventfd_write(vring.call, 1)

    async def _stop(self, vring: _Vring, *, wait: bool) -> None:
        if vring.kick is not None:
            self.loop.remove_reader(vring.kick)
            os.close(vring.kick)
            vring.kick = None
        if vring.tasks:
            if wait:
                await asyncio.wait(set(vring.tasks))
            else:
                for task in vring.tasks:
                    task.cancel()
                await asyncio.gather(*vring.tasks, return_exceptions=True)
        queue, vring.queue = vring.queue, None
        if queue is not None:
            vring.base = queue.next_avail
            queue.release()

    async def _get_vring_base(self, payload: bytes) -> bytes:
        index = _STATE.unpack_from(payload)[0]
        vring = self._vring(index)
        # Answered once every request taken from the ring is: the frontend resumes there.
        await self._stop(vring, wait=True)
        return _STATE.pack(index, vring.base)


def _map(region: tuple[int, int, int, int], fd: int) -> Region:
    guest_phys, size, user_addr, offset = region
    try:
        mapping = mmap.mmap(
            fd, size + offset, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
    except OSError as e:
        raise VirtiofsError(f"cannot map guest memory ({e}); {_NO_SHARED_MEMORY}") from None
    view = memoryview(mapping)[offset : offset + size]
    return Region(guest_phys, size, user_addr, view, mapping)


async def serve_connection(sock: socket.socket, fs: StoreFs) -> None:
    """Serve one frontend connected on ``sock`` with ``fs`` until it disconnects."""
    await _Connection(sock, fs).run()


def listen(path: str) -> socket.socket:
    """A socket listening at ``path``; a clear :class:`VirtiofsError` if the path is taken."""
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise VirtiofsError(f"{path} exists and is not a socket: choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            raise VirtiofsError(
                f"{path} is a stale socket (nothing listens on it; left by a backend that "
                "ended): remove it and start again"
            ) from None
        except OSError as e:
            raise VirtiofsError(f"{path} exists and cannot be used: {e}") from None
        else:
            raise VirtiofsError(f"{path} is in use: another backend listens on it")
        finally:
            probe.close()
    if len(os.fsencode(path)) > 107:
        raise VirtiofsError(f"socket path {path} is longer than the 107 bytes a Unix socket allows")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise VirtiofsError(f"cannot listen at {path}: {e.strerror}") from None
    return sock


async def serve_virtiofs(
    path: str,
    make_fs: Callable[[], StoreFs],
    *,
    stop: asyncio.Event,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Listen at ``path`` and serve one frontend after another until ``stop`` is set.

    Each connection gets a fresh filesystem from ``make_fs`` (the inode numbers
    and handles of one guest mean nothing to the next). The socket is removed
    when serving ends.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        # Ring updates are ordered only by x86-64's total store order (see virtqueue).
        log.warning(
            "virtio rings are updated without memory barriers, safe on x86-64 only; this is %s",
            platform.machine(),
        )
    server = listen(path)
    server.setblocking(False)
    loop = asyncio.get_running_loop()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        if on_listening is not None:
            on_listening(path)
        while not stop.is_set():
            accepting = asyncio.ensure_future(loop.sock_accept(server))
            await asyncio.wait({accepting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not accepting.done():
                accepting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await accepting
                break
            conn, _addr = accepting.result()
            log.info("frontend connected")
            serving = asyncio.ensure_future(serve_connection(conn, make_fs()))
            try:
                await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not serving.done():
                    serving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await serving
            except VirtiofsError as e:
                log.error("%s", e)
            except Exception:  # one frontend's failure must not end the service
                log.exception("serving the frontend failed")
            finally:
                conn.close()
    finally:
        stopping.cancel()
        server.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
