"""``tvix-store extract``: write store paths out to disk, optionally trusting only signed ones.

:func:`add_trust_arguments` and :func:`trusted_services` are meant for every
command that reads PathInfos from sources it does not control.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tvix.cli.common import (
    CLIError,
    Progress,
    Services,
    add_service_args,
    open_services,
    run,
    setup_logging,
)
from tvix.nixcompat.signing import parse_public_keys
from tvix.store.extract import extract_node, extract_store_paths, path_info_closure
from tvix.store.pathinfoservice.trust import TrustedPathInfoService
from tvix.store.resolve import parse_path, resolve

__all__ = ["add_arguments", "add_trust_arguments", "cmd_extract", "trusted_services"]

log = logging.getLogger("tvix.extract")


def add_trust_arguments(p: argparse.ArgumentParser) -> None:
    """``--trusted-public-keys`` and ``--verify-nar``."""
    g = p.add_argument_group(
        "trust",
        "Blobs and directories verify themselves; PathInfos are only as good as their "
        "signatures. With trusted keys, a PathInfo is used only when one of its signatures "
        "verifies against one of them.",
    )
    g.add_argument(
        "--trusted-public-keys",
        default=os.environ.get("TVIX_TRUSTED_PUBLIC_KEYS") or None,
        metavar="KEYS",
        help="space-separated public keys (name:base64, as in Nix's trusted-public-keys); "
        "PathInfos not signed by one of them are refused (env TVIX_TRUSTED_PUBLIC_KEYS)",
    )
    g.add_argument(
        "--verify-nar",
        action="store_true",
        help="also recompute the NAR hash of each accepted PathInfo from the content its "
        "root node points to (reads every blob once more) and refuse a mismatch: the "
        "signature does not cover the root node",
    )


def trusted_services(args: argparse.Namespace, services: Services) -> Services:
    """``services`` with the PathInfo service wrapped in a signature check when keys are given."""
    if args.trusted_public_keys is None:
        if args.verify_nar:
            raise CLIError(
                "--verify-nar needs --trusted-public-keys (an unsigned NAR hash "
                "vouches for nothing)"
            )
        return services
    keys = parse_public_keys(args.trusted_public_keys)
    if not keys:
        raise CLIError("--trusted-public-keys names no key: every store path would be refused")
    checked = TrustedPathInfoService(
        services.path_infos,
        keys.values(),
        verify_nar=args.verify_nar,
        blob_service=services.blobs,
        directory_service=services.directories,
    )
    return Services(services.blobs, services.directories, checked)


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
                _info, node = await resolve(s.path_infos, s.directories, args.path)
                stats = await extract_node(
                    s.blobs, s.directories, node, args.dest, progress=progress
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
