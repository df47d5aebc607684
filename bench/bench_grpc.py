"""castore over gRPC: 1 GiB blob Put/Read and a 10,000-Directory recursive Get.

The server runs in its own process on loopback TCP, with the real servicers;
the client is this process, through :class:`GRPCBlobService` /
:class:`GRPCDirectoryService` with all their verification. Next to it, in the
same run, a bare grpc.aio server in its own process moves the same bytes in
1 MiB messages (raw bytes, no protobuf, no hashing, nothing stored), and the
same number of Directory-sized messages: the ceiling for Python gRPC here.

Server backends: Put goes to a *discarding* blob service that hashes what it
receives (any real backend must, to answer the digest) and keeps nothing, so
the number is the gRPC path's and not the allocator's (a memory backend
keeping 1 GiB is bound by page faults: ~250 MB/s on these machines). Read is
served by the memory backend from a 1 GiB blob the server generates at start.
Directories go to the memory directory service.

CPU is client + server CPU seconds per run (median), which other load on the
machine does not inflate the way it does wall time. Runs are interleaved
(bare, tvix, bare, ...) and the best of each is shown, as the machine may be
busy with other work; the ratio of medians is shown too.

Target: Put and Read at >= 0.7x the bare rate.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import blake3
import grpc

from bench.common import mbps, table
from tvix.castore.blobservice import BlobReader, BlobService, BlobWriter, MemoryBlobService
from tvix.castore.blobservice.grpc import GRPCBlobService
from tvix.castore.blobservice.util import write_all
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.directoryservice.grpc import GRPCDirectoryService
from tvix.castore.grpc import build_server, castore_servicers
from tvix.castore.nodes import DirectoryNode, FileNode
from tvix.castore.testing.fixtures import EMPTY_BLOB_DIGEST, big_blob

MIB = 1 << 20
BLOB_SIZE = 1 << 30
REPEATS = int(os.environ.get("TVIX_BENCH_REPEATS", "3"))
# The mean encoded size of the Directories in the tree below.
SMALL = 86

_BARE_PUT = "/bench.Bare/Put"
_BARE_READ = "/bench.Bare/Read"


def _raw(b: bytes) -> bytes:
    return b


# --- servers, each in its own process ---------------------------------------


async def _bare_put(request_iterator: AsyncIterator[bytes], context: Any) -> bytes:
    n = 0
    async for message in request_iterator:
        n += len(message)
    return n.to_bytes(8, "little")


async def _bare_read(request: bytes, context: Any) -> AsyncIterator[bytes]:
    """``request``: 8 bytes of total size, 4 of message size."""
    total, size = int.from_bytes(request[:8], "little"), int.from_bytes(request[8:], "little")
    payload = b"\xab" * size
    for _ in range(total // size):
        yield payload


class _DiscardingBlobService(BlobService):
    """Hashes what is written and keeps nothing; reads go to ``inner``."""

    def __init__(self, inner: BlobService) -> None:
        self.inner = inner

    async def has(self, digest: B3Digest) -> bool:
        return await self.inner.has(digest)

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        return await self.inner.open_read(digest)

    def open_write(self) -> BlobWriter:
        return _HashingWriter()


class _HashingWriter(BlobWriter):
    def __init__(self) -> None:
        self._hasher = blake3.blake3()

    async def write(self, data: bytes | memoryview) -> None:
        self._hasher.update(data)

    async def close(self) -> B3Digest:
        return B3Digest(self._hasher.digest())

    async def abort(self) -> None:
        pass


def _serve(kind: str, port_queue: Any) -> None:
    async def run() -> None:
        if kind == "bare":
            server = grpc.aio.server()
            server.add_generic_rpc_handlers(
                [
                    grpc.method_handlers_generic_handler(
                        "bench.Bare",
                        {
                            "Put": grpc.stream_unary_rpc_method_handler(
                                _bare_put, request_deserializer=_raw, response_serializer=_raw
                            ),
                            "Read": grpc.unary_stream_rpc_method_handler(
                                _bare_read, request_deserializer=_raw, response_serializer=_raw
                            ),
                        },
                    )
                ]
            )
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            port_queue.put((port, None))
        else:
            memory = MemoryBlobService()
            digest = await write_all(memory, big_blob(BLOB_SIZE, seed=2))
            blobs = _DiscardingBlobService(memory)
            built = build_server("127.0.0.1:0", castore_servicers(blobs, MemoryDirectoryService()))
            await built.start()
            server = built.server
            port_queue.put((int(built.address.rsplit(":", 1)[1]), digest))
        await server.wait_for_termination()

    asyncio.run(run())


class _Server:
    def __init__(self, kind: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        queue = ctx.Queue()
        self.process = ctx.Process(target=_serve, args=(kind, queue), daemon=True)
        self.process.start()
        port, self.blob = queue.get(timeout=120)
        self.address = f"127.0.0.1:{port}"

    def cpu(self) -> float:
        """CPU seconds (user + system) the server process has used."""
        assert self.process.pid is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.join()


# --- the runs ------------------------------------------------------------------

Op = Callable[[], Awaitable[object]]


def _bare_request(total: int, size: int) -> bytes:
    return total.to_bytes(8, "little") + size.to_bytes(4, "little")


def _bare_ops(ch: grpc.aio.Channel, n_small: int) -> dict[str, Op]:
    payload = b"\xcd" * MIB
    small = b"\xcd" * SMALL
    put = ch.stream_unary(_BARE_PUT, request_serializer=_raw, response_deserializer=_raw)
    read = ch.unary_stream(_BARE_READ, request_serializer=_raw, response_deserializer=_raw)

    async def blob_put() -> None:
        call = put()
        for _ in range(BLOB_SIZE // MIB):
            await call.write(payload)
        await call.done_writing()
        assert int.from_bytes(await call, "little") == BLOB_SIZE

    async def blob_read() -> None:
        n = 0
        async for message in read(_bare_request(BLOB_SIZE, MIB)):
            n += len(message)
        assert n == BLOB_SIZE

    async def small_put() -> None:
        call = put()
        for _ in range(n_small):
            await call.write(small)
        await call.done_writing()
        assert int.from_bytes(await call, "little") == n_small * SMALL

    async def small_read() -> None:
        n = 0
        async for _ in read(_bare_request(n_small * SMALL, SMALL)):
            n += 1
        assert n == n_small

    return {"put": blob_put, "read": blob_read, "small_put": small_put, "small_read": small_read}


def _tvix_ops(
    blobs: GRPCBlobService, dirs: GRPCDirectoryService, stored: B3Digest, closure: list[Directory]
) -> dict[str, Op]:
    # 1 GiB written from a window sliding over random-looking bytes, so no
    # message repeats; nothing 1 GiB large is held in this process.
    block = bytearray(big_blob(MIB + 1024, seed=1))
    root = closure[-1].digest

    async def blob_put() -> None:
        async with blobs.open_write() as writer:
            for i in range(BLOB_SIZE // MIB):
                await writer.write(memoryview(block)[i % 1024 : i % 1024 + MIB])
        await writer.close()

    async def blob_read() -> None:
        reader = await blobs.open_read(stored)
        assert reader is not None
        n = 0
        async with reader:
            while part := await reader.read(MIB):
                n += len(part)
        assert n == BLOB_SIZE

    async def dir_put() -> None:
        async with dirs.put_multiple_start() as putter:
            for d in closure:
                await putter.put(d)
        assert await putter.close() == root

    async def dir_get() -> None:
        n = 0
        async for _ in dirs.get_recursive(root):
            n += 1
        assert n == len(closure)

    return {"put": blob_put, "read": blob_read, "small_put": dir_put, "small_read": dir_get}


async def _run_all(
    bare: _Server, tvix: _Server, closure: list[Directory]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU (client + server) times of each op, bare and tvix
    interleaved, so that load from anything else on the machine hits both alike."""
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    blobs = GRPCBlobService(tvix.address)
    dirs = GRPCDirectoryService(tvix.address)
    async with grpc.aio.insecure_channel(bare.address) as ch:
        ops = {f"bare_{k}": v for k, v in _bare_ops(ch, len(closure)).items()}
        assert tvix.blob is not None
        ops |= {f"tvix_{k}": v for k, v in _tvix_ops(blobs, dirs, tvix.blob, closure).items()}
        order = [
            f"{who}_{k}"
            for k in ("put", "read", "small_put", "small_read")
            for who in ("bare", "tvix")
        ]
        for name in order:
            await ops[name]()  # warm-up (and the first Put of the tree)
        for _ in range(REPEATS):
            for name in order:
                server = bare if name.startswith("bare") else tvix
                cpu0 = time.process_time() + server.cpu()
                start = time.perf_counter()
                await ops[name]()
                times.setdefault(name, []).append(time.perf_counter() - start)
                cpu.setdefault(name, []).append(time.process_time() + server.cpu() - cpu0)
    await blobs.close()
    await dirs.close()
    return times, cpu


