"""The FUSE codec's directory listings: each record says what a lookup of its name says."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.fs.core import StoreFs
from tvix.fs.fusewire import FuseSession, Op
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import from_url as path_info_service

IN_HEADER = struct.Struct("<IIQQIIIHH")
OUT_HEADER = struct.Struct("<IiQ")
ENTRY_OUT = 40 + 88  # fuse_entry_out: entry head, then fuse_attr
DIRENT = struct.Struct("<QQII")  # ino off namelen type


class Client:
    """Plays the kernel: numbered requests, replies checked and split off their header."""

    def __init__(self, session: FuseSession) -> None:
        self.session = session
        self.unique = 0

    async def __call__(self, opcode: int, nodeid: int, body: bytes = b"") -> bytes:
        self.unique += 1
        header = IN_HEADER.pack(
            IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0, 0, 0, 0
        )
        reply = await self.session.handle(header + body)
        assert reply is not None
        length, error, unique = OUT_HEADER.unpack_from(reply)
        assert (length, error, unique) == (len(reply), 0, self.unique)
        return reply[OUT_HEADER.size :]

    async def listing(
        self, ino: int, opcode: int, size: int
    ) -> list[tuple[bytes, int, int, bytes]]:
        """(name, ino, type, entry_out or b"") per record, read in replies of ``size`` bytes."""
        fh = struct.unpack_from("<Q", await self(Op.OPENDIR, ino, bytes(8)))[0]
        records: list[tuple[bytes, int, int, bytes]] = []
        offset = 0
        while out := await self(
            Op.READDIRPLUS if opcode == Op.READDIRPLUS else Op.READDIR,
            ino,
            struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0),
        ):
            assert len(out) <= size
            pos = 0
            while pos < len(out):
                entry = b""
                if opcode == Op.READDIRPLUS:
                    entry, pos = out[pos : pos + ENTRY_OUT], pos + ENTRY_OUT
                dirent_ino, next_offset, namelen, kind = DIRENT.unpack_from(out, pos)
                name = out[pos + DIRENT.size : pos + DIRENT.size + namelen]
                padded = (DIRENT.size + namelen + 7) & ~7
                assert out[pos + DIRENT.size + namelen : pos + padded] == bytes(
                    padded - DIRENT.size - namelen
                )
                pos += padded
                assert next_offset == len(records) + 1  # 1 after ".", 2 after "..", ...
                records.append((name, dirent_ino, kind, entry))
                offset = next_offset
        await self(Op.RELEASEDIR, ino, struct.pack("<QIIQ", fh, 0, 0, 0))
        return records


@pytest.mark.parametrize("size", [200, 4096, 1 << 20])
async def test_readdirplus_records_are_what_lookup_answers(tmp_path: Path, size: int) -> None:
    tree = make_tree(tmp_path / "tree", big_size=1000)
    blobs, directories = MemoryBlobService(), MemoryDirectoryService()
    path_infos = path_info_service("memory://")
    info = await import_path(blobs, directories, path_infos, tree)
    client = Client(FuseSession(StoreFs(blobs, directories, path_infos)))
    await client(Op.INIT, 0, struct.pack("<IIII", 7, 31, 0, 0xFFFFFFFF) + bytes(48))
    root = await client(Op.LOOKUP, 1, info.store_path.base_name.encode() + b"\0")
    root_ino = struct.unpack_from("<Q", root)[0]

    plus = await client.listing(root_ino, Op.READDIRPLUS, size)
    names = sorted(os.listdir(os.fsencode(tree)))
    assert [r[0] for r in plus] == [b".", b"..", *names]
    # "." is the directory itself: its attributes are what its lookup said.
    assert plus[0][1] == root_ino
    assert plus[0][3] == root
    for name, ino, kind, entry in plus[2:]:
        # The same inode, attributes and timeouts a LOOKUP of the name answers.
        assert entry == await client(Op.LOOKUP, root_ino, name + b"\0")
        assert struct.unpack_from("<Q", entry)[0] == ino
        mode = struct.unpack_from("<I", entry, 40 + 60)[0]
        assert kind == stat.S_IFMT(mode) >> 12
        assert stat.S_IFMT(mode) == stat.S_IFMT(os.lstat(os.fsencode(tree) + b"/" + name).st_mode)
    # READDIR: the same names, numbers and types, without attributes.
    bare = await client.listing(root_ino, Op.READDIR, size)
    assert [r[:3] for r in bare] == [r[:3] for r in plus]
