"""The worker protocol's operations, answered from the store services.

One :class:`Session` per connection: :func:`handshake` first, then
:meth:`Session.handle` per operation. An operation reads its arguments,
then (as Nix's daemon does with ``startWork``) may send log messages, and
ends with ``STDERR_LAST`` and its result, or ``STDERR_ERROR``.

Errors keep the connection usable whenever the protocol allows it: the
arguments are read completely before anything can fail, and the rest of a
framed upload is read and dropped before its error is sent. Only malformed
protocol data (unknown operation, oversized or truncated message), a raw
NAR that breaks off (old protocols) and a failure in the middle of a NAR
being sent make the daemon close the connection, as Nix's daemon does.

See :data:`OPERATIONS` for what is answered and what is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from tvix.castore import FileNode, Node
from tvix.castore.blobservice import BlobService
from tvix.castore.directoryservice import DirectoryService
from tvix.nix_daemon import wire
from tvix.nix_daemon.drv import parse_drv_outputs
from tvix.nix_daemon.errors import (
    NotTrusted,
    OperationError,
    Refused,
    WireError,
    message_for,
)
from tvix.nix_daemon.policy import TrustPolicy
from tvix.nix_daemon.stream import (
    Connection,
    Disconnected,
    FramedSource,
    PullSource,
    Source,
    read_nar_exactly,
)
from tvix.nixcompat import (
    STORE_DIR,
    CAHash,
    CAKind,
    HashAlgo,
    NixCompatError,
    Signature,
    StorePath,
    build_ca_path,
    decode_digest,
    fingerprint,
    nixbase32,
    parse_hash,
    verify_any,
)
from tvix.nixcompat.nar import Contents, NarEvent, Regular
from tvix.store import NarMismatchError, PathInfo
from tvix.store.nar import calculate_nar, ingest_nar, render_nar
from tvix.store.pathinfoservice import PathInfoService

__all__ = ["MIN_CLIENT_VERSION", "OPERATIONS", "Session", "StoreServices", "handshake"]

log = logging.getLogger("tvix.nix_daemon")

#: Oldest client protocol served: 1.21 (Nix 2.3). Older ones send NARs in ways
#: (wopImportPaths) this daemon does not take.
MIN_CLIENT_VERSION = 1 << 8 | 21
#: What the daemon says it is (``nix store ping`` shows it, protocol ≥ 1.33).
DAEMON_VERSION = "2.8.0-tvix-store"
# A .drv read to answer output queries; real ones are a few KiB.
_MAX_DRV = 16 << 20
# Pieces of a flat file read from a framed source at a time.
_CHUNK = 1 << 20

# Nix's activity and verbosity codes used in log messages.
_ACT_COPY_PATH = 100
_LVL_INFO = 3


@dataclass
class StoreServices:
    """The three services the daemon serves."""

    blobs: BlobService
    directories: DirectoryService
    path_infos: PathInfoService


@dataclass
class _Ingested:
    node: Node
    nar_size: int
    nar_sha256: bytes
    ca_digest: bytes | None = None


@dataclass
class _Stats:
    detail: str = ""


async def handshake(conn: Connection, trusted: bool) -> int:
    """Exchange greetings and versions; the version the connection uses.

    Raises :class:`WireError` for a peer that is not a Nix client or too old
    (after telling it why, where the protocol lets us).
    """
    magic = await conn.decode(wire.read_u64())
    if magic != wire.WORKER_MAGIC_1:
        raise WireError(f"protocol mismatch: not a Nix client (magic {magic:#x})")
    conn.write(wire.enc_u64(wire.WORKER_MAGIC_2) + wire.enc_u64(wire.PROTOCOL_VERSION))
    await conn.flush()
    client = await conn.decode(wire.read_u64())
    version = min(client, wire.PROTOCOL_VERSION)
    if client >> 8 != 1:
        raise WireError(f"unsupported protocol major version {client >> 8}")
    m = wire.minor(version)
    if m >= 14:
        affinity = await conn.decode(wire.read_u64())
        if affinity:
            await conn.decode(wire.read_u64())  # obsolete CPU affinity
    if m >= 11:
        await conn.decode(wire.read_u64())  # obsolete reserveSpace
    if m >= 33:
        conn.write(wire.enc_string(DAEMON_VERSION))
    if m >= 35:
        conn.write(wire.enc_u64(1 if trusted else 2))
    if client < MIN_CLIENT_VERSION:
        conn.write(
            wire.error_message(
                f"tvix-store nix-daemon: client protocol 1.{wire.minor(client)} is too old "
                f"(at least 1.{wire.minor(MIN_CLIENT_VERSION)}, Nix 2.3, needed)",
                version,
            )
        )
        await conn.flush()
        raise WireError(f"client protocol 1.{wire.minor(client)} is too old")
    conn.write(wire.enc_u64(wire.STDERR_LAST))
    await conn.flush()
    return version


Handler = Callable[["Session", _Stats], Awaitable[None]]


@dataclass(frozen=True)
class Operation:
    """An opcode of the worker protocol and how this daemon answers it."""

    code: int
    name: str
    handler: Handler
    refused: bool = False


OPERATIONS: dict[int, Operation] = {}


def _op(code: int, name: str, *, refused: bool = False) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        OPERATIONS[code] = Operation(code, name, fn, refused)
        return fn

    return register


@dataclass
class Session:
    """One client connection's state: its protocol version, trust and settings."""

    conn: Connection
    services: StoreServices
    version: int
    trusted: bool
    policy: TrustPolicy = field(default_factory=TrustPolicy)
    peer: str = "client"
    #: Settings the client sent with SetOptions (informational: nothing here builds).
    options: dict[str, str] = field(default_factory=dict)

    @property
    def minor(self) -> int:
        """The minor protocol version of the connection (34 for Nix 2.8)."""
        return wire.minor(self.version)

    # -- one operation --

    async def handle(self, code: int) -> None:
        """Read and answer one operation; its reply is flushed.

        Raises :class:`WireError` when the connection cannot go on (after
        sending the client the error if it can still be understood).
        """
        op = OPERATIONS.get(code)
        if op is None:
            log.info("%s: unknown operation %d -> closing", self.peer, code)
            self.conn.write(
                wire.error_message(f"tvix-store nix-daemon: unknown operation {code}", self.version)
            )
            await self.conn.flush()
            raise WireError(f"unknown operation {code}")
        start = time.monotonic()
        stats = _Stats()
        outcome = "ok"
        try:
            await op.handler(self, stats)
        except WireError as e:
            outcome = f"closing: {e}"
            if not isinstance(e, _Unsendable | Disconnected):
                self.conn.write(wire.error_message(str(e), self.version))
                await _flush_quietly(self.conn)
            raise
        except Exception as e:
            message = message_for(e)
            if message is None:
                log.exception("%s: %s failed", self.peer, op.name)
                message = f"tvix-store: internal error: {type(e).__name__}: {e}"
            outcome = f"error: {message}"
            self.conn.write(wire.error_message(message, self.version))
        finally:
            log.info(
                "%s: %s%s -> %s (%.1f ms)",
                self.peer,
                op.name,
                f" {stats.detail}" if stats.detail else "",
                outcome,
                (time.monotonic() - start) * 1000,
            )
        await self.conn.flush()

    # -- helpers --

    async def read(self, decoder: wire.Decoder[wire.T]) -> wire.T:
        """Decode the next argument."""
        return await self.conn.decode(decoder)

    async def read_path_arg(self, stats: _Stats) -> str:
        """Read a store path argument (as text: it is parsed once all arguments are in)."""
        text = await self.read(wire.read_string(4096))
        stats.detail = text
        return text

    def ok(self, *parts: bytes) -> None:
        """Success: ``STDERR_LAST`` and the result."""
        self.conn.write(wire.enc_u64(wire.STDERR_LAST))
        for part in parts:
            self.conn.write(part)

    def log_line(self, text: str) -> None:
        """A line the client prints (only between arguments and result)."""
        self.conn.write(wire.next_message(text))

    async def get_info(self, path: StorePath) -> PathInfo | None:
        """The PathInfo of ``path`` (hash and name), or ``None``."""
        info = await self.services.path_infos.get(path.digest)
        if info is not None and info.store_path != path:
            return None  # same hash, other name: not this path
        return info

    async def require_info(self, text: str) -> PathInfo:
        """The PathInfo of the path ``text``; an error the client shows if it is not stored."""
        info = await self.get_info(parse_path(text))
        if info is None:
            raise OperationError(f"path '{text}' is not valid")
        return info

    def enc_info(self, info: PathInfo, include_path: bool) -> bytes:
        """A ValidPathInfo as this connection's version writes it."""
        parts = []
        if include_path:
            parts.append(wire.enc_string(info.store_path.absolute_path))
        parts.append(wire.enc_string(info.deriver.absolute_path if info.deriver else ""))
        parts.append(wire.enc_string(info.nar_sha256.hex()))
        parts.append(wire.enc_strings(sorted(r.absolute_path for r in info.references)))
        parts.append(wire.enc_u64(0))  # registration time: not recorded
        parts.append(wire.enc_u64(info.nar_size))
        if self.minor >= 16:
            parts.append(wire.enc_bool(False))  # ultimate: not built here
            parts.append(wire.enc_strings(sorted(str(s) for s in info.signatures)))
            parts.append(wire.enc_string(str(info.ca) if info.ca else ""))
        return b"".join(parts)

    async def read_drv_outputs(self, text: str) -> dict[str, str]:
        """The outputs (name → path) of the stored derivation ``text``."""
        info = await self.require_info(text)
        if not info.store_path.name.endswith(".drv") or not isinstance(info.node, FileNode):
            raise OperationError(f"'{text}' is not a derivation")
        if info.node.size > _MAX_DRV:
            raise OperationError(f"derivation '{text}' is too large ({info.node.size} bytes)")
        data = b"".join([p async for p in render_file(self.services.blobs, info.node)])
        try:
            return parse_drv_outputs(data.decode())
        except (UnicodeDecodeError, ValueError) as e:
            raise OperationError(f"derivation '{text}' cannot be parsed: {e}") from None

    # -- writing --

    def data_source(self) -> Source:
        """Where the NAR of AddToStoreNar comes from, by protocol version."""
        if self.minor >= 23:
            return FramedSource(self.conn)
        return PullSource(self.conn)

    async def ingest(
        self,
        source: Source,
        store_path: StorePath,
        *,
        ca: CAHash | None = None,
        expected_size: int | None = None,
        expected_sha256: bytes | None = None,
    ) -> _Ingested:
        """Ingest the NAR at the start of ``source``; nothing is stored unless it is valid.

        Checks the size and sha256 when given, and a content address's
        digest (computed over the NAR, or over the file it holds for flat
        and text ones). Directories are committed only after all checks.
        """
        h = hashlib.sha256()
        size = 0
        ca_hasher = None
        if ca is not None:
            ca_hasher = hashlib.new(ca.algo.value)
        nar_ca = ca is not None and ca.kind is CAKind.NAR
        shown = store_path.absolute_path

        def on_data(data: bytes) -> None:
            nonlocal size
            h.update(data)
            size += len(data)
            if nar_ca and ca_hasher is not None:
                ca_hasher.update(data)
            if expected_size is not None and size > expected_size:
                raise NarMismatchError(
                    f"size mismatch importing path '{shown}': NAR is longer than the "
                    f"specified {expected_size} bytes"
                )

        events = read_nar_exactly(source, on_data)
        file_root = True

        async def observed() -> AsyncIterator[NarEvent]:
            nonlocal file_root
            first = True
            async for event in events:
                if first:
                    file_root = isinstance(event, Regular)
                    first = False
                if ca_hasher is not None and not nar_ca and isinstance(event, Contents):
                    ca_hasher.update(event.data)
                yield event

        async def check() -> None:
            if expected_size is not None and size != expected_size:
                raise NarMismatchError(
                    f"size mismatch importing path '{shown}';\n"
                    f"  specified: {expected_size}\n  got:       {size}"
                )
            if expected_sha256 is not None and h.digest() != expected_sha256:
                raise NarMismatchError(
                    f"hash mismatch importing path '{shown}';\n"
                    f"  specified: sha256:{nixbase32.encode(expected_sha256)}\n"
                    f"  got:       sha256:{nixbase32.encode(h.digest())}"
                )
            if ca is not None:
                assert ca_hasher is not None
                if not nar_ca and not file_root:
                    raise OperationError(
                        f"path '{shown}' has a {ca.kind.value} content address but is no "
                        "regular file"
                    )
                if ca_hasher.digest() != ca.digest:
                    raise NarMismatchError(
                        f"content address mismatch importing path '{shown}': "
                        f"specified {ca}, got {ca.algo.value}:"
                        f"{nixbase32.encode(ca_hasher.digest())}"
                    )

        node = await ingest_nar(
            self.services.blobs,
            self.services.directories,
            observed(),
            store_path.base_name.encode(),
            before_commit=check,
        )
        return _Ingested(node, size, h.digest())

    async def register(self, info: PathInfo) -> None:
        """Store ``info`` once every reference (but itself) is in the store."""
        for ref in info.references:
            if ref != info.store_path and await self.get_info(ref) is None:
                raise OperationError(
                    f"cannot add path '{info.store_path}' because it references the "
                    f"invalid path '{ref}'"
                )
        await self.services.path_infos.put(info)

    def check_claim(
        self,
        path: StorePath,
        refs: list[StorePath],
        ca: CAHash | None,
        dont_check_sigs: bool,
    ) -> None:
        """Whether a content-addressed ``path`` is the one its content address gives."""
        if ca is not None:
            others = [r for r in refs if r != path]
            try:
                expected = build_ca_path(
                    path.name, ca, others, self_reference=len(others) != len(refs)
                )
            except NixCompatError as e:
                raise OperationError(f"path '{path}': {e}") from None
            if expected != path:
                raise OperationError(
                    f"path '{path}' does not match its content address {ca} "
                    f"(that would be '{expected}')"
                )
            return

    async def add_nar(self, source: Source, claim: _Claim, dont_check_sigs: bool) -> StorePath:
        """AddToStoreNar / one path of AddMultipleToStore: verify, ingest, register."""
        path = parse_path(claim.path)
        refs = [parse_path(r) for r in claim.references]
        deriver = parse_path(claim.deriver) if claim.deriver else None
        nar_sha256 = _parse_nar_hash(claim.nar_hash, path)
        ca = CAHash.parse(claim.ca) if claim.ca else None
        sigs = tuple(Signature.parse(x) for x in claim.sigs)
        unique_refs = tuple(dict.fromkeys(refs))
        self.check_claim(path, refs, ca, dont_check_sigs)
        if ca is None and not (self.trusted and dont_check_sigs):
            fp = fingerprint(path, nar_sha256, claim.nar_size, unique_refs)
            if not verify_any(fp, sigs, self.policy.public_keys):
                raise NotTrusted(f"cannot add path '{path}' because it lacks a valid signature")
        existing = await self.get_info(path)
        if existing is not None:
            # Already valid: Nix skips it too (the NAR is read and dropped).
            async for _ in read_nar_exactly(source):
                pass
            return path
        got = await self.ingest(
            source, path, ca=ca, expected_size=claim.nar_size, expected_sha256=nar_sha256
        )
        info = PathInfo(
            store_path=path,
            node=got.node,
            nar_size=got.nar_size,
            nar_sha256=got.nar_sha256,
            references=unique_refs,
            signatures=sigs,
            deriver=deriver,
            ca=ca,
        )
        await self.register(info)
        return path

    async def add_ca(self, source: Source, name: str, method: str, refs: list[str]) -> PathInfo:
        """AddToStore / AddTextToStore: content whose store path the daemon computes."""
        references = [parse_path(r) for r in refs]
        if method == "text" or method == "text:sha256":
            kind, algo = CAKind.TEXT, HashAlgo.SHA256
        elif method.startswith("fixed:r:"):
            kind, algo = CAKind.NAR, _algo(method[8:])
        elif method.startswith("fixed:"):
            kind, algo = CAKind.FLAT, _algo(method[6:])
        else:
            raise OperationError(f"unsupported content address method '{method}'")
        if (
            kind is not CAKind.TEXT
            and references
            and not (kind is CAKind.NAR and algo is HashAlgo.SHA256)
        ):
            raise OperationError(f"a {method} path cannot have references")
        # Validates the name before the data is read.
        try:
            build_ca_path(name, CAHash(kind, algo, bytes(algo.digest_size)))
        except NixCompatError as e:
            raise OperationError(str(e)) from None
        if kind is CAKind.NAR:
            got = await self.ingest(source, _nameless(name))
            if algo is HashAlgo.SHA256:
                digest = got.nar_sha256
            else:
                # Rare (--add-fixed --recursive sha1): hash the NAR once more.
                digest = await _hash_node(self.services, got.node, algo)
            ca = CAHash(kind, algo, digest)
            node, nar_size, nar_sha256 = got.node, got.nar_size, got.nar_sha256
        else:
            writer = self.services.blobs.open_write()
            hasher = hashlib.new(algo.value)
            size = 0
            try:
                while data := await source.read(_CHUNK):
                    hasher.update(data)
                    size += len(data)
                    await writer.write(data)
                blob = await writer.close()
            except BaseException:
                await writer.abort()
                raise
            ca = CAHash(kind, algo, hasher.digest())
            node = FileNode(b"x", blob, size, False)
            nar_size, nar_sha256 = await calculate_nar(
                self.services.blobs, self.services.directories, node
            )
        path = build_ca_path(name, ca, references)
        info = PathInfo(
            store_path=path,
            node=node.renamed(path.base_name.encode()),
            nar_size=nar_size,
            nar_sha256=nar_sha256,
            references=tuple(dict.fromkeys(references)),
            ca=ca,
        )
        existing = await self.get_info(path)
        if existing is not None:
            return existing
        await self.register(info)
        return info


