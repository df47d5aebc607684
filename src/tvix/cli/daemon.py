"""``tvix-store daemon``: serve the store over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tvix.cli.common import Services, open_services
from tvix.cli.gc import data_dir_of, describe, parse_duration, run_gc
from tvix.store.gc import DEFAULT_GRACE, GCBusyError

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
    p.add_argument(
        "--gc-interval",
        type=parse_duration,
        metavar="DURATION",
        help="collect garbage every DURATION (e.g. 6h), as `tvix-store gc` does; a run is "
        "skipped while another GC of the store runs",
    )
    p.add_argument(
        "--gc-grace",
        type=parse_duration,
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="the periodic GC keeps objects written or found present this recently (default 1h)",
    )


async def _collect_every(args: argparse.Namespace, s: Services) -> None:
    """The periodic GC (``--gc-interval``): in this process, beside the calls it serves."""
    data_dir = data_dir_of(args)
    while True:
        await asyncio.sleep(args.gc_interval)
        try:
            report = await run_gc(s, data_dir, grace=args.gc_grace)
        except GCBusyError as e:
            log.info("gc skipped: %s", e)
            continue
        except Exception:
            log.exception("gc failed; trying again in %.0f s", args.gc_interval)
            continue
        for line in describe(report):
            log.info("gc: %s", line)


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
        gc = None
        if args.gc_interval is not None:
            gc = asyncio.ensure_future(_collect_every(args, s))
        await stop.wait()
        if gc is not None:
            gc.cancel()
            await asyncio.gather(gc, return_exceptions=True)
        log.info("shutting down; calls in flight get %.0f s", GRACE)
        await server.stop(GRACE)
    return 0