async def _memory_get(closure: list[Directory]) -> float:
    svc = MemoryDirectoryService()
    async with svc.put_multiple_start() as putter:
        for d in closure:
            await putter.put(d)
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        async for _ in svc.get_recursive(closure[-1].digest):
            pass
        times.append(time.perf_counter() - start)
    return min(times)


def _tree(fanout: int) -> list[Directory]:
    """A closure leaves-first: root -> fanout dirs -> fanout-1 leaf dirs each."""
    out: list[Directory] = []
    mids = []
    for i in range(fanout):
        leaves = []
        for j in range(fanout - 1):
            leaf = Directory(files=[FileNode(b"f%d-%d" % (i, j), EMPTY_BLOB_DIGEST, 0)])
            out.append(leaf)
            leaves.append(DirectoryNode(b"l%d" % j, leaf.digest, leaf.size))
        mid = Directory(directories=sorted(leaves, key=lambda n: n.name))
        out.append(mid)
        mids.append(DirectoryNode(b"m%d" % i, mid.digest, mid.size))
    out.append(Directory(directories=sorted(mids, key=lambda n: n.name)))
    return out


def main() -> None:
    closure = _tree(100)
    bare, tvix = _Server("bare"), _Server("tvix")
    try:
        times, cpu = asyncio.run(_run_all(bare, tvix, closure))
    finally:
        bare.stop()
        tvix.stop()
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu.items()}
    t_mem = asyncio.run(_memory_get(closure))

    rows = []
    for what, key in [("Put", "put"), ("Read", "read")]:
        tvix_t, bare_t = best[f"tvix_{key}"], best[f"bare_{key}"]
        rows.append(
            [
                what,
                mbps(BLOB_SIZE, tvix_t),
                mbps(BLOB_SIZE, bare_t),
                f"{bare_t / tvix_t:.2f}x",
                f"{median[f'bare_{key}'] / median[f'tvix_{key}']:.2f}x",
                f"{cpu_med[f'tvix_{key}']:.2f} s / {cpu_med[f'bare_{key}']:.2f} s",
            ]
        )
    table(
        f"1 GiB blob over loopback TCP, server in another process, best of {REPEATS}",
        [
            "call",
            "tvix (verified)",
            "bare grpc.aio, 1 MiB msgs",
            "ratio",
            "ratio of medians",
            "CPU tvix / bare",
        ],
        rows,
    )
    n = len(closure)
    dir_rows = []
    for what, key in [
        ("Put, one closure stream", "tvix_small_put"),
        (f"bare: {n:,} {SMALL}-byte messages up", "bare_small_put"),
        ("recursive Get, verified", "tvix_small_read"),
        (f"bare: {n:,} {SMALL}-byte messages down", "bare_small_read"),
    ]:
        dir_rows.append([what, f"{best[key]:.2f} s", f"{n / best[key]:,.0f}"])
    dir_rows.append(["memory get_recursive, no gRPC", f"{t_mem:.3f} s", f"{n / t_mem:,.0f}"])
    table(
        f"{n:,}-Directory tree (root, 100 dirs, 99 leaves each), best of {REPEATS}",
        ["what", "time", "Directories/s"],
        dir_rows,
    )
    worst = min(best[f"bare_{k}"] / best[f"tvix_{k}"] for k in ("put", "read"))
    verdict = "OK" if worst >= 0.7 else "MISSED"
    print(f"\ntarget: Put and Read >= 0.7x bare: worst {worst:.2f}x {verdict}")


if __name__ == "__main__":
    main()