@dataclass
class _Claim:
    """What a client says about a path it adds (a ValidPathInfo on the wire)."""

    path: str
    deriver: str
    nar_hash: str
    references: list[str]
    registration_time: int
    nar_size: int
    ultimate: bool
    sigs: list[str]
    ca: str


def _read_claim(with_path: bool = True, path: str = "") -> wire.Decoder[_Claim]:
    if with_path:
        path = yield from wire.read_string(4096)
    deriver = yield from wire.read_string(4096)
    nar_hash = yield from wire.read_string(256)
    refs = yield from wire.read_strings(item_limit=4096)
    registration_time = yield from wire.read_u64()
    nar_size = yield from wire.read_u64()
    ultimate = yield from wire.read_bool()
    sigs = yield from wire.read_strings(item_limit=4096)
    ca = yield from wire.read_string(4096)
    return _Claim(path, deriver, nar_hash, refs, registration_time, nar_size, ultimate, sigs, ca)


def parse_path(text: str) -> StorePath:
    """A store path the client named; :class:`OperationError` if it is none."""
    try:
        return StorePath.from_absolute_path(text)
    except NixCompatError as e:
        raise OperationError(f"path '{text}' is not in the Nix store ({e})") from None


def _parse_nar_hash(text: str, path: StorePath) -> bytes:
    """A NAR hash as Nix sends it: bare base16 (or any spelling with a prefix)."""
    try:
        if ":" in text or "-" in text:
            algo, digest = parse_hash(text)
            if algo is not HashAlgo.SHA256:
                raise OperationError(f"path '{path}': NAR hash must be sha256, not {algo}")
            return digest
        return decode_digest(text, HashAlgo.SHA256)
    except NixCompatError as e:
        raise OperationError(f"path '{path}': {e}") from None


