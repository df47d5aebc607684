"""``tvix-store daemon``: serve the store over gRPC."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

from tvix.castore.errors import ValidationError
from tvix.castore.grpc.server import ServerTLS, build_server, castore_servicers
from tvix.cli.common import CLIError, Services, UsageError, open_services
from tvix.cli.gc import data_dir_of, describe, parse_duration, run_gc
from tvix.store.gc import DEFAULT_GRACE, GCBusyError
from tvix.store.grpc import GRPCPathInfoServiceWrapper

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
        "protocol has no authentication unless --tls-client-ca is given)",
    )
    p.add_argument(
        "--metrics-listen-address",
        default=os.environ.get("TVIX_STORE_METRICS_LISTEN_ADDRESS"),
        metavar="ADDR",
        help="serve Prometheus metrics (gRPC calls by method and status, latency) over HTTP "
        "at http://ADDR/metrics, e.g. [::1]:9464 (env TVIX_STORE_METRICS_LISTEN_ADDRESS; "
        "default: off)",
    )
    tls = p.add_argument_group("TLS (clients then use grpc+https://HOST:PORT)")
    tls.add_argument(
        "--tls-cert",
        default=os.environ.get("TVIX_STORE_TLS_CERT"),
        metavar="FILE",
        help="serve TLS with this PEM certificate chain (env TVIX_STORE_TLS_CERT; needs --tls-key)",
    )
    tls.add_argument(
        "--tls-key",
        default=os.environ.get("TVIX_STORE_TLS_KEY"),
        metavar="FILE",
        help="the PEM private key of --tls-cert (env TVIX_STORE_TLS_KEY)",
    )
    tls.add_argument(
        "--tls-client-ca",
        default=os.environ.get("TVIX_STORE_TLS_CLIENT_CA"),
        metavar="FILE",
        help="require client certificates signed by this PEM CA (mutual TLS; "
        "env TVIX_STORE_TLS_CLIENT_CA)",
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
        help="the periodic GC keeps objects written or found present this recently (default 1h, "
        "at least 2m; 0 only when nothing else writes to the store)",
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


def server_tls(args: argparse.Namespace) -> ServerTLS | None:
    """The TLS settings the options give; :class:`CLIError` for an incomplete set."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    try:
        return ServerTLS.from_files(args.tls_cert, args.tls_key, args.tls_client_ca)
    except ValidationError as e:
        raise CLIError(str(e)) from None


def _metrics(address: str | None) -> tuple[list[Any], Any]:
    """The metrics interceptor and its HTTP server for ``--metrics-listen-address``, if given."""
    if address is None:
        return [], None
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server

        from tvix.castore.grpc.metrics import CallMetrics
    except ImportError:
        raise CLIError(
            "--metrics-listen-address needs prometheus-client (pip install 'tvix-store[http]')"
        ) from None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--metrics-listen-address {address!r}: expected HOST:PORT")
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    interceptor = CallMetrics(registry)
    try:
        server, _thread = start_http_server(int(port), host.strip("[]"), registry)
    except OSError as e:
        raise CLIError(f"--metrics-listen-address {address}: {e.strerror or e}") from None
    bound_host, bound_port = str(server.server_address[0]), server.server_address[1]
    url = (
        f"http://[{bound_host}]:{bound_port}"
        if ":" in bound_host
        else f"http://{bound_host}:{bound_port}"
    )
    print(f"tvix-store: metrics on {url}/metrics", file=sys.stderr, flush=True)
    return [interceptor], server


async def cmd_daemon(args: argparse.Namespace) -> int:
    """``tvix-store daemon``: serve the store over gRPC until SIGINT or SIGTERM."""
    tls = server_tls(args)
    async with open_services(args) as s:
        servicers = [
            *castore_servicers(s.blobs, s.directories),
            GRPCPathInfoServiceWrapper(s.path_infos, s.blobs, s.directories),
        ]
        interceptors, metrics_server = _metrics(args.metrics_listen_address)
        server = build_server(args.listen_address, servicers, tls=tls, interceptors=interceptors)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"tvix-store: listening on {server.url} (serving {s.where}"
            + (", client certificates required)" if args.tls_client_ca else ")"),
            file=sys.stderr,
            flush=True,
        )
        log.info("services: %s", ", ".join(server.service_names))
        gc = None
        if args.gc_interval is not None:
            gc = asyncio.ensure_future(_collect_every(args, s))
        await stop.wait()
        if gc is not None:
            gc.cancel()
            await asyncio.gather(gc, return_exceptions=True)
        log.info("shutting down; calls in flight get %.0f s", GRACE)
        await server.stop(GRACE)
        if metrics_server is not None:
            metrics_server.shutdown()
    print("tvix-store: stopped", file=sys.stderr, flush=True)
    return 0
