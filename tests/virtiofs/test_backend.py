"""The virtiofs backend without a VM: the FUSE codec, the rings, the vhost-user protocol.

A test plays the frontend and the guest driver: guest memory is a memfd
both sides map, the control socket a socketpair, kicks and interrupts
eventfds, as QEMU would hand them over.
"""

from __future__ import annotations

import array
import asyncio
import errno
import mmap
import os
import socket
import stat
import struct
from pathlib import Path

import pytest

from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.fs.core import XATTR_BLOB_DIGEST, StoreFs
from tvix.fs.fusewire import FuseSession, Op
from tvix.fs.requests import FsOptions
from tvix.fs.virtiofs import VirtiofsError, listen, serve_connection, serve_virtiofs
from tvix.nixcompat.storepath import StorePath
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import from_url as path_info_service

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ENTRY = struct.Struct("<QQQQII")
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")


async def store_fs(tree: Path, **options: bool) -> tuple[StoreFs, bytes]:
    blobs, directories = MemoryBlobService(), MemoryDirectoryService()
    path_infos = path_info_service("memory://")
    info = await import_path(blobs, directories, path_infos, tree)
    fs = StoreFs(blobs, directories, path_infos, FsOptions(**options))
    return fs, info.store_path.base_name.encode()


def request(opcode: int, nodeid: int = 1, body: bytes = b"", unique: int = 7) -> bytes:
    return IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 0, 0, 0) + body


def init_request() -> bytes:
    return request(Op.INIT, 0, struct.pack("<IIII", 7, 38, 131072, 0xFFFFFFFF) + bytes(48))


async def call(session: FuseSession, data: bytes) -> tuple[int, bytes]:
    reply = await session.handle(data)
    assert reply is not None
    length, error, unique = OUT_HEADER.unpack_from(reply)
    assert length == len(reply)
    assert unique == IN_HEADER.unpack_from(data)[2]
    return -error, reply[OUT_HEADER.size :]


def read_in(fh: int, offset: int, size: int) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