def _nameless(name: str) -> StorePath:
    # A temporary store path for a NAR whose path is known only once it is hashed.
    return StorePath(bytes(20), name)


def _algo(text: str) -> HashAlgo:
    try:
        return HashAlgo.parse(text)
    except NixCompatError as e:
        raise OperationError(str(e)) from None


async def _hash_node(services: StoreServices, node: Node, algo: HashAlgo) -> bytes:
    h = hashlib.new(algo.value)
    async for piece in render_nar(services.blobs, services.directories, node):
        h.update(piece)
    return h.digest()


async def render_file(blobs: BlobService, node: FileNode) -> AsyncIterator[bytes]:
    """The contents of a stored file."""
    reader = await blobs.open_read(node.digest)
    if reader is None:
        raise OperationError(f"blob {node.digest.hex()} is missing from the store")
    async with reader:
        while data := await reader.read(_CHUNK):
            yield data


async def _flush_quietly(conn: Connection) -> None:
    with contextlib.suppress(WireError):
        await conn.flush()


class _Unsendable(WireError):
    """A failure after which nothing can be sent in step (e.g. in the middle of a NAR)."""


def _set(paths: list[str]) -> list[str]:
    return sorted(set(paths))


def _parse_derived(text: str) -> tuple[str, list[str] | None]:
    """``path`` → (path, None); ``drv!out1,out2`` / ``drv!*`` → (drv, names or ["*"])."""
    path, bang, outs = text.partition("!")
    if not bang:
        return path, None
    return path, outs.split(",")


