"""``tvix-store mount``: the store as a read-only FUSE filesystem."""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

from tvix.cli.common import CLIError, add_service_args, open_services
from tvix.fs import FsOptions
from tvix.fs.mount import MountError, MountOptions, mount

__all__ = ["add_fs_options", "add_mount_command", "cmd_mount", "collect_less", "fs_options"]

PROG = "tvix-store"


def collect_less() -> None:
    """Tune Python's cycle collector for serving a filesystem (a process-wide setting).

    A walk allocates a few objects per entry (nodes, inodes) and keeps most of
    them, while the collector, by default, scans the young objects every 700
    allocations: a quarter of a first ``find``'s CPU time went there. Here it
    runs every 50,000, and the objects of start-up (modules, services) are set
    aside for good (``gc.freeze``). Reference cycles are still collected, later.
    """
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)


async def cmd_mount(args: argparse.Namespace) -> int:
    """Mount, serve in the foreground until SIGINT/SIGTERM or an outside unmount."""
    options = MountOptions(
        fs=fs_options(args),
        allow_other=args.allow_other,
        workers=args.workers,
    )

    def mounted(path: str) -> None:
        # Scripts and tests wait for this line before using the mount.
        print(f"{PROG}: mounted at {path}", file=sys.stderr, flush=True)

    async with open_services(args) as s:
        collect_less()
        try:
            await mount(
                s.blobs, s.directories, s.path_infos, args.mountpoint, options, on_mounted=mounted
            )
        except MountError as e:
            raise CLIError(str(e)) from None
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def add_fs_options(p: argparse.ArgumentParser) -> None:
    """The filesystem's options, shared by ``mount`` and ``virtiofs`` (see :func:`fs_options`)."""
    p.add_argument(
        "--list-root",
        action="store_true",
        help="list every store path when the root is read (the path info service must be "
        "able to list); without it, reading the root fails with EPERM, while looking up "
        "store paths in it works",
    )
    p.add_argument(
        "--show-xattr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="expose the blake3 digests as extended attributes (default: on)",
    )
    p.add_argument(
        "--request-timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="a request waiting longer on the store fails with EIO (default: 60)",
    )


def fs_options(args: argparse.Namespace) -> FsOptions:
    """The :class:`FsOptions` the options of :func:`add_fs_options` give."""
    return FsOptions(
        list_root=args.list_root,
        show_xattr=args.show_xattr,
        request_timeout=args.request_timeout,
    )


def add_mount_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mount`` to the ``tvix-store`` subcommands ``sub``."""
    p = sub.add_parser(
        "mount",
        help="mount the store as a read-only FUSE filesystem",
        description="Mount the store at MOUNTPOINT as a read-only filesystem holding every "
        "store path by base name (<hash>-<name>), fetching directories and file contents "
        "from the services only when they are read. Runs in the foreground and unmounts on "
        "SIGINT or SIGTERM. Files and directories carry their blake3 digests as extended "
        "attributes (user.tvix.castore.blob.digest, user.tvix.castore.directory.digest).",
    )
    add_service_args(p)
    p.set_defaults(func=cmd_mount)
    p.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    add_fs_options(p)
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users access the mount (non-root: needs user_allow_other in "
        "/etc/fuse.conf)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=64,
        metavar="N",
        help="requests served concurrently at most (default: 64)",
    )