async def test_the_codec_answers_from_the_core(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", big_size=700_000)
    fs, name = await store_fs(tree, list_root=True)
    s = FuseSession(fs)
    assert (await call(s, request(Op.GETATTR)))[0] == errno.EIO  # before INIT
    err, out = await call(s, init_request())
    assert err == 0
    assert len(out) == 64
    major, minor, _readahead, flags = struct.unpack_from("<IIII", out)
    assert (major, minor) == (7, 31)
    assert flags & (1 << 13)  # READDIRPLUS

    err, out = await call(s, request(Op.LOOKUP, 1, name + b"\0"))
    assert err == 0
    root_ino = ENTRY.unpack_from(out)[0]
    attr = ATTR.unpack_from(out, ENTRY.size)
    assert stat.S_ISDIR(attr[9])
    assert attr[9] & 0o777 == 0o555

    async def lookup(parent: int, n: bytes) -> tuple[int, tuple[int, ...]]:
        err, out = await call(s, request(Op.LOOKUP, parent, n + b"\0"))
        assert err == 0
        return ENTRY.unpack_from(out)[0], ATTR.unpack_from(out, ENTRY.size)

    exe, exe_attr = await lookup(root_ino, b"exec.sh")
    assert exe_attr[9] == stat.S_IFREG | 0o555
    big, big_attr = await lookup(root_ino, b"big.bin")
    assert big_attr[1] == 700_000
    # A miss inside a store path: a negative entry (node id 0) the kernel may keep.
    err, out = await call(s, request(Op.LOOKUP, root_ino, b"nope\0"))
    assert err == 0
    assert ENTRY.unpack_from(out)[0] == 0
    # A miss at the root: ENOENT (it may be added later).
    err, _ = await call(s, request(Op.LOOKUP, 1, b"00000000000000000000000000000000-x\0"))
    assert err == errno.ENOENT

    link, _ = await lookup(root_ino, b"link")
    assert await call(s, request(Op.READLINK, link)) == (0, b"regular.txt")
    assert (await call(s, request(Op.READLINK, exe)))[0] == errno.EINVAL

    err, out = await call(s, request(Op.OPEN, big, struct.pack("<II", os.O_RDONLY, 0)))
    assert err == 0
    fh = struct.unpack_from("<Q", out)[0]
    data = (tree / "big.bin").read_bytes()
    for offset, size in ((300_000, 131072), (0, 4096), (699_990, 4096), (800_000, 10)):
        err, out = await call(s, request(Op.READ, big, read_in(fh, offset, size)))
        assert (err, out) == (0, data[offset : offset + size])
    release = struct.pack("<QIIQ", fh, 0, 0, 0)
    assert await call(s, request(Op.RELEASE, big, release)) == (0, b"")
    assert (await call(s, request(Op.OPEN, big, struct.pack("<II", os.O_RDWR, 0))))[0] == (
        errno.EROFS
    )

    # getxattr: the size, then the value, ERANGE if too small, ENODATA if absent.
    xin = struct.pack("<II", 0, 0) + XATTR_BLOB_DIGEST + b"\0"
    err, out = await call(s, request(Op.GETXATTR, big, xin))
    size = struct.unpack_from("<I", out)[0]
    assert err == 0
    assert size > 0
    err, value = await call(s, request(Op.GETXATTR, big, struct.pack("<II", size, 0) + xin[8:]))
    assert err == 0
    assert value.startswith(b"b3:")
    assert (await call(s, request(Op.GETXATTR, big, struct.pack("<II", 3, 0) + xin[8:])))[
        0
    ] == errno.ERANGE
    err, _ = await call(s, request(Op.GETXATTR, big, struct.pack("<II", 99, 0) + b"user.x\0"))
    assert err == errno.ENODATA
    err, names = await call(s, request(Op.LISTXATTR, big, struct.pack("<II", 256, 0)))
    assert (err, names) == (0, XATTR_BLOB_DIGEST + b"\0")

    # A store path's directory never changes: the kernel may keep its listing
    # (FOPEN_CACHE_DIR), across opens too (FOPEN_KEEP_CACHE); the root's may grow.
    err, out = await call(s, request(Op.OPENDIR, root_ino, struct.pack("<II", 0, 0)))
    assert err == 0
    assert struct.unpack_from("<QI", out)[1] == (1 << 3) | (1 << 1)
    err, out = await call(s, request(Op.OPENDIR, 1, struct.pack("<II", 0, 0)))
    assert struct.unpack_from("<QI", out)[1] == 0

    # The root listed (--list-root), in small replies: each entry sent is a lookup.
    dh = struct.unpack_from("<Q", out)[0]
    names_seen = []
    offset = 0
    while True:
        err, out = await call(s, request(Op.READDIRPLUS, 1, read_in(dh, offset, 200)))
        assert err == 0
        if not out:
            break
        pos = 0
        while pos < len(out):
            pos += ENTRY.size + ATTR.size
            _ino, offset, namelen, _type = struct.unpack_from("<QQII", out, pos)
            names_seen.append(out[pos + 24 : pos + 24 + namelen])
            pos += (24 + namelen + 7) & ~7
    assert names_seen == [b".", b"..", name]
    assert await call(s, request(Op.RELEASEDIR, 1, struct.pack("<QIIQ", dh, 0, 0, 0))) == (0, b"")

    err, out = await call(s, request(Op.STATFS))
    assert err == 0
    assert len(out) == 80
    # The store's size: its one store path's NAR bytes in 512-byte blocks, nothing free.
    blocks, bfree, bavail, files, ffree, _bsize, _namelen, frsize = struct.unpack_from(
        "<QQQQQIII", out
    )
    info = await fs.path_infos.get(StorePath.from_base_name(name).digest)
    assert info is not None
    assert (blocks, files, frsize) == ((info.nar_size + 511) // 512, 1, 512)
    assert (bfree, bavail, ffree) == (0, 0, 0)
    assert (await call(s, request(Op.MKDIR, root_ino, b"\0" * 8 + b"d\0")))[0] == errno.EROFS
    assert (await call(s, request(52)))[0] == errno.ENOSYS  # STATX
    # FLUSH: nothing to flush; ENOSYS stops the kernel sending one on every close.
    assert (await call(s, request(Op.FLUSH, big, bytes(24))))[0] == errno.ENOSYS
    # FORGET: no reply; the inode is gone when its count reaches zero.
    assert fs.inodes.get(exe) is not None
    assert await s.handle(request(Op.FORGET, exe, struct.pack("<Q", 1))) is None
    assert fs.inodes.get(exe) is None
    assert await call(s, request(Op.DESTROY)) == (0, b"")


def test_a_stale_socket_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "vfs.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(VirtiofsError, match="stale socket"):
        listen(str(path))
    path.unlink()
    path.write_text("")
    with pytest.raises(VirtiofsError, match="not a socket"):
        listen(str(path))
    path.unlink()
    live = listen(str(path))
    try:
        with pytest.raises(VirtiofsError, match="in use"):
            listen(str(path))
    finally:
        live.close()


# -- a frontend and guest driver played by the test ----------------------------------------

MEM = 1 << 20
GPA = 0x100000  # guest-physical base of the one region
UADDR = 0x7F0000000000  # where the "frontend" has it mapped
QSIZE = 16
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000  # offsets of queue 1's rings in the region
BUF = 0x10000  # request and reply buffers from here on


class Frontend:
    """Enough of QEMU and the guest's virtio-fs driver to put FUSE requests on queue 1."""

    def __init__(self, sock: socket.socket, features: int = (1 << 32) | (1 << 30)) -> None:
        self.sock = sock
        self.features = features
        self.memfd = os.memfd_create("guest")
        os.ftruncate(self.memfd, MEM)
        self.mem = mmap.mmap(self.memfd, MEM)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0

    def close(self) -> None:
        self.mem.close()
        for fd in (self.memfd, self.kick, self.call):
            os.close(fd)

    def send(
        self, request: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = 1
    ) -> None:
        msg = struct.pack("<III", request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([msg], anc)

    def reply(self) -> tuple[int, bytes]:
        header = self.sock.recv(12)
        request, flags, size = struct.unpack("<III", header)
        assert flags == 0x5
        return request, self.sock.recv(size) if size else b""

    def setup(self) -> None:
        self.send(1)  # GET_FEATURES
        _, features = self.reply()
        assert struct.unpack("<Q", features)[0] & (1 << 32)
        self.send(15)  # GET_PROTOCOL_FEATURES
        _, proto = self.reply()
        self.send(16, struct.pack("<Q", struct.unpack("<Q", proto)[0] & (1 << 3)))
        self.send(17)  # GET_QUEUE_NUM
        assert struct.unpack("<Q", self.reply()[1])[0] >= 2  # hiprio and a request queue
        self.send(3)  # SET_OWNER
        self.send(2, struct.pack("<Q", self.features))  # SET_FEATURES
        region = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", GPA, MEM, UADDR, 0)
        self.send(5, region, (self.memfd,), flags=0x9)  # SET_MEM_TABLE, with REPLY_ACK
        assert self.reply() == (5, struct.pack("<Q", 0))
        self.send(8, struct.pack("<II", 1, QSIZE))  # SET_VRING_NUM
        self.send(10, struct.pack("<II", 1, 0))  # SET_VRING_BASE
        addr = struct.pack("<IIQQQQ", 1, 0, UADDR + DESC, UADDR + USED, UADDR + AVAIL, 0)
        self.send(9, addr)  # SET_VRING_ADDR
        self.send(13, struct.pack("<Q", 1), (self.call,))  # SET_VRING_CALL
        self.send(12, struct.pack("<Q", 1), (self.kick,))  # SET_VRING_KICK
        self.send(18, struct.pack("<II", 1, 1))  # SET_VRING_ENABLE

    def submit(self, data: bytes, room: int, slot: int, *, indirect: bool = False) -> int:
        """Put a request on queue 1 as two readable and two writable descriptors.

        ``indirect``: in a table of their own, which one descriptor points to
        (as Linux does for every request of more than one buffer).
        """
        base = BUF + slot * 0x4000
        self.mem[base : base + len(data)] = data
        split = min(40, len(data))  # the header in a descriptor of its own
        descs = [
            (GPA + base, split, 1),
            (GPA + base + split, len(data) - split, 1),
            (GPA + base + 0x1000, 16, 1 | 2),
            (GPA + base + 0x1010, room - 16, 2),
        ]
        head = slot * 4
        table, first = (base + 0x3000, 0) if indirect else (DESC, head)
        for i, (addr, length, flags) in enumerate(descs):
            struct.pack_into(
                "<QIHH", self.mem, table + 16 * (first + i), addr, length, flags, first + i + 1
            )
        if indirect:
            struct.pack_into("<QIHH", self.mem, DESC + 16 * head, GPA + table, 64, 4, 0)
        struct.pack_into("<H", self.mem, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.mem, AVAIL + 2, self.avail_idx)
        os.eventfd_write(self.kick, 1)
        return base

    async def used(self, count: int) -> list[tuple[int, int]]:
        for _ in range(500):
            if struct.unpack_from("<H", self.mem, USED + 2)[0] >= count:
                return [struct.unpack_from("<II", self.mem, USED + 4 + 8 * i) for i in range(count)]
            await asyncio.sleep(0.01)
        raise AssertionError("no reply on the used ring")


@pytest.mark.parametrize(("event_idx", "indirect"), [(False, False), (True, True)])
async def test_requests_over_a_virtqueue(tmp_path: Path, event_idx: bool, indirect: bool) -> None:
    tree = make_tree(tmp_path / "tree", big_size=1000)
    fs, name = await store_fs(tree)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = Frontend(theirs, (1 << 32) | (1 << 30) | (event_idx << 29) | (indirect << 28))
    serving = asyncio.create_task(serve_connection(ours, fs))
    try:
        await asyncio.to_thread(front.setup)
        init_at = front.submit(init_request(), 16 + 64, 0)
        lookup = request(Op.LOOKUP, 1, name + b"\0", unique=8)
        lookup_at = front.submit(lookup, 16 + 128, 1, indirect=indirect)
        used = await front.used(2)
        assert sorted(used) == [(0, 16 + 64), (4, 16 + 128)]
        length, error, unique = OUT_HEADER.unpack_from(front.mem, init_at + 0x1000)
        assert (length, error, unique) == (80, 0, 7)
        assert struct.unpack_from("<II", front.mem, init_at + 0x1010)[:2] == (7, 31)
        length, error, unique = OUT_HEADER.unpack_from(front.mem, lookup_at + 0x1000)
        assert (length, error, unique) == (144, 0, 8)
        assert os.eventfd_read(front.call) >= 1  # the guest was interrupted
        if event_idx:  # kick me when you make request 2 (the third) available
            assert struct.unpack_from("<H", front.mem, USED + 4 + 8 * QSIZE)[0] == 2
        # A message not offered (SET_LOG_BASE, migration): refused, the session goes on.
        await asyncio.to_thread(front.send, 6, struct.pack("<QQ", 0, 0), (), 0x9)
        assert await asyncio.to_thread(front.reply) == (6, struct.pack("<Q", 1))
        # GET_VRING_BASE stops the ring: the next index to read comes back.
        await asyncio.to_thread(front.send, 11, struct.pack("<II", 1, 0))
        assert await asyncio.to_thread(front.reply) == (11, struct.pack("<II", 1, 2))
    finally:
        theirs.close()
        await asyncio.wait_for(serving, 10)  # ends when the frontend hangs up
        front.close()


async def test_a_frontend_without_shared_memory_is_told_so(tmp_path: Path) -> None:
    fs, _name = await store_fs(make_tree(tmp_path / "tree", big_size=10))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    front = Frontend(theirs)
    serving = asyncio.create_task(serve_connection(ours, fs))
    try:
        front.send(8, struct.pack("<II", 1, QSIZE))
        front.send(12, struct.pack("<Q", 1), (front.kick,))  # a ring starts: no memory
        with pytest.raises(VirtiofsError, match="shared no guest memory"):
            await asyncio.wait_for(serving, 10)
    finally:
        theirs.close()
        front.close()


async def test_one_bad_frontend_does_not_end_the_service(tmp_path: Path) -> None:
    fs, _name = await store_fs(make_tree(tmp_path / "tree", big_size=10))
    path = tmp_path / "vfs.sock"
    stop = asyncio.Event()
    listening = asyncio.Event()
    serving = asyncio.create_task(
        serve_virtiofs(str(path), lambda: fs, stop=stop, on_listening=lambda _p: listening.set())
    )
    await listening.wait()

    def talk(message: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(message)
            return s.recv(64)

    # Not vhost-user at all: the connection is dropped...
    assert await asyncio.to_thread(talk, struct.pack("<III", 1, 1, 1 << 30)) == b""
    # ...and the next frontend is served.
    reply = await asyncio.to_thread(talk, struct.pack("<III", 1, 1, 0))  # GET_FEATURES
    assert struct.unpack_from("<III", reply) == (1, 0x5, 8)
    stop.set()
    await asyncio.wait_for(serving, 10)
    assert not path.exists()