# -- the operations --
# Each reads all its arguments first, then works; see the module docstring.


@_op(1, "IsValidPath")
async def _is_valid_path(s: Session, st: _Stats) -> None:
    text = await s.read_path_arg(st)
    s.ok(wire.enc_bool(await s.get_info(parse_path(text)) is not None))


@_op(3, "HasSubstitutes")
async def _has_substitutes(s: Session, st: _Stats) -> None:
    await s.read_path_arg(st)
    s.ok(wire.enc_bool(False))  # no substituters behind this store


@_op(4, "QueryPathHash")
async def _query_path_hash(s: Session, st: _Stats) -> None:
    info = await s.require_info(await s.read_path_arg(st))
    s.ok(wire.enc_string(info.nar_sha256.hex()))


@_op(5, "QueryReferences")
async def _query_references(s: Session, st: _Stats) -> None:
    info = await s.require_info(await s.read_path_arg(st))
    s.ok(wire.enc_strings(_set([r.absolute_path for r in info.references])))


@_op(6, "QueryReferrers")
async def _query_referrers(s: Session, st: _Stats) -> None:
    path = parse_path(await s.read_path_arg(st))
    # No reverse index: a scan of every PathInfo where the service can list
    # them; a service that cannot (a binary cache) has no referrers to tell.
    found: list[str] = []
    if s.services.path_infos.supports_list:
        async for info in s.services.path_infos.list():
            if path in info.references:
                found.append(info.store_path.absolute_path)
    s.ok(wire.enc_strings(_set(found)))


