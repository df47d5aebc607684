"""The asyncio unix-socket server: one task per client, each a :class:`~.handler.Session`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import stat
import struct

from tvix.nix_daemon import wire
from tvix.nix_daemon.errors import WireError
from tvix.nix_daemon.handler import Session, StoreServices, handshake
from tvix.nix_daemon.policy import Peer, TrustPolicy
from tvix.nix_daemon.stream import Connection, Disconnected

__all__ = ["NixDaemonServer"]

log = logging.getLogger("tvix.nix_daemon")

_PEERCRED = struct.Struct("3i")
# Socket buffer for NARs on their way in and out.
_STREAM_LIMIT = 1 << 20
# Pipe capacity asked for in --stdio mode (Linux allows up to /proc/sys/fs/pipe-max-size).
_PIPE_SIZE = 1 << 20


class NixDaemonServer:
    """Serves the worker protocol on a unix socket at ``path``.

    :meth:`start` binds (replacing a stale socket file, never another kind
    of file), :meth:`stop` stops accepting, cancels the clients' operations
    (an upload in flight is then discarded, never half-stored) and removes
    the socket.
    """

    def __init__(
        self,
        services: StoreServices,
        path: str,
        policy: TrustPolicy,
        *,
        mode: int = 0o666,
    ) -> None:
        self.services = services
        self.path = path
        self.policy = policy
        self.mode = mode
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self._next_id = 0

    async def start(self) -> None:
        """Listen on the socket."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise FileExistsError(f"{self.path} exists and is not a socket")
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=_STREAM_LIMIT)
        os.chmod(self.path, self.mode)

    async def stop(self) -> None:
        """Stop accepting, cancel every client, remove the socket."""
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.gather(*self._clients, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @property
    def clients(self) -> int:
        """Clients connected now."""
        return len(self._clients)

    async def serve_stdio(self) -> None:
        """Serve one client on standard input and output, as ``nix-daemon --stdio`` does.

        That is how ``ssh-ng://HOST`` stores reach a daemon: ssh runs the
        remote program with ``--stdio``. The client is whoever started this
        process (its user decides the trust).
        """
        loop = asyncio.get_running_loop()
        for fd in (0, 1):
            # A NAR on its way out can run ahead of the client by the pipe's
            # capacity only; the default 64 KiB keeps both sides waiting in turn.
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
        reader = asyncio.StreamReader(limit=_STREAM_LIMIT)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0)
        )
        transport, protocol = await loop.connect_write_pipe(
            _FlowControl, os.fdopen(1, "wb", buffering=0)
        )
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._serve(reader, writer, Peer(os.getpid(), os.getuid(), os.getgid()))

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer | None = None,
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        self._next_id += 1
        if peer is None:
            peer = _peer_of(writer)
        trusted = self.policy.is_trusted(peer)
        name = f"#{self._next_id} ({peer.describe()}{', trusted' if trusted else ''})"
        conn = Connection(reader, writer)
        ops = 0
        try:
            version = await handshake(conn, trusted)
            log.info("%s: connected, protocol 1.%d", name, version & 0xFF)
            session = Session(conn, self.services, version, trusted, self.policy, name)
            while not await conn.at_eof():
                code = await conn.decode(wire.read_u64())
                ops += 1
                await session.handle(code)
        except Disconnected as e:
            log.info("%s: %s", name, e)
        except WireError as e:
            log.warning("%s: closing the connection: %s", name, e)
        except asyncio.CancelledError:
            log.info("%s: cancelled (daemon stopping)", name)
        except Exception:
            log.exception("%s: failed", name)
        finally:
            self._clients.discard(task)
            log.info(
                "%s: closed after %d operations (%d bytes in, %d out)",
                name,
                ops,
                conn.received,
                conn.sent,
            )
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class _FlowControl(asyncio.streams.FlowControlMixin, asyncio.Protocol):
    """Back-pressure for a StreamWriter over a pipe (what start_unix_server gives sockets)."""


def _peer_of(writer: asyncio.StreamWriter) -> Peer:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return Peer()
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except OSError:
        return Peer()
    pid, uid, gid = _PEERCRED.unpack(raw)
    return Peer(pid, uid, gid)
