"""``tvix-store virtiofs``: the store served to VMs as a vhost-user-fs backend."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading

from tvix.cli.common import CLIError, add_service_args, open_services
from tvix.cli.mount import add_fs_options, collect_less, fs_options
from tvix.fs.core import StoreFs
from tvix.fs.virtiofs import VirtiofsError, serve_virtiofs

__all__ = ["add_virtiofs_command", "cmd_virtiofs"]

PROG = "tvix-store"


async def cmd_virtiofs(args: argparse.Namespace) -> int:
    """Listen at SOCKET and serve one VM after another until SIGINT/SIGTERM."""
    options = fs_options(args)

    def listening(path: str) -> None:
        # Scripts and tests wait for this line before starting the VM.
        print(f"{PROG}: listening at {path}", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
            signals.append(sig)
    try:
        async with open_services(args) as s:
            if options.list_root and not s.path_infos.supports_list:
                raise CLIError(
                    f"cannot list the root: {type(s.path_infos).__name__} cannot list its "
                    "store paths"
                )
            collect_less()
            try:
                await serve_virtiofs(
                    str(args.socket),
                    lambda: StoreFs(s.blobs, s.directories, s.path_infos, options),
                    stop=stop,
                    on_listening=listening,
                )
            except VirtiofsError as e:
                raise CLIError(str(e)) from None
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def add_virtiofs_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``virtiofs`` to the ``tvix-store`` subcommands ``sub``."""
    p = sub.add_parser(
        "virtiofs",
        help="serve the store to VMs as a vhost-user-fs (virtio-fs) backend",
        description="Listen on the Unix socket SOCKET for a vhost-user-fs frontend (QEMU's "
        "vhost-user-fs-pci device) and serve the store to its guest as a read-only "
        "filesystem holding every store path by base name, fetched from the services only "
        "when read (in the guest: mount -t virtiofs TAG /nix/store -o ro). The guest's RAM "
        "must be shared memory (QEMU: -object memory-backend-memfd,share=on). Serves one "
        "VM after another in the foreground until SIGINT or SIGTERM; the socket is removed "
        "then.",
    )
    add_service_args(p)
    p.set_defaults(func=cmd_virtiofs)
    p.add_argument("socket", metavar="SOCKET", help="the Unix socket path to listen on")
    add_fs_options(p)
