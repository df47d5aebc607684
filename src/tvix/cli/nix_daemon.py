"""``tvix-store nix-daemon``: serve the store to Nix over its daemon worker protocol."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from tvix.cli.common import CLIError, add_service_args, open_services
from tvix.nix_daemon import OPERATIONS, NixDaemonServer, StoreServices, TrustPolicy
from tvix.nixcompat import InvalidKeyError, parse_public_keys

__all__ = ["add_nix_daemon_command", "cmd_nix_daemon"]

log = logging.getLogger("tvix.nix_daemon")


def add_nix_daemon_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``nix-daemon`` with the subcommands."""
    refused = sorted(op.name for op in OPERATIONS.values() if op.refused)
    p = sub.add_parser(
        "nix-daemon",
        help="serve the store to Nix clients over a unix socket (nix --store unix://…)",
        description="Speak Nix's daemon worker protocol on a unix socket, so that nix, "
        "nix-store and nix copy use the store directly (--store unix:///PATH): queries, "
        "NARs rendered from castore, and verified uploads. Refused: "
        + ", ".join(refused)
        + ". Runs in the foreground; stops on SIGINT/SIGTERM.",
    )
    add_service_args(p)
    p.add_argument(
        "-l",
        "--listen-address",
        default=os.environ.get("TVIX_NIX_DAEMON_LISTEN_ADDRESS"),
        metavar="unix:///PATH",
        help="the socket to listen on (env TVIX_NIX_DAEMON_LISTEN_ADDRESS; required)",
    )
    p.add_argument(
        "--stdio",
        action="store_true",
        help="serve one client on stdin/stdout instead of a socket, as nix-daemon --stdio "
        "(what ssh-ng://HOST?remote-program=… runs on the remote host)",
    )
    p.add_argument(
        "--trusted",
        action="append",
        default=None,
        metavar="USERS",
        help="trusted users, as Nix's trusted-users: names, uids, @group, '*' (repeatable, "
        "comma-separated; env TVIX_NIX_DAEMON_TRUSTED; default: root and the user running "
        "the daemon). Everyone who can open the socket may read and add content-addressed "
        "paths; input-addressed paths need a signature by --trusted-public-keys, unless a "
        "trusted client sends them with --no-check-sigs; only trusted clients add signatures.",
    )
    p.add_argument(
        "--trusted-public-keys",
        default=os.environ.get("TVIX_NIX_DAEMON_TRUSTED_PUBLIC_KEYS", ""),
        metavar="KEYS",
        help="space-separated name:base64 public keys whose signatures make an "
        "input-addressed path acceptable (env TVIX_NIX_DAEMON_TRUSTED_PUBLIC_KEYS)",
    )
    p.add_argument(
        "--socket-mode",
        default="0666",
        metavar="OCTAL",
        help="permissions of the socket file (default 0666: every local user may connect)",
    )
    p.set_defaults(func=cmd_nix_daemon)


def _policy(args: argparse.Namespace) -> TrustPolicy:
    entries = args.trusted
    if entries is None:
        env = os.environ.get("TVIX_NIX_DAEMON_TRUSTED")
        entries = [env] if env is not None else list(TrustPolicy.default_trusted())
    try:
        keys = parse_public_keys(args.trusted_public_keys)
    except InvalidKeyError as e:
        raise CLIError(f"--trusted-public-keys: {e}") from None
    return TrustPolicy.parse(entries, keys.values())


def _socket_path(address: str | None) -> str:
    if not address:
        raise CLIError(
            "--listen-address unix:///PATH (or TVIX_NIX_DAEMON_LISTEN_ADDRESS) is needed"
        )
    if not address.startswith("unix://"):
        raise CLIError(f"--listen-address {address!r}: only unix:///PATH is supported")
    path = address.removeprefix("unix://")
    if not path.startswith("/"):
        raise CLIError(f"--listen-address {address!r}: the socket path must be absolute")
    return path


async def cmd_nix_daemon(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM (or, with ``--stdio``, until the client hangs up)."""
    policy = _policy(args)
    if args.stdio:
        async with open_services(args) as s:
            server = NixDaemonServer(
                StoreServices(s.blobs, s.directories, s.path_infos), "", policy
            )
            await server.serve_stdio()
        return 0
    path = _socket_path(args.listen_address)
    try:
        mode = int(args.socket_mode, 8)
    except ValueError:
        raise CLIError(f"--socket-mode {args.socket_mode!r} is no octal number") from None
    async with open_services(args) as s:
        server = NixDaemonServer(
            StoreServices(s.blobs, s.directories, s.path_infos), path, policy, mode=mode
        )
        try:
            await server.start()
        except FileExistsError as e:
            raise CLIError(str(e)) from None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(f"tvix-store nix-daemon: listening on unix://{path}", file=sys.stderr, flush=True)
        log.info("trusted users: %s", " ".join(policy.trusted) or "(none)")
        try:
            await stop.wait()
        finally:
            log.info("stopping; %d clients connected", server.clients)
            await server.stop()
    return 0
