"""``objectstore+file:///dir``, ``objectstore+s3://bucket/prefix``, ``objectstore+memory://``:
chunked blobs in object storage.

Blobs are cut into chunks by content-defined chunking (FastCDC 2020), so equal
runs of bytes in different blobs (a new version of a library, a file inside
two tarballs) are stored once. The layout is upstream tvix's, so an upstream
tvix-store pointed at the same directory or bucket reads what this one wrote
and the other way round:

``chunks/b3/<first 4 hex digits>/<64 hex digits>``
    One chunk, stored under the blake3 digest of its bytes, as one zstd frame
    (compressed with ``zstd=true``; with ``zstd=false`` a frame of "raw"
    blocks, which any zstd decoder reads at memcpy speed). Every chunk object
    is a zstd frame, so readers need no marker and a store may mix both.
``blobs/b3/<first 4 hex digits>/<64 hex digits>``
    The record of a blob of more than one chunk: a ``StatBlobResponse``
    protobuf listing its chunks (digest and size each), in order, which is
    also what the gRPC ``Stat`` call answers.

A blob of one chunk (anything below the minimum chunk size, which is most
files) is stored as that chunk alone: its digest is the chunk's digest, so it
costs one object and one request to read. :meth:`~ObjectStoreBlobService.chunks`
lists nothing for it.

Chunk sizes (min/avg/max) are upstream's 128/256/512 KiB, or derived from
``avg_chunk_size`` as avg/2 and avg*2. Measured with ``bench/bench_chunking.py``
(2 shared cores, so absolute numbers are noisy):

* FastCDC itself runs at 1.7-2.7 GB/s for every setting, so cost is per chunk
  (one object, one request, Python work per chunk), which favours big chunks;
* dedup favours small ones: of a copy of 64 MiB of binaries with 20% of its
  planted store paths changed, 56% is found in the original's chunks at
  16/64/256, 32% at 32/128/512, 14% at 128/256/512, 2% at 256/512/1024 (64
  small edits: 91%, 79%, 68%, 47%);
* 128/256/512 beats 64/256/1024 (same 345 KiB mean chunk) on both counts
  (2.4 vs 1.9 GB/s, 68% vs 67% and 14% vs 12% shared), and matching
  upstream keeps the number of objects per byte its deployments are sized for;
* end to end, a 256 MiB blob on ``objectstore+file``: put 100-230 MB/s and
  read 400-600 MB/s at 128/256/512 (512 KiB chunks: ~10-40% faster, but
  dedup collapses).

``zstd`` defaults to true: binaries shrink to a third (0.33 of their size
stored), for 0-30% less put and ~15% less read throughput; incompressible
data costs little (zstd level 1 passes it at >2 GB/s). Upstream always
compresses, so this also keeps the objects readable by it.

``objectstore+file`` reads and writes its objects with plain POSIX calls, in
exactly the layout obstore's ``LocalStore`` uses (the object's key is its
path below the directory) and with the same atomicity (a staging file linked
into place, so an existing object is never replaced). obstore's
``LocalStore.put`` costs a fixed 0.6-0.7 ms of CPU per object here, even for
100 bytes (its ``get`` ~90 us), against ~40 us for open/write/link; with one
object per file of a source tree, that was most of an import. The memory and
S3 flavours go through obstore.

Object I/O uses obstore's blocking calls in a thread pool, each call
together with the CPU work around it (fetch + decompress + verify a chunk;
compress + put). Measured here, every asyncio-to-thread handoff costs
0.4-0.5 ms and obstore's asynchronous ``get`` needs two (the request, then the
body), so a sequential chunk read through ``get_async`` ran at 210 MB/s and
through one pooled blocking call at 490 MB/s (640 MB/s with one prefetch in
flight). The pool's size bounds the requests in flight.

Writes are streamed: bytes are buffered until a batch of 4 MiB is complete,
then one worker-thread job cuts it, hashes it (blob and chunks), compresses
the chunks and hands their puts to the I/O pool, while the caller writes the
next batch. The last chunk of a batch may end only because the batch does,
so it is carried over into the next. Memory per writer: about two batches
plus the chunks being put.

Atomicity: chunks and records are written with put-if-not-exists (an
existing object under a content-addressed key already holds the same bytes,
so "already exists" is success), each put is atomic (the local store writes
a staging file and links/renames it into place; object stores never expose
partial objects), and a blob's record is written only after all its chunks
are stored. On S3, put-if-not-exists is a PUT with ``If-None-Match: *``
(AWS S3 since 2024, SeaweedFS: checked by the tests, which see the second
put of a key refused); a server that ignores the header just overwrites an
object with the same bytes, and one that reports the mode as unsupported
switches the service to plain puts. A crash leaves at worst unreferenced
chunks. The local store does not fsync, so after a power loss an object may
be empty or damaged: readers verify every chunk against its digest (and,
reading a blob front to back, the whole blob against its digest), so damage
surfaces as
:class:`~tvix.castore.errors.IntegrityError`, never as wrong bytes.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import blake3
import obstore
import zstandard
from google.protobuf.message import DecodeError
from obstore.exceptions import AlreadyExistsError, BaseError, NotSupportedError
from obstore.store import LocalStore, MemoryStore, S3Store
from pyfastcdc.cy import FastCDC

from tvix.castore.blobservice.base import BlobReader, BlobService, BlobWriter, ChunkMeta
from tvix.castore.blobservice._readers import BytesBlobReader
from tvix.castore.blobservice._readers import seek_target as _seek_target
from tvix.castore.digest import B3Digest
from tvix.castore.errors import IntegrityError, InvalidURLError, StorageError, ValidationError
from tvix.castore.proto import pb
from tvix.castore.url import ServiceURL

if TYPE_CHECKING:
    from obstore.store import ObjectStore

__all__ = ["ObjectStoreBlobService", "from_url"]

T = TypeVar("T")

KIB = 1024
MIB = 1024 * KIB

DEFAULT_AVG_CHUNK_SIZE = 256 * KIB
# FastCDC's own limits (pyfastcdc rejects min > 1 MiB and max > 16 MiB).
MIN_AVG_CHUNK_SIZE = 4 * KIB
MAX_AVG_CHUNK_SIZE = 1 * MIB

# Bytes cut per worker-thread round trip: big enough that the hop (~0.1 ms)
# is small next to the work, small enough to keep writers' memory low.
BATCH_SIZE = 4 * MIB
# Threads per service doing object I/O: the requests in flight at most.
IO_THREADS = 4
# Chunks a reader fetches ahead while reading front to back (~2 MiB at the
# default chunk size): enough to keep the I/O threads busy.
READ_AHEAD = 8
# No chunk object may decompress to more than this (a bomb guard for chunks
# opened by digest, whose size no record states).
MAX_CHUNK_SIZE = 64 * MIB
ZSTD_LEVEL = 1

# A zstd block holds at most 128 KiB.
_ZSTD_BLOCK = 128 * KIB
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# Frame header: single segment (no window descriptor), 4-byte content size.
_ZSTD_RAW_HEADER = _ZSTD_MAGIC + b"\xa0"


def _raw_zstd_frame(data: bytes | memoryview) -> bytes:
    """``data`` as a zstd frame of uncompressed blocks: no CPU spent compressing,
    yet every chunk object stays a zstd frame any decoder reads."""
    size = len(data)
    parts = [_ZSTD_RAW_HEADER, size.to_bytes(4, "little")]
    if size == 0:
        parts.append(b"\x01\x00\x00")  # last block, raw, empty
    for start in range(0, size, _ZSTD_BLOCK):
        block = data[start : start + _ZSTD_BLOCK]
        last = start + _ZSTD_BLOCK >= size
        # Block header: bit 0 last block, bits 1-2 type (0 = raw), bits 3.. size.
        parts.append(((len(block) << 3) | last).to_bytes(3, "little"))
        parts.append(bytes(block))
    return b"".join(parts)


_EMPTY_DIGEST = blake3.blake3(b"").digest()


def _digest_key(kind: str, prefix: str, digest: bytes) -> str:
    h = digest.hex()
    return f"{prefix}{kind}/b3/{h[:4]}/{h}"


@dataclass(frozen=True, slots=True)
class _Chunking:
    """Sizes FastCDC cuts at."""

    min_size: int
    avg_size: int
    max_size: int

    @classmethod
    def around(cls, avg: int) -> _Chunking:
        return cls(avg // 2, avg, avg * 2)


_codecs = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    """This thread's zstd compressor (making one costs more than compressing a small file)."""
    c: zstandard.ZstdCompressor | None = getattr(_codecs, "compressor", None)
    if c is None:
        c = _codecs.compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor."""
    d: zstandard.ZstdDecompressor | None = getattr(_codecs, "decompressor", None)
    if d is None:
        d = _codecs.decompressor = zstandard.ZstdDecompressor()
    return d


class _LocalFiles:
    """Objects as files below ``root``, laid out as obstore's LocalStore does."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")
        self._dirs: set[str] = set()
        self._tmp = itertools.count()

    def get(self, key: str) -> bytes | None:
        try:
            fd = os.open(f"{self.root}/{key}", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            first = os.read(fd, 4 * MIB)
            if len(first) < 4 * MIB:
                return first  # a short read of a regular file is its end: one syscall
            parts = [first]
            while chunk := os.read(fd, 4 * MIB):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def put(self, key: str, payload: bytes) -> None:
        """Write ``payload`` at ``key`` unless an object is there already."""
        path = f"{self.root}/{key}"
        parent = path.rpartition("/")[0]
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        tmp = f"{path}#{os.getpid()}.{threading.get_ident()}.{next(self._tmp)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        try:
            fd = os.open(tmp, flags, 0o644)
        except FileNotFoundError:
            # The directory went away since it was made (someone cleaned up).
            os.makedirs(parent, exist_ok=True)
            fd = os.open(tmp, flags, 0o644)
        try:
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces an existing object
        except FileExistsError:
            pass  # the same content, written earlier or concurrently
        finally:
            os.unlink(tmp)

    def exists(self, key: str) -> bool:
        return os.path.exists(f"{self.root}/{key}")


# Builds the store a URL of one flavour names: (store, key prefix). Query
# options are checked before, against the flavour's own plus OPTIONS.
StoreBuilder = Callable[[ServiceURL], "tuple[ObjectStore, str]"]


def _file_store(url: ServiceURL) -> tuple[ObjectStore, str]:
    url.reject_host()
    path = url.require_path()
    if not path.startswith("/"):
        raise InvalidURLError(f"invalid service URL {url.raw!r}: the path must be absolute")
    try:
        return LocalStore(path, mkdir=True), ""
    except (BaseError, OSError) as e:
        raise InvalidURLError(
            f"invalid service URL {url.raw!r}: cannot use {path}: {_first_line(e)}"
        ) from None


def _memory_store(url: ServiceURL) -> tuple[ObjectStore, str]:
    url.reject_host()
    url.reject_path()
    return MemoryStore(), ""


def _s3_store(url: ServiceURL) -> tuple[ObjectStore, str]:
    """``objectstore+s3://bucket[/prefix]?endpoint=URL&region=R&allow_http=true``.

    Credentials, and anything not given in the URL, come from the environment
    as obstore reads it: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
    ``AWS_SESSION_TOKEN``, ``AWS_REGION`` (also ``AWS_DEFAULT_REGION``),
    ``AWS_ENDPOINT_URL``, web identity and instance metadata (no
    ``~/.aws`` files). ``endpoint`` selects an S3-compatible server (path-style
    requests); an ``http://`` endpoint implies ``allow_http=true``, which is
    otherwise off so that credentials never travel in clear text by accident.
    The prefix, if any, is a key prefix inside the bucket.
    """
    bucket = url.host
    if not bucket or "@" in bucket or ":" in bucket:
        raise InvalidURLError(
            f"invalid service URL {url.raw!r}: expected objectstore+s3://BUCKET[/PREFIX] "
            "(credentials come from the environment, the endpoint from ?endpoint=)"
        )
    prefix = url.path.strip("/")
    if "//" in prefix:
        raise InvalidURLError(f"invalid service URL {url.raw!r}: empty segment in the prefix")
    config: dict[str, str] = {}
    endpoint = url.params.get("endpoint")
    if endpoint is not None:
        if not endpoint.startswith(("http://", "https://")):
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: endpoint must be an http:// or https:// URL"
            )
        config["endpoint"] = endpoint.rstrip("/")
    region = url.params.get("region")
    if region is not None:
        config["region"] = region
    allow_http = _bool_param(
        url, "allow_http", endpoint is not None and endpoint.startswith("http://")
    )
    try:
        store = S3Store(
            bucket,
            config=config,  # type: ignore[arg-type]
            client_options={"allow_http": allow_http},
        )
    except (BaseError, ValueError) as e:
        raise InvalidURLError(f"invalid service URL {url.raw!r}: {_first_line(e)}") from None
    return store, f"{prefix}/" if prefix else ""


