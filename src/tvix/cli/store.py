"""``tvix-store``: the store's command line."""

from __future__ import annotations

import argparse
import hashlib
import os
import stat
import sys
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from tvix import __version__
from tvix.castore.blobservice import BlobService
from tvix.castore.blobservice.objectstore import ObjectStoreBlobService
from tvix.castore.blobservice.packs import PacksBlobService
from tvix.castore.errors import IntegrityError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.cli import contents, daemon, extract
from tvix.cli import copy as copy_cmd
from tvix.cli.common import (
    CLIError,
    Progress,
    Services,
    StatusLine,
    add_service_args,
    open_services,
    run,
    setup_logging,
)
from tvix.cli.contents import cmd_info, cmd_list, cmd_path_info
from tvix.cli.copy import cmd_copy
from tvix.cli.daemon import cmd_daemon
from tvix.cli.extract import cmd_extract
from tvix.cli.gc import add_gc_commands
from tvix.cli.mount import add_mount_command
from tvix.cli.nix_daemon import add_nix_daemon_command
from tvix.cli.virtiofs import add_virtiofs_command
from tvix.store.importer import import_file_flat, import_path
from tvix.store.nar import render_nar
from tvix.store.nar.render import file_nar_framing, verify_nar
from tvix.store.pathinfo import PathInfo
from tvix.store.resolve import resolve
from tvix.store.verify import repair, verify_path_info

PROG = "tvix-store"
Command = Callable[[argparse.Namespace], Coroutine[Any, Any, int | None]]


def _write_out(data: bytes) -> None:
    # Straight to the file descriptor: no text layer, no extra buffering.
    view = memoryview(data)
    while view:
        n = os.write(sys.stdout.fileno(), view)
        view = view[n:]


async def cmd_import(args: argparse.Namespace) -> int:
    """``tvix-store import``: add local paths to the store, as ``nix-store --add``."""
    async with open_services(args) as s:
        for path in args.paths:
            if args.flat:
                info = await import_file_flat(
                    s.blobs, s.directories, s.path_infos, path, name=args.name
                )
                print(info.store_path.absolute_path, flush=True)
                continue
            progress = Progress(f"importing {path}")
            try:
                info = await import_path(
                    s.blobs,
                    s.directories,
                    s.path_infos,
                    path,
                    name=args.name,
                    progress=progress,
                )
            finally:
                progress.done()
            print(info.store_path.absolute_path, flush=True)
    return 0


async def cmd_dump_path(args: argparse.Namespace) -> int:
    """``tvix-store dump-path``: write the NAR of a store path to stdout."""
    async with open_services(args) as s:
        info, node = await resolve(s.path_infos, s.directories, args.path)
        pieces = render_nar(s.blobs, s.directories, node)
        if node is info.node:
            # The whole store path: its NAR must be the one the PathInfo claims.
            pieces = verify_nar(pieces, info.nar_size, info.nar_sha256, str(info.store_path))
        async for piece in pieces:
            _write_out(piece)
    return 0


async def _cat_blob(
    blobs: BlobService, node: FileNode, shown: str, claim: PathInfo | None = None
) -> None:
    """Write the contents of ``node``; ``claim``: the PathInfo whose root it is.

    With a claim, the NAR of the file (its framing and the contents) must be
    the claimed one: checked before the last piece of contents is written.
    """
    reader = await blobs.open_read(node.digest)
    if reader is None:
        raise CLIError(f"{shown}: contents (blob {node.digest.hex()}) missing from the store")
    hasher = hashlib.sha256()
    head, tail = file_nar_framing(node)
    hasher.update(head)

    def check(got: int) -> None:
        if claim is None:
            return
        hasher.update(tail)
        size = len(head) + got + len(tail)
        if size != claim.nar_size or hasher.digest() != claim.nar_sha256:
            raise IntegrityError(
                f"{shown}: its NAR ({size} bytes, sha256 {hasher.hexdigest()}) is not the "
                f"one its PathInfo claims ({claim.nar_size} bytes, sha256 {claim.nar_sha256.hex()})"
            )

    got = 0
    async with reader:
        if node.size == 0:
            check(0)
        while chunk := await reader.read(1 << 20):
            got += len(chunk)
            if got > node.size:
                raise IntegrityError(
                    f"{shown}: blob {node.digest.hex()} is longer than {node.size}"
                )
            hasher.update(chunk)
            if got == node.size:
                check(got)
            _write_out(chunk)
    if got != node.size:
        raise IntegrityError(f"{shown}: blob {node.digest.hex()} has {got} bytes, not {node.size}")


async def cmd_cat(args: argparse.Namespace) -> int:
    """``tvix-store cat``: write a regular file in the store to stdout."""
    async with open_services(args) as s:
        info, node = await resolve(s.path_infos, s.directories, args.path)
        if not isinstance(node, FileNode):
            kind = "directory" if isinstance(node, DirectoryNode) else "symlink"
            raise CLIError(f"{args.path} is a {kind}, not a regular file")
        await _cat_blob(s.blobs, node, args.path, info if node is info.node else None)
    return 0