async def _read_ca_data(s: Session) -> tuple[str, str, list[str], FramedSource]:
    name = await s.read(wire.read_string(4096))
    method = await s.read(wire.read_string(256))
    refs = await s.read(wire.read_strings(item_limit=4096))
    await s.read(wire.read_bool())  # repair: nothing to repair in castore
    return name, method, refs, FramedSource(s.conn)


@_op(7, "AddToStore")
async def _add_to_store(s: Session, st: _Stats) -> None:
    if s.minor >= 25:
        name, method, refs, source = await _read_ca_data(s)
        st.detail = f"{name} ({method})"
        try:
            info = await s.add_ca(source, name, method, refs)
            await source.expect_end("the data")
        except WireError:
            raise
        except Exception:
            await source.drain()
            raise
        st.detail = info.store_path.absolute_path
        s.ok(s.enc_info(info, include_path=True))
        return
    # Before 1.25: name, "fixed" (obsolete), recursive, algorithm, then a NAR
    # sent raw on the connection (for flat files, the NAR of the one file).
    name = await s.read(wire.read_string(4096))
    fixed = await s.read(wire.read_bool())
    recursive = await s.read(wire.read_u64())
    algo = await s.read(wire.read_string(64))
    if not fixed:
        algo, recursive = "sha256", 1
    st.detail = name
    method = ("fixed:r:" if recursive else "fixed:") + algo
    try:
        if recursive:
            info = await s.add_ca(s.conn, name, method, [])
        else:
            info = await s.add_ca(_FlatFromNar(s.conn), name, method, [])
    except WireError:
        raise
    except Exception as e:
        # The rest of the raw NAR cannot be told from the next operation.
        raise _Unsendable(str(message_for(e) or e)) from e
    st.detail = info.store_path.absolute_path
    s.ok(wire.enc_string(info.store_path.absolute_path))


class _FlatFromNar:
    """The contents of the one regular file in a NAR read from ``source``."""

    def __init__(self, source: Source) -> None:
        self._events = read_nar_exactly(source)
        self._seen_file = False

    async def read(self, n: int) -> bytes:
        async for event in self._events:
            if isinstance(event, Regular):
                self._seen_file = True
            elif isinstance(event, Contents):
                return bytes(event.data)
        if not self._seen_file:
            raise OperationError("regular file expected")
        return b""

    def unread(self, data: bytes) -> None:
        raise NotImplementedError


@_op(8, "AddTextToStore")
async def _add_text_to_store(s: Session, st: _Stats) -> None:
    name = await s.read(wire.read_string(4096))
    text = await s.read(wire.read_bytes())
    refs = await s.read(wire.read_strings(item_limit=4096))
    st.detail = name
    info = await s.add_ca(_BytesSource(text), name, "text:sha256", refs)
    st.detail = info.store_path.absolute_path
    s.ok(wire.enc_string(info.store_path.absolute_path))


