"""gRPC for the castore layer: servicers, server building, and the error mapping.

The clients are backends like any other and live with them:
:class:`tvix.castore.blobservice.grpc.GRPCBlobService` and
:class:`tvix.castore.directoryservice.grpc.GRPCDirectoryService` (and the
store layer's PathInfo client), all built on :class:`GRPCClient`.

Serving the castore services over a unix socket::

    servicers = castore_servicers(blob_service, directory_service)
    await serve("unix:///run/tvix.sock", servicers)
"""

from __future__ import annotations

from tvix.castore.grpc._client import GRPCClient, StreamingPut
from tvix.castore.grpc.blobservice_wrapper import READ_MESSAGE_SIZE, GRPCBlobServiceWrapper
from tvix.castore.grpc.directoryservice_wrapper import GRPCDirectoryServiceWrapper
from tvix.castore.grpc.server import (
    GRPCServer,
    Servicer,
    build_server,
    castore_servicers,
    parse_listen_address,
    serve,
)

__all__ = [
    "READ_MESSAGE_SIZE",
    "GRPCBlobServiceWrapper",
    "GRPCClient",
    "GRPCDirectoryServiceWrapper",
    "GRPCServer",
    "Servicer",
    "StreamingPut",
    "build_server",
    "castore_servicers",
    "parse_listen_address",
    "serve",
]