def _ls_line(node: Node, long: bool) -> str:
    name = os.fsdecode(node.name)
    if not long:
        return name
    if isinstance(node, DirectoryNode):
        return f"{stat.filemode(stat.S_IFDIR | 0o555)} {0:>12} {name}"
    if isinstance(node, FileNode):
        mode = 0o555 if node.executable else 0o444
        return f"{stat.filemode(stat.S_IFREG | mode)} {node.size:>12} {name}"
    assert isinstance(node, SymlinkNode)
    target = os.fsdecode(node.target)
    return f"{stat.filemode(stat.S_IFLNK | 0o777)} {0:>12} {name} -> {target}"


async def cmd_ls(args: argparse.Namespace) -> int:
    """``tvix-store ls``: list a directory in the store."""
    async with open_services(args) as s:
        _info, node = await resolve(s.path_infos, s.directories, args.path)
        if not isinstance(node, DirectoryNode):
            print(_ls_line(node, args.long))
            return 0
        directory = await s.directories.get(node.digest)
        if directory is None:
            raise CLIError(f"{args.path}: Directory {node.digest.hex()} missing from the store")
        out = sys.stdout.buffer
        for child in directory.nodes():
            out.write(os.fsencode(_ls_line(child, args.long)) + b"\n")
        out.flush()
    return 0


async def cmd_verify(args: argparse.Namespace) -> int:
    """``tvix-store verify``: print every problem found in store paths; 1 if any."""
    problems = 0
    checked = 0
    async with open_services(args) as s:
        if args.paths:
            infos: AsyncIterator[PathInfo] = _resolve_all(s, args.paths)
        else:
            infos = s.path_infos.list()
        seen: set[bytes] = set()
        line = StatusLine()
        nbytes = 0

        def read(n: int) -> None:
            nonlocal nbytes
            nbytes += n
            show()

        def show() -> None:
            line.show(
                lambda: (
                    f"verifying: {checked:,} store paths, {len(seen):,} blobs, "
                    f"{nbytes / 1e6:,.1f} MB checked ({line.rate(nbytes):,.0f} MB/s), "
                    f"{problems} problems"
                )
            )

        incomplete: list[str] = []
        if args.repair:
            for what, svc in (("blob", s.blobs), ("directory", s.directories)):
                if not svc.supports_gc:
                    raise CLIError(
                        f"cannot repair here: the {what} service ({type(svc).__name__}) "
                        "cannot delete"
                    )
        async for info in infos:
            checked += 1
            show()
            found = []
            async for problem in verify_path_info(
                s.blobs, s.directories, info, checked_blobs=seen, progress=read
            ):
                problems += 1
                found.append(problem)
                line.clear()
                print(problem, flush=True)
            if found and args.repair:
                for removed in await repair(s.blobs, s.directories, found):
                    print(f"removed {removed}", flush=True)
                incomplete.append(info.store_path.absolute_path)
        line.clear()
        if not args.paths and isinstance(s.blobs, (PacksBlobService, ObjectStoreBlobService)):
            # The whole store: also every chunk (and that packs and index agree).
            for message in await s.blobs.verify_storage(repair=args.repair):
                problems += 1
                print(f"blob store: {message}", flush=True)
        for path in incomplete:
            print(f"incomplete: {path}", flush=True)
        if incomplete:
            print(
                f"{PROG}: {len(incomplete)} store paths are incomplete: import their source "
                "again (tvix-store import), or copy them from a store that has them "
                "(tvix-store copy --from SOURCE STOREPATH)",
                file=sys.stderr,
            )
        # What the blob store removed on opening (staging files of dead writers).
        swept: list[str] = getattr(s.blobs, "staging_swept", [])
        for path in swept:
            print(f"{PROG}: removed a stale staging file: {path}", file=sys.stderr)
    print(
        f"{PROG}: verified {checked} store paths: "
        + (f"{problems} problems" if problems else "all intact"),
        file=sys.stderr,
    )
    return 1 if problems else 0


async def _resolve_all(s: Services, paths: list[str]) -> AsyncIterator[PathInfo]:
    for p in paths:
        info, _node = await resolve(s.path_infos, s.directories, p)
        yield info