class _BytesSource:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def read(self, n: int) -> bytes:
        data, self._data = self._data[:n], self._data[n:]
        return data

    def unread(self, data: bytes) -> None:
        self._data = data + self._data


_NO_BUILDS = (
    "tvix-store nix-daemon does not build: {what} is refused; build elsewhere and "
    "'nix copy --to' the result"
)


async def _read_derived_paths(s: Session) -> list[str]:
    return await s.read(wire.read_strings(item_limit=8192))


async def _already_valid(s: Session, text: str) -> bool:
    """Whether the derived path ``text`` needs no build: it (or each output named) is valid."""
    path, outputs = _parse_derived(text)
    if outputs is None:
        return await s.get_info(parse_path(path)) is not None
    drv_outputs = await s.read_drv_outputs(path)
    names = list(drv_outputs) if outputs == ["*"] else outputs
    for name in names:
        out = drv_outputs.get(name, "")
        if not out or await s.get_info(parse_path(out)) is None:
            return False
    return True


# BuildResult::Status::AlreadyValid
_ALREADY_VALID = 2


@_op(9, "BuildPaths", refused=True)
async def _build_paths(s: Session, st: _Stats) -> None:
    paths = await _read_derived_paths(s)
    if s.minor >= 15:
        await s.read(wire.read_u64())
    st.detail = " ".join(paths[:3])
    # Paths that are all valid need no build ('nix copy --from' asks for that).
    for text in paths:
        if not await _already_valid(s, text):
            raise Refused(_NO_BUILDS.format(what=f"building '{text}'"))
    s.ok(wire.enc_u64(1))


@_op(46, "BuildPathsWithResults", refused=True)
async def _build_paths_with_results(s: Session, st: _Stats) -> None:
    paths = await _read_derived_paths(s)
    await s.read(wire.read_u64())
    st.detail = " ".join(paths[:3])
    results = [wire.enc_u64(len(paths))]
    for text in paths:
        if not await _already_valid(s, text):
            raise Refused(_NO_BUILDS.format(what=f"building '{text}'"))
        results.append(
            wire.enc_string(text)
            + wire.enc_u64(_ALREADY_VALID)
            + wire.enc_string("")  # error message
            + wire.enc_u64(0)  # times built
            + wire.enc_bool(False)  # non-deterministic
            + wire.enc_u64(0)  # start time
            + wire.enc_u64(0)  # stop time
            + wire.enc_u64(0)  # built outputs: no realisations are kept
        )
    s.ok(*results)


@_op(36, "BuildDerivation", refused=True)
async def _build_derivation(s: Session, st: _Stats) -> None:
    st.detail = await s.read(wire.read_string(4096))
    n = await s.read(wire.read_u64())
    if n > wire.MAX_LIST:
        raise WireError(f"derivation with {n} outputs")
    for _ in range(n):
        for _ in range(4):  # name, path, hash algorithm, hash
            await s.read(wire.read_string(4096))
    await s.read(wire.read_strings(item_limit=4096))  # input sources
    await s.read(wire.read_string(4096))  # platform
    await s.read(wire.read_string(4096))  # builder
    await s.read(wire.read_strings())  # args
    n = await s.read(wire.read_u64())
    if n > wire.MAX_LIST:
        raise WireError(f"derivation with {n} environment variables")
    for _ in range(2 * n):
        await s.read(wire.read_bytes())
    await s.read(wire.read_u64())  # build mode
    raise Refused(_NO_BUILDS.format(what=f"building '{st.detail}'"))


@_op(10, "EnsurePath")
async def _ensure_path(s: Session, st: _Stats) -> None:
    text = await s.read_path_arg(st)
    if await s.get_info(parse_path(text)) is None:
        raise OperationError(
            f"path '{text}' is not valid, and tvix-store nix-daemon neither substitutes nor builds"
        )
    s.ok(wire.enc_u64(1))


@_op(11, "AddTempRoot")
async def _add_temp_root(s: Session, st: _Stats) -> None:
    parse_path(await s.read_path_arg(st))
    s.ok(wire.enc_u64(1))  # every stored path is a GC root; uploads are kept for the grace period


@_op(12, "AddIndirectRoot")
async def _add_indirect_root(s: Session, st: _Stats) -> None:
    await s.read_path_arg(st)
    s.ok(wire.enc_u64(1))


@_op(13, "SyncWithGC")
async def _sync_with_gc(s: Session, st: _Stats) -> None:
    s.ok(wire.enc_u64(1))


@_op(14, "FindRoots")
async def _find_roots(s: Session, st: _Stats) -> None:
    s.ok(wire.enc_u64(0))  # tvix-store gc needs no sync: see tvix.store.gc


@_op(16, "ExportPath", refused=True)
async def _export_path(s: Session, st: _Stats) -> None:
    await s.read_path_arg(st)
    await s.read(wire.read_u64())
    raise Refused("ExportPath is obsolete (Nix < 2.0); use NarFromPath ('nix copy')")


@_op(18, "QueryDeriver")
async def _query_deriver(s: Session, st: _Stats) -> None:
    info = await s.require_info(await s.read_path_arg(st))
    s.ok(wire.enc_string(info.deriver.absolute_path if info.deriver else ""))


