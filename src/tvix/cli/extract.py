"""``tvix-store extract``: write store paths out to disk, optionally trusting only signed ones.

The trust options and :func:`trusted_services` are defined in
:mod:`tvix.cli.common`, for every command that reads PathInfos from sources
it does not control.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tvix.cli.common import (
    CLIError,
    Progress,
    add_service_args,
    add_trust_args,
    open_services,
    run,
    setup_logging,
    trusted_services,
)
from tvix.store.extract import extract_node, extract_store_paths, path_info_closure
from tvix.store.resolve import parse_path, resolve

__all__ = ["add_arguments", "add_trust_arguments", "cmd_extract", "trusted_services"]

log = logging.getLogger("tvix.extract")


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """``--trusted-public-keys`` and ``--verify-nar``: :func:`~tvix.cli.common.add_trust_args`."""
    add_trust_args(p, verify_nar=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``extract``."""
    p.add_argument("path", metavar="STOREPATH[/SUB/PATH]")
    p.add_argument("dest", type=Path, metavar="DEST", help="where to write it; must not exist")
    p.add_argument(
        "--closure",
        action="store_true",
        help="extract STOREPATH and everything it refers to, recursively, each into "
        "DEST/<hash>-<name> (as a /nix/store would hold them); prints the store paths",
    )
    add_trust_arguments(p)


async def cmd_extract(args: argparse.Namespace) -> int:
    """``tvix-store extract``: write a store path's tree (or closure) to DEST."""
    async with open_services(args) as opened:
        s = trusted_services(args, opened)
        progress = Progress(f"extracting {args.path}")
        try:
            if args.closure:
                store_path, sub = parse_path(args.path)
                if sub:
                    raise CLIError("--closure takes a store path, not a path inside one")
                infos = await path_info_closure(s.path_infos, [store_path])
                stats = await extract_store_paths(
                    s.blobs, s.directories, infos, args.dest, progress=progress
                )
            else:
                info, node = await resolve(s.path_infos, s.directories, args.path)
                # The whole store path: its tree must have the NAR its PathInfo claims.
                claim = info if node is info.node else None
                stats = await extract_node(
                    s.blobs, s.directories, node, args.dest, progress=progress, claim=claim
                )
        finally:
            progress.done()
    if args.closure:
        for info in sorted(infos, key=lambda i: i.store_path.absolute_path):
            print(info.store_path.absolute_path)
    log.info(
        "extracted %s: %d directories, %d files (%d bytes), %d symlinks",
        args.path,
        stats.directories,
        stats.files,
        stats.nbytes,
        stats.symlinks,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tvix.cli.extract``: the command on its own, as ``tvix-store extract``."""
    p = argparse.ArgumentParser(
        prog="tvix-store extract", description="Write a store path's tree to DEST."
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv: debug)")
    add_service_args(p)
    add_arguments(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    return run("tvix-store", lambda: cmd_extract(args))


if __name__ == "__main__":
    sys.exit(main())