def build_parser() -> argparse.ArgumentParser:
    """The ``tvix-store`` command line parser, with a subcommand per command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A content-addressed store for Nix: files stored once by their blake3 "
        "digest, directories as a Merkle DAG, store paths mapped to that content. "
        "Speaks the tvix-store gRPC protocol and renders the NARs Nix expects.",
        epilog="Run `tvix-store COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (-vv: debug; env TVIX_LOG)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # -v after the command too (tvix-store import -v X); counts add up with the global one.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log more (-vv: debug)"
    )

    def command(
        name: str, fn: Command, help: str, description: str, **kwargs: Any
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description, parents=[verbose], **kwargs)
        add_service_args(p)
        p.set_defaults(func=fn)
        return p

    p = command(
        "daemon",
        cmd_daemon,
        "serve the store over gRPC",
        "Serve the blob, directory and path info services over gRPC (with health checking "
        "and server reflection), by default from the embedded store in the data directory. "
        "Stops gracefully on SIGINT/SIGTERM.",
    )
    daemon.add_arguments(p)

    p = command(
        "import",
        cmd_import,
        "add local paths to the store, as nix-store --add",
        "Ingest each PATH (file, symlink or directory tree) and register it as a "
        "content-addressed store path; print the store path, one per line, exactly as "
        "`nix-store --add PATH` would.",
    )
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--name", help="store path name (default: the base name of PATH)")
    p.add_argument(
        "--flat",
        action="store_true",
        help="add regular files by the sha256 of their bytes, as `nix store add-file` does",
    )

    p = command(
        "copy",
        cmd_copy,
        "copy store paths with their closures from a binary cache or another store",
        "Copy each STOREPATH and everything it refers to from --from (a Nix binary cache: "
        "http://, https://, file://; or a tvix-store daemon: grpc+http://, grpc+unix://) "
        "into the store, skipping what is there and checking signatures as Nix does; or, "
        "with --reference-graph FILE, ingest the closure an exportReferencesGraph JSON file "
        "lists from the local filesystem.",
    )
    copy_cmd.add_arguments(p)

    p = command(
        "path-info",
        cmd_path_info,
        "show the metadata of store paths",
        "Show NAR hash and size, references, deriver, signatures and content address of "
        "each STOREPATH; with -s/-S their sizes in columns, with -r their closures, as "
        "`nix path-info` does. Store paths that are present are shown even when others are "
        "not (those are reported, and the exit code is 1).",
        conflict_handler="resolve",
    )
    contents.add_path_info_arguments(p)

    p = command(
        "list",
        cmd_list,
        "list the store paths in the store",
        "List every store path in the store (or the STOREPATHs given; with -r their closures), "
        "with -s its NAR size and -S its closure size.",
        conflict_handler="resolve",
    )
    contents.add_list_arguments(p)

    p = command(
        "info",
        cmd_info,
        "show what the store holds and how much sharing saves",
        "Show the services in use, the number of store paths, their NAR bytes, the distinct "
        "blobs and directories they share, and for a data directory the bytes on disk: the "
        "deduplication and compression a content-addressed store buys. Reads every Directory.",
    )

    p = command(
        "dump-path",
        cmd_dump_path,
        "write the NAR of a store path to stdout, as nix-store --dump",
        "Write the NAR serialisation of STOREPATH[/sub/path] to stdout, byte-identical "
        "to `nix-store --dump` of the same tree.",
    )
    p.add_argument("path", metavar="STOREPATH[/SUB/PATH]")

    p = command(
        "cat",
        cmd_cat,
        "write a file in the store to stdout",
        "Write the contents of the regular file STOREPATH[/sub/path] to stdout.",
    )
    p.add_argument("path", metavar="STOREPATH[/SUB/PATH]")

    p = command(
        "ls",
        cmd_ls,
        "list a directory in the store",
        "List the entries of the directory STOREPATH[/sub/path] (symlinks are not followed).",
    )
    p.add_argument("path", metavar="STOREPATH[/SUB/PATH]")
    p.add_argument("-l", "--long", action="store_true", help="show type, mode, size and targets")

    p = command(
        "extract",
        cmd_extract,
        "write a store path's tree to disk",
        "Write STOREPATH[/sub/path] to DEST (which must not exist) as plain directories, files "
        "and symlinks, verifying every blob; with --closure also every store path it refers "
        "to, each into DEST/<hash>-<name>. All or nothing: the tree is written next to DEST "
        "and renamed into place at the end.",
    )
    extract.add_arguments(p)

    p = command(
        "verify",
        cmd_verify,
        "check that store paths are complete and intact",
        "Walk every store path (or the ones given) and check that every Directory and blob "
        "reachable from it is present and hashes to its digest, and that its NAR hash and "
        "size match. Without STOREPATHs, a packed (the default) or objectstore blob store is "
        "also checked whole: every chunk read and verified (and packs and index found to agree) "
        "(problems printed as 'blob store: ...'). Each problem is printed with the path it "
        "affects; the exit code is 1 when any is found. With --repair, what is damaged is "
        "removed so that importing the source again, or copying the paths from another store, "
        "restores them.",
    )
    p.add_argument("paths", nargs="*", metavar="STOREPATH")
    p.add_argument(
        "--repair",
        action="store_true",
        help="remove damaged chunks, blob records and Directories (and those above them) and "
        "list the store paths left incomplete, to restore by import or copy --from",
    )

    add_gc_commands(command)
    add_mount_command(sub)
    add_virtiofs_command(sub)
    add_nix_daemon_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``tvix-store`` command: parse ``argv``, run the command, return the exit code."""
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        # No command: what there is to do, as `git` and `nix` answer.
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run(PROG, lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