@_op(19, "SetOptions")
async def _set_options(s: Session, st: _Stats) -> None:
    values = [await s.read(wire.read_u64()) for _ in range(12)]
    overrides: dict[str, str] = {}
    if s.minor >= 12:
        n = await s.read(wire.read_u64())
        if n > wire.MAX_LIST:
            raise WireError(f"{n} options")
        for _ in range(n):
            key = await s.read(wire.read_string(4096))
            overrides[key] = await s.read(wire.read_string())
    s.options = {"verbosity": str(values[3]), **overrides}
    s.ok()


@_op(20, "CollectGarbage", refused=True)
async def _collect_garbage(s: Session, st: _Stats) -> None:
    await s.read(wire.read_u64())
    await s.read(wire.read_strings(item_limit=4096))
    for _ in range(5):
        await s.read(wire.read_u64())
    raise Refused("tvix-store nix-daemon does not collect garbage")


@_op(21, "QuerySubstitutablePathInfo")
async def _query_substitutable_path_info(s: Session, st: _Stats) -> None:
    await s.read_path_arg(st)
    s.ok(wire.enc_u64(0))


@_op(22, "QueryDerivationOutputs")
async def _query_derivation_outputs(s: Session, st: _Stats) -> None:
    outputs = await s.read_drv_outputs(await s.read_path_arg(st))
    s.ok(wire.enc_strings(_set([p for p in outputs.values() if p])))


@_op(23, "QueryAllValidPaths")
async def _query_all_valid_paths(s: Session, st: _Stats) -> None:
    if not s.services.path_infos.supports_list:
        raise Refused("this store's path info service cannot list its paths")
    paths = [info.store_path.absolute_path async for info in s.services.path_infos.list()]
    st.detail = f"{len(paths)} paths"
    s.ok(wire.enc_strings(_set(paths)))


@_op(26, "QueryPathInfo")
async def _query_path_info(s: Session, st: _Stats) -> None:
    text = await s.read_path_arg(st)
    info = await s.get_info(parse_path(text))
    if info is None:
        if s.minor < 17:
            raise OperationError(f"path '{text}' is not valid")
        s.ok(wire.enc_bool(False))
        return
    s.ok(wire.enc_bool(True) if s.minor >= 17 else b"", s.enc_info(info, include_path=False))


@_op(27, "ImportPaths", refused=True)
async def _import_paths(s: Session, st: _Stats) -> None:
    raise Refused("ImportPaths is obsolete (Nix < 2.0); use 'nix copy --to'")


@_op(28, "QueryDerivationOutputNames")
async def _query_derivation_output_names(s: Session, st: _Stats) -> None:
    outputs = await s.read_drv_outputs(await s.read_path_arg(st))
    s.ok(wire.enc_strings(sorted(outputs)))


@_op(29, "QueryPathFromHashPart")
async def _query_path_from_hash_part(s: Session, st: _Stats) -> None:
    hash_part = await s.read(wire.read_string(4096))
    st.detail = hash_part
    try:
        digest = nixbase32.decode(hash_part)
    except NixCompatError:
        digest = b""
    info = await s.services.path_infos.get(digest) if len(digest) == 20 else None
    s.ok(wire.enc_string(info.store_path.absolute_path if info else ""))


@_op(30, "QuerySubstitutablePathInfos")
async def _query_substitutable_path_infos(s: Session, st: _Stats) -> None:
    if s.minor < 22:
        await s.read(wire.read_strings(item_limit=4096))
    else:
        n = await s.read(wire.read_u64())
        if n > wire.MAX_LIST:
            raise WireError(f"{n} paths")
        for _ in range(2 * n):
            await s.read(wire.read_string(4096))
    s.ok(wire.enc_u64(0))


@_op(31, "QueryValidPaths")
async def _query_valid_paths(s: Session, st: _Stats) -> None:
    paths = await s.read(wire.read_strings(item_limit=4096))
    if s.minor >= 27:
        await s.read(wire.read_bool())  # substitute: there is nothing to substitute from
    valid = [p for p in paths if await s.get_info(parse_path(p)) is not None]
    st.detail = f"{len(valid)} of {len(paths)} valid"
    s.ok(wire.enc_strings(_set(valid)))


@_op(32, "QuerySubstitutablePaths")
async def _query_substitutable_paths(s: Session, st: _Stats) -> None:
    await s.read(wire.read_strings(item_limit=4096))
    s.ok(wire.enc_strings([]))


@_op(33, "QueryValidDerivers")
async def _query_valid_derivers(s: Session, st: _Stats) -> None:
    info = await s.require_info(await s.read_path_arg(st))
    derivers = []
    if info.deriver is not None and await s.get_info(info.deriver) is not None:
        derivers.append(info.deriver.absolute_path)
    s.ok(wire.enc_strings(derivers))


@_op(34, "OptimiseStore")
async def _optimise_store(s: Session, st: _Stats) -> None:
    s.ok(wire.enc_u64(1))  # castore stores each file once already


@_op(35, "VerifyStore", refused=True)
async def _verify_store(s: Session, st: _Stats) -> None:
    await s.read(wire.read_bool())
    await s.read(wire.read_bool())
    raise Refused("use 'tvix-store verify' to verify the whole store")


