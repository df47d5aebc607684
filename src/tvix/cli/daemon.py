"""``tvix-store daemon``: serve the store over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tvix.cli.common import open_services

__all__ = ["add_arguments", "cmd_daemon"]

log = logging.getLogger("tvix.daemon")

DEFAULT_LISTEN = "[::1]:8000"
# Seconds calls in flight get to finish at shutdown; then they are cancelled
# (an unfinished upload is discarded, never half-stored).
GRACE = 10.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The daemon's own options."""
    p.add_argument(
        "-l",
        "--listen-address",
        default=os.environ.get("TVIX_STORE_LISTEN_ADDRESS", DEFAULT_LISTEN),
        metavar="ADDR",
        help="host:port, [ipv6]:port or unix:///path.sock to listen on "
        f"(env TVIX_STORE_LISTEN_ADDRESS; default {DEFAULT_LISTEN}: loopback only, the "
        "protocol has no authentication)",
    )


async def cmd_daemon(args: argparse.Namespace) -> int:
    # Imported here, so that other commands do not pay for importing gRPC.
    from tvix.castore.grpc.server import build_server, castore_servicers
    from tvix.store.grpc import GRPCPathInfoServiceWrapper

    async with open_services(args, local=True) as s:
        servicers = [
            *castore_servicers(s.blobs, s.directories),
            GRPCPathInfoServiceWrapper(s.path_infos, s.blobs, s.directories),
        ]
        server = build_server(args.listen_address, servicers)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"tvix-store: listening on {server.url}", file=sys.stderr, flush=True)
        log.info("serving %s on %s", ", ".join(server.service_names), server.address)
        await stop.wait()
        log.info("shutting down; calls in flight get %.0f s", GRACE)
        await server.stop(GRACE)
    return 0
