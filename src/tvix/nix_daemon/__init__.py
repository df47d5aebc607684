"""``tvix-store nix-daemon``: the store behind Nix's daemon worker protocol.

Nix's clients (``nix``, ``nix-store``, ``nix copy``) talk to a store daemon
through a unix socket (``--store unix:///path``). This package speaks that
protocol over the store services: queries, NARs rendered from castore,
verified uploads; builds and garbage collection are refused.

- :mod:`tvix.nix_daemon.wire`: the wire format without I/O (integers,
  strings, lists, frames, stderr messages);
- :mod:`tvix.nix_daemon.stream`: a connection's byte streams;
- :mod:`tvix.nix_daemon.handler`: handshake and operations;
- :mod:`tvix.nix_daemon.server`: the asyncio unix-socket server;
- :mod:`tvix.nix_daemon.policy`: who is trusted to add what.

Builds on :mod:`tvix.store`, :mod:`tvix.castore` and :mod:`tvix.nixcompat`.
"""

from tvix.nix_daemon.errors import (
    NixDaemonError,
    NotTrusted,
    OperationError,
    Refused,
    WireError,
)
from tvix.nix_daemon.handler import MIN_CLIENT_VERSION, OPERATIONS, Session, StoreServices
from tvix.nix_daemon.policy import Peer, TrustPolicy
from tvix.nix_daemon.server import NixDaemonServer
from tvix.nix_daemon.wire import PROTOCOL_VERSION

__all__ = [
    "MIN_CLIENT_VERSION",
    "OPERATIONS",
    "PROTOCOL_VERSION",
    "NixDaemonError",
    "NixDaemonServer",
    "NotTrusted",
    "OperationError",
    "Peer",
    "Refused",
    "Session",
    "StoreServices",
    "TrustPolicy",
    "WireError",
]