@_op(37, "AddSignatures")
async def _add_signatures(s: Session, st: _Stats) -> None:
    text = await s.read_path_arg(st)
    sigs = await s.read(wire.read_strings(item_limit=4096))
    if not s.trusted:
        raise NotTrusted("you are not privileged to add signatures")
    info = await s.require_info(text)
    await s.services.path_infos.put(info.with_signatures(Signature.parse(x) for x in sigs))
    s.ok(wire.enc_u64(1))


@_op(38, "NarFromPath")
async def _nar_from_path(s: Session, st: _Stats) -> None:
    info = await s.require_info(await s.read_path_arg(st))
    s.ok()
    sent = 0
    try:
        async for piece in render_nar(s.services.blobs, s.services.directories, info.node):
            sent += len(piece)
            s.conn.write(piece)
            await s.conn.flush()
    except WireError:
        raise
    except Exception as e:
        # The client is reading a NAR now; an error can no longer be told apart.
        raise _Unsendable(f"NAR of {info.store_path} failed after {sent} bytes: {e}") from e
    st.detail = f"{info.store_path} ({sent} bytes)"


@_op(39, "AddToStoreNar")
async def _add_to_store_nar(s: Session, st: _Stats) -> None:
    claim = await s.read(_read_claim())
    await s.read(wire.read_bool())  # repair
    dont_check_sigs = await s.read(wire.read_bool())
    st.detail = claim.path
    source = s.data_source()
    try:
        await s.add_nar(source, claim, dont_check_sigs)
        if isinstance(source, FramedSource):
            await source.expect_end("the NAR")
    except WireError:
        raise
    except Exception:
        if isinstance(source, FramedSource):
            await source.drain()
            raise
        raise
    s.ok()


@_op(44, "AddMultipleToStore")
async def _add_multiple_to_store(s: Session, st: _Stats) -> None:
    await s.read(wire.read_bool())  # repair
    dont_check_sigs = await s.read(wire.read_bool())
    source = FramedSource(s.conn)
    added = 0
    try:
        count = await _decode_from(source, wire.read_u64())
        for _ in range(count):
            claim = await _decode_from(source, _read_claim())
            await s.add_nar(source, claim, dont_check_sigs)
            added += 1
        await source.expect_end("the last NAR")
    except WireError:
        raise
    except Exception:
        await source.drain()
        raise
    finally:
        st.detail = f"{added} paths"
    s.ok()


async def _decode_from(source: Source, decoder: wire.Decoder[wire.T]) -> wire.T:
    """Run a decoder over bytes of a source (the protocol inside a framed stream)."""
    try:
        need = next(decoder)
        while True:
            data = b""
            while len(data) < need:
                more = await source.read(need - len(data))
                if not more:
                    raise WireError("framed data ended in the middle of a message")
                data += more
            need = decoder.send(data)
    except StopIteration as stop:
        value: wire.T = stop.value
        return value


@_op(40, "QueryMissing")
async def _query_missing(s: Session, st: _Stats) -> None:
    targets = await _read_derived_paths(s)
    st.detail = f"{len(targets)} targets"
    will_build: list[str] = []
    unknown: list[str] = []
    for text in targets:
        path, outputs = _parse_derived(text)
        if outputs is None:
            if await s.get_info(parse_path(path)) is None:
                unknown.append(path)
            continue
        if await s.get_info(parse_path(path)) is None:
            unknown.append(path)
            continue
        drv_outputs = await s.read_drv_outputs(path)
        names = drv_outputs if outputs == ["*"] else outputs
        for name in names:
            out = drv_outputs.get(name, "")
            if not out or await s.get_info(parse_path(out)) is None:
                will_build.append(path)
                break
    s.ok(
        wire.enc_strings(_set(will_build)),
        wire.enc_strings([]),  # nothing to substitute
        wire.enc_strings(_set(unknown)),
        wire.enc_u64(0),
        wire.enc_u64(0),
    )


@_op(41, "QueryDerivationOutputMap")
async def _query_derivation_output_map(s: Session, st: _Stats) -> None:
    outputs = await s.read_drv_outputs(await s.read_path_arg(st))
    parts = [wire.enc_u64(len(outputs))]
    for name in sorted(outputs):
        parts.append(wire.enc_string(name) + wire.enc_string(outputs[name]))
    s.ok(*parts)


@_op(42, "RegisterDrvOutput", refused=True)
async def _register_drv_output(s: Session, st: _Stats) -> None:
    await s.read(wire.read_string())
    if s.minor < 31:
        await s.read(wire.read_string())
    raise Refused("tvix-store nix-daemon keeps no realisations (content-addressed derivations)")


@_op(43, "QueryRealisation")
async def _query_realisation(s: Session, st: _Stats) -> None:
    st.detail = await s.read(wire.read_string(4096))
    s.ok(wire.enc_strings([]))  # no realisations are kept


@_op(45, "AddBuildLog", refused=True)
async def _add_build_log(s: Session, st: _Stats) -> None:
    await s.read_path_arg(st)
    await FramedSource(s.conn).drain()
    raise Refused("tvix-store nix-daemon keeps no build logs")


assert STORE_DIR == "/nix/store"