# The flavours by URL scheme suffix (``objectstore+<flavour>``): the builder
# and the query options it reads.
STORE_FLAVOURS: dict[str, tuple[StoreBuilder, tuple[str, ...]]] = {
    "file": (_file_store, ()),
    "memory": (_memory_store, ()),
    "s3": (_s3_store, ("endpoint", "region", "allow_http")),
}

# Options every flavour takes.
OPTIONS = ("zstd", "avg_chunk_size")


def _first_line(e: BaseException) -> str:
    """obstore's messages carry a multi-line debug dump after the first line."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _bool_param(url: ServiceURL, key: str, default: bool) -> bool:
    value = url.params.get(key)
    if value is None:
        return default
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise InvalidURLError(f"invalid service URL {url.raw!r}: {key} must be true or false")


class ObjectStoreBlobService(BlobService):
    """Blobs chunked by FastCDC into an ``obstore`` object store (see the module docs).

    ``chunks`` lists the chunks of a blob stored as more than one, and ``[]``
    for a blob stored as a single chunk (or for a chunk itself).
    ``open_read`` reads blobs and chunks alike; a reader fetches only the
    chunks its reads touch, keeps the current chunk and up to READ_AHEAD more in
    memory, and prefetches the next while reading front to back.
    """

    def __init__(
        self,
        store: ObjectStore,
        prefix: str = "",
        *,
        zstd: bool = True,
        avg_chunk_size: int = DEFAULT_AVG_CHUNK_SIZE,
        local_root: str | None = None,
    ) -> None:
        """Store under ``prefix`` (``""`` or ending in ``/``) in ``store``.

        ``zstd`` compresses chunks; ``avg_chunk_size`` sets FastCDC's target
        (min half, max twice that). ``local_root``, for a ``LocalStore`` rooted
        there, reads and writes its files directly (see the module docs).
        """
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        if not MIN_AVG_CHUNK_SIZE <= avg_chunk_size <= MAX_AVG_CHUNK_SIZE:
            raise ValidationError(
                f"avg_chunk_size {avg_chunk_size} is outside "
                f"{MIN_AVG_CHUNK_SIZE}..{MAX_AVG_CHUNK_SIZE}"
            )
        self._store = store
        self._local = _LocalFiles(local_root) if local_root is not None else None
        self._prefix = prefix
        self._zstd = zstd
        self._chunking = _Chunking.around(avg_chunk_size)
        # Object I/O runs on obstore's blocking API in these threads, each call
        # together with the CPU work around it (see the module docs for why).
        # The threads bound the requests in flight across all readers and writers.
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="tvix-objectstore")
        self._queued: list[_Job] = []
        self._closed = False
        # Cleared on the first store that rejects put-if-not-exists; content-
        # addressed objects can then simply be overwritten with the same bytes.
        self._create_mode = True

    @classmethod
    def from_url(cls, url: ServiceURL) -> ObjectStoreBlobService:
        """``objectstore+file:///abs/dir``, ``objectstore+s3://bucket/prefix`` or
        ``objectstore+memory://``.

        Options: ``zstd=true|false`` (default true), ``avg_chunk_size=<bytes>``
        (default 262144); for S3 also ``endpoint``, ``region`` and
        ``allow_http`` (see :func:`_s3_store`).
        """
        flavour = url.scheme.removeprefix("objectstore+")
        known = STORE_FLAVOURS.get(flavour) if flavour != url.scheme else None
        if known is None:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: unknown object store flavour {flavour!r} "
                f"(known: {', '.join(sorted(STORE_FLAVOURS))})"
            )
        build, flavour_options = known
        # Options are checked before building, so a bad URL creates no directory.
        url.reject_params(*OPTIONS, *flavour_options)
        zstd = _bool_param(url, "zstd", True)
        avg = url.int_param("avg_chunk_size", DEFAULT_AVG_CHUNK_SIZE)
        if not MIN_AVG_CHUNK_SIZE <= avg <= MAX_AVG_CHUNK_SIZE:
            raise InvalidURLError(
                f"invalid service URL {url.raw!r}: avg_chunk_size must be within "
                f"{MIN_AVG_CHUNK_SIZE}..{MAX_AVG_CHUNK_SIZE}"
            )
        store, prefix = build(url)
        local_root = url.path if flavour == "file" else None
        return cls(store, prefix, zstd=zstd, avg_chunk_size=avg, local_root=local_root)

    # -- keys and raw object access (blocking; called in worker threads) -----------------

    def _chunk_key(self, digest: bytes) -> str:
        return _digest_key("chunks", self._prefix, digest)

    def _blob_key(self, digest: bytes) -> str:
        return _digest_key("blobs", self._prefix, digest)

    def _get_sync(self, key: str) -> obstore.Bytes | bytes | None:
        try:
            if self._local is not None:
                return self._local.get(key)
            return obstore.get(self._store, key).bytes()
        except FileNotFoundError:
            return None
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: reading {key} failed: {_first_line(e)}") from e

    def _put_sync(self, key: str, payload: bytes) -> None:
        """Store ``payload`` at content-addressed ``key`` unless something is there already."""
        try:
            if self._local is not None:
                self._local.put(key, payload)
                return
            if self._create_mode:
                try:
                    obstore.put(self._store, key, payload, mode="create", use_multipart=False)
                except NotSupportedError:
                    self._create_mode = False
                else:
                    return
            obstore.put(self._store, key, payload, use_multipart=False)
        except AlreadyExistsError:
            pass  # the same content, written earlier or concurrently
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: writing {key} failed: {_first_line(e)}") from e

    def _store_single(self, data: bytes) -> B3Digest:
        """Store ``data`` as a blob of one chunk; return its digest."""
        digest = B3Digest(blake3.blake3(data).digest())
        if self._zstd:
            payload = _compressor().compress(data)
        else:
            payload = _raw_zstd_frame(data)
        self._put_sync(self._chunk_key(digest), payload)
        return digest

    def _read_chunk_sync(self, digest: B3Digest, size: int | None) -> bytes | None:
        """The verified bytes of chunk ``digest`` (of ``size`` if known), ``None`` if absent."""
        raw = self._get_sync(self._chunk_key(digest))
        return None if raw is None else _decode_chunk(raw, digest, size)

    def _read_record_sync(self, digest: B3Digest) -> list[ChunkMeta] | None:
        raw = self._get_sync(self._blob_key(digest))
        return None if raw is None else _decode_record(bytes(raw), digest)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the I/O pool.

        Calls made in the same turn of the event loop (a reader prefetching,
        many small files written at once) are grouped into a few pool jobs,
        each resolving its calls' futures with one wakeup of the loop: per
        object, a handoff to a thread and back costs more than reading or
        writing a small local file.
        """
        if self._closed:
            raise StorageError("object store blob service is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queued.append((fn, args, future))
        if len(self._queued) == 1:
            loop.call_soon(self._dispatch, loop)
        return await future

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs, self._queued = self._queued, []
        groups = min(IO_THREADS, len(jobs))
        for i in range(groups):
            group = jobs[i::groups]
            try:
                done = self._io.submit(_run_group, group)
            except RuntimeError:  # the pool is shut down
                for _fn, _args, future in group:
                    if not future.done():
                        future.set_exception(StorageError("object store blob service is closed"))
                continue
            done.add_done_callback(partial(_wake, loop, group))

    async def _exists(self, key: str) -> bool:
        if self._local is not None:
            # A stat of a local file: cheaper than any handoff to a thread.
            return self._local.exists(key)
        # Asynchronous: a HEAD carries no data to process, so there is no thread work to join.
        try:
            await obstore.head_async(self._store, key)
        except FileNotFoundError:
            return False
        except (BaseError, OSError) as e:
            raise StorageError(f"object store: checking {key} failed: {_first_line(e)}") from e
        return True

    # -- BlobService ------------------------------------------------------------------------

    async def has(self, digest: B3Digest) -> bool:
        # Chunk first: most blobs are a single chunk.
        return await self._exists(self._chunk_key(digest)) or await self._exists(
            self._blob_key(digest)
        )

    async def open_read(self, digest: B3Digest) -> BlobReader | None:
        data = await self._run(self._read_chunk_sync, digest, None)
        if data is not None:
            return BytesBlobReader(data)
        chunks = await self._run(self._read_record_sync, digest)
        if chunks is None:
            return None
        return _ChunkedReader(self, digest, chunks)

    def open_write(self) -> BlobWriter:
        return _ObjectStoreBlobWriter(self)

    async def read_many(self, digests: Sequence[B3Digest]) -> list[bytes | None]:
        # Single-chunk blobs (most small files) in one pool job per batch;
        # anything stored in several chunks goes through a reader.
        out = await self._run(self._read_chunks_sync, list(digests))
        for i, data in enumerate(out):
            if data is None:
                out[i] = await self._read_whole(digests[i])
        return out

    def _read_chunks_sync(self, digests: list[B3Digest]) -> list[bytes | None]:
        return [self._read_chunk_sync(d, None) for d in digests]

    async def chunks(self, digest: B3Digest) -> list[ChunkMeta] | None:
        chunks = await self._run(self._read_record_sync, digest)
        if chunks is not None:
            return chunks
        return [] if await self._exists(self._chunk_key(digest)) else None

    async def close(self) -> None:
        self._closed = True
        self._io.shutdown(wait=False, cancel_futures=True)


_Job = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


def _run_group(group: list[_Job]) -> list[tuple[bool, Any]]:
    """Run a group of calls in a pool thread: (ok, result or exception) each."""
    out: list[tuple[bool, Any]] = []
    for fn, args, future in group:
        if future.cancelled():
            out.append((False, None))
            continue
        try:
            out.append((True, fn(*args)))
        except BaseException as e:
            out.append((False, e))
    return out


def _wake(
    loop: asyncio.AbstractEventLoop, group: list[_Job], done: Future[list[tuple[bool, Any]]]
) -> None:
    """From the pool thread: resolve the group's futures in the loop, with one wakeup."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_resolve_group, group, done)


def _resolve_group(group: list[_Job], done: Future[list[tuple[bool, Any]]]) -> None:
    """Hand a group's results to its futures (in the event loop)."""
    if done.cancelled():  # the pool shut down before running it
        closed = StorageError("object store blob service is closed")
        results: list[tuple[bool, Any]] = [(False, closed)] * len(group)
    else:
        try:
            results = done.result()
        except BaseException as e:
            results = [(False, e)] * len(group)
    for (_fn, _args, future), (ok, value) in zip(group, results, strict=True):
        if future.done():
            continue
        if ok:
            future.set_result(value)
        elif value is not None:
            future.set_exception(value)
        else:
            future.cancel()


def from_url(url: ServiceURL) -> ObjectStoreBlobService:
    """The registry's entry point; see :meth:`ObjectStoreBlobService.from_url`."""
    return ObjectStoreBlobService.from_url(url)


def _decode_chunk(raw: obstore.Bytes | bytes, digest: B3Digest, size: int | None) -> bytes:
    """Decompress and verify one chunk object; runs in a worker thread for big ones."""
    limit = MAX_CHUNK_SIZE if size is None else size
    try:
        frame = memoryview(raw)
        declared = zstandard.frame_content_size(frame)
        if declared > limit:
            raise IntegrityError(
                f"chunk {digest.hex()}: object declares {declared} bytes, expected at most {limit}"
            )
        data = _decompressor().decompress(frame, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise IntegrityError(f"chunk {digest.hex()}: not a valid zstd frame: {e}") from None
    got = blake3.blake3(data).digest()
    if got != digest:
        raise IntegrityError(f"chunk {digest.hex()}: stored bytes hash to {got.hex()}")
    if size is not None and len(data) != size:
        # Only a record can be wrong here: the bytes match their digest.
        raise IntegrityError(
            f"chunk {digest.hex()} has {len(data)} bytes, its blob's record says {size}"
        )
    return data


def _decode_record(raw: bytes, digest: B3Digest) -> list[ChunkMeta]:
    try:
        msg = pb.StatBlobResponse.FromString(raw)
        chunks = [ChunkMeta(B3Digest(c.digest), c.size) for c in msg.chunks]
    except (DecodeError, ValidationError) as e:
        raise IntegrityError(f"blob {digest.hex()}: damaged blob record: {e}") from None
    # We never write a record without chunks (the empty blob is an empty
    # chunk; upstream writes an empty record for it); any other empty record
    # is a truncated object that would read as b"".
    if (not chunks and digest != _EMPTY_DIGEST) or any(
        c.size <= 0 or c.size > MAX_CHUNK_SIZE for c in chunks
    ):
        raise IntegrityError(f"blob {digest.hex()}: damaged blob record (bad chunk list)")
    return chunks


class _ChunkedReader(BlobReader):
    """Reads a blob chunk by chunk, fetching each chunk on first touch."""

    def __init__(
        self, service: ObjectStoreBlobService, digest: B3Digest, chunks: list[ChunkMeta]
    ) -> None:
        self._service = service
        self._digest = digest
        self._chunks = chunks
        self._starts: list[int] = []
        offset = 0
        for c in chunks:
            self._starts.append(offset)
            offset += c.size
        self._size = offset
        self._pos = 0
        self._current: tuple[int, bytes] | None = None
        self._last_index = -1
        # Chunks fetched ahead while reading front to back, by index.
        self._ahead: dict[int, asyncio.Task[bytes]] = {}
        # Verifies the whole blob while chunks are fetched in order from the
        # first; a seek elsewhere ends it (the chunks are verified anyway).
        self._blob_hasher: blake3.blake3 | None = blake3.blake3()
        self._hashed_chunks = 0
        self._closed = False

    async def _fetch(self, index: int) -> bytes:
        meta = self._chunks[index]
        data = await self._service._run(self._service._read_chunk_sync, meta.digest, meta.size)
        if data is None:
            raise StorageError(
                f"blob {self._digest.hex()}: chunk {meta.digest.hex()} is missing "
                "(the store is damaged)"
            )
        return data

    async def _chunk(self, index: int) -> bytes:
        if self._current is not None and self._current[0] == index:
            return self._current[1]
        self._current = None
        pending = self._ahead.pop(index, None)
        sequential = index == self._last_index + 1
        if not sequential:
            self._cancel_ahead()
        data = await pending if pending is not None else await self._fetch(index)
        self._verify_blob(index, data)
        self._current = (index, data)
        self._last_index = index
        if sequential:
            # Reading front to back: keep the next chunks coming, fetched,
            # decompressed and verified in parallel on the I/O pool.
            for ahead in range(index + 1, min(index + 1 + READ_AHEAD, len(self._chunks))):
                if ahead not in self._ahead:
                    self._ahead[ahead] = asyncio.ensure_future(self._fetch(ahead))
        return data

    def _cancel_ahead(self) -> None:
        for task in self._ahead.values():
            task.cancel()
            # Collect it, so a failed prefetch is not reported as never retrieved.
            task.add_done_callback(_ignore_result)
        self._ahead.clear()

    def _verify_blob(self, index: int, data: bytes) -> None:
        hasher = self._blob_hasher
        if hasher is None:
            return
        if index != self._hashed_chunks:
            self._blob_hasher = None
            return
        hasher.update(data)
        self._hashed_chunks += 1
        if self._hashed_chunks == len(self._chunks):
            self._blob_hasher = None
            got = hasher.digest()
            if got != self._digest:
                raise IntegrityError(
                    f"blob {self._digest.hex()}: its record lists chunks hashing to {got.hex()}"
                )

    async def read(self, n: int = -1) -> bytes:
        if self._closed:
            raise ValueError("read from a closed blob reader")
        if n < 0:
            parts = []
            while part := await self.read(MAX_CHUNK_SIZE):
                parts.append(part)
            return b"".join(parts)
        pos = self._pos
        if n == 0 or pos >= self._size:
            return b""
        index = bisect.bisect_right(self._starts, pos) - 1
        data = await self._chunk(index)
        start = pos - self._starts[index]
        out = data[start : start + n]
        self._pos = pos + len(out)
        return out

    async def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._pos = _seek_target(self._pos, self._size, offset, whence)
        return self._pos

    def tell(self) -> int:
        return self._pos

    async def close(self) -> None:
        self._closed = True
        self._current = None
        tasks = list(self._ahead.values())
        self._cancel_ahead()
        await asyncio.gather(*tasks, return_exceptions=True)


def _ignore_result(task: asyncio.Task[bytes]) -> None:
    if not task.cancelled():
        task.exception()


class _ObjectStoreBlobWriter(BlobWriter):
    def __init__(self, service: ObjectStoreBlobService) -> None:
        self._service = service
        c = service._chunking
        self._cdc = FastCDC(
            avg_size=c.avg_size, min_size=c.min_size, max_size=c.max_size, normalized_chunking=1
        )
        self._batch = max(BATCH_SIZE, 2 * c.max_size)
        self._pending: list[bytes] = []  # written, not handed to a batch yet
        self._pending_size = 0
        # The batch being cut and stored in a thread, while the caller writes the next one.
        self._job: asyncio.Future[tuple[bytes, list[Future[None]]]] | None = None
        # Touched only by batch jobs, which run one at a time.
        self._hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._chunks: list[ChunkMeta] = []
        self._stored: set[B3Digest] = set()
        self._digest: B3Digest | None = None
        self._failed = False
        self._aborted = False

    async def write(self, data: bytes | memoryview) -> None:
        if self._digest is not None or self._aborted:
            raise ValueError("write to a closed blob writer")
        if self._failed:
            raise ValueError("write to a failed blob writer")
        if not data:
            return
        # Copied: the caller may reuse its buffer, and the bytes outlive this call.
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if self._pending_size >= self._batch:
            await self._flush(final=False)

    async def _flush(self, final: bool) -> None:
        """Hand what is pending, after the previous batch's uncut tail, to a new batch job."""
        tail, puts = await self._wait_job()
        buf = b"".join([tail, *self._pending])
        self._pending = []
        self._pending_size = 0
        self._job = asyncio.get_running_loop().run_in_executor(
            None, self._store_batch, buf, final, puts
        )
        if final:
            await self._wait_job()

    async def _wait_job(self) -> tuple[bytes, list[Future[None]]]:
        job, self._job = self._job, None
        if job is None:
            return b"", []
        try:
            return await job
        except BaseException:
            self._failed = True
            raise

    def _store_batch(
        self, buf: bytes, final: bool, previous: list[Future[None]]
    ) -> tuple[bytes, list[Future[None]]]:
        """Cut ``buf``, start storing its chunks, and return the tail left uncut.

        Runs in a thread. Unless ``final``, the last chunk is left as the tail:
        it may end only because the buffer does. Chunk puts run on the
        service's I/O threads; this batch's are returned unfinished and waited
        for by the next batch (``previous``), so cutting one batch overlaps
        storing the one before, and at most two batches are in memory. The
        final batch waits for its own too.
        """
        view = memoryview(buf)
        cuts = [(c.offset, c.length) for c in self._cdc.cut_buf(view)]
        if not final and cuts:
            cuts.pop()
        if final and not cuts and not self._chunks:
            cuts = [(0, 0)]  # the empty blob: one empty chunk
        used = cuts[-1][0] + cuts[-1][1] if cuts else 0
        self._hasher.update(view[:used])
        service = self._service
        compressor = _compressor()
        puts: list[Future[None]] = []
        for offset, length in cuts:
            data = view[offset : offset + length]
            digest = B3Digest(blake3.blake3(data).digest())
            self._chunks.append(ChunkMeta(digest, length))
            if digest in self._stored:
                continue
            self._stored.add(digest)
            payload = compressor.compress(data) if service._zstd else _raw_zstd_frame(data)
            puts.append(service._io.submit(service._put_sync, service._chunk_key(digest), payload))
        for put in previous + puts if final else previous:
            put.result()  # raises the first failure
        return buf[used:], [] if final else puts

    async def close(self) -> B3Digest:
        if self._digest is not None:
            return self._digest
        if self._aborted:
            raise ValueError("close of an aborted blob writer")
        if self._failed:
            raise ValueError("close of a failed blob writer")
        try:
            if self._job is None and self._pending_size < self._service._chunking.min_size:
                # Smaller than any chunk FastCDC cuts (most files): one chunk,
                # hashed, compressed and stored in a single job on the I/O pool.
                data = b"".join(self._pending)
                self._pending = []
                service = self._service
                self._digest = await service._run(service._store_single, data)
                return self._digest
            await self._flush(final=True)
            digest = B3Digest(self._hasher.digest())
            if len(self._chunks) > 1:
                record = pb.StatBlobResponse(
                    chunks=[
                        pb.StatBlobResponse.ChunkMeta(digest=c.digest, size=c.size)
                        for c in self._chunks
                    ]
                )
                # Only now: every chunk it lists is stored.
                service = self._service
                await service._run(
                    service._put_sync, service._blob_key(digest), record.SerializeToString()
                )
        except BaseException:
            self._failed = True
            raise
        self._digest = digest
        self._chunks = []
        return digest

    async def abort(self) -> None:
        if self._digest is None and not self._aborted:
            self._aborted = True
            self._pending = []
            # A running batch job cannot be interrupted; let it finish (its chunks
            # are valid content, just unreferenced) so nothing outlives the writer.
            job, self._job = self._job, None
            if job is not None:
                await asyncio.gather(job, return_exceptions=True)
