"""``tvix-store list``, ``info`` and ``path-info``: what is in the store, as Nix users ask."""

from __future__ import annotations

import argparse
import base64
import json
import sys

from tvix.cli.common import Services, open_services
from tvix.nixcompat import nixbase32
from tvix.nixcompat.errors import NixCompatError
from tvix.store.extract import path_info_closure
from tvix.store.pathinfo import PathInfo
from tvix.store.resolve import parse_path
from tvix.store.stats import closure_sizes, disk_usage, store_stats

__all__ = [
    "add_list_arguments",
    "add_path_info_arguments",
    "cmd_info",
    "cmd_list",
    "cmd_path_info",
    "human",
]


def human(n: float) -> str:
    """``n`` bytes as ``1.5M``-style text, as ``nix path-info -h`` prints sizes."""
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _sizes_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-s", "--size", action="store_true", help="print each path's NAR size")
    p.add_argument(
        "-S", "--closure-size", action="store_true", help="print each path's closure size"
    )
    p.add_argument("-r", "--recursive", action="store_true", help="the closures of the paths")
    p.add_argument("-h", "--human-readable", action="store_true", help="sizes as 1.5M")
    p.add_argument("--json", action="store_true", help="JSON shaped like nix path-info --json")


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    """``list``'s options."""
    p.add_argument("paths", nargs="*", metavar="STOREPATH", help="only these (default: all)")
    _sizes_args(p)


def add_path_info_arguments(p: argparse.ArgumentParser) -> None:
    """``path-info``'s options."""
    p.add_argument("paths", nargs="+", metavar="STOREPATH")
    _sizes_args(p)


def _json(info: PathInfo, closure_size: int | None) -> dict[str, object]:
    # Shaped like `nix path-info --json`: SRI NAR hash, full reference paths sorted.
    out: dict[str, object] = {
        "path": info.store_path.absolute_path,
        "narHash": "sha256-" + base64.b64encode(info.nar_sha256).decode(),
        "narSize": info.nar_size,
        "references": sorted(r.absolute_path for r in info.references),
    }
    if closure_size is not None:
        out["closureSize"] = closure_size
    if info.deriver is not None:
        out["deriver"] = info.deriver.absolute_path
    if info.signatures:
        out["signatures"] = sorted(str(s) for s in info.signatures)
    if info.ca is not None:
        out["ca"] = str(info.ca)
    return out


def _narinfo_lines(info: PathInfo) -> str:
    lines = [
        f"StorePath: {info.store_path.absolute_path}",
        f"NarHash: sha256:{nixbase32.encode(info.nar_sha256)}",
        f"NarSize: {info.nar_size}",
        "References: " + " ".join(sorted(r.base_name for r in info.references)),
    ]
    if info.deriver is not None:
        lines.append(f"Deriver: {info.deriver.base_name}")
    lines.extend(f"Sig: {s}" for s in sorted(str(s) for s in info.signatures))
    if info.ca is not None:
        lines.append(f"CA: {info.ca}")
    return "\n".join(lines)


async def _print(
    s: Services, infos: list[PathInfo], args: argparse.Namespace, narinfo: bool
) -> None:
    """Print ``infos`` as ``nix path-info`` does with the size options given."""
    infos = sorted(infos, key=lambda i: i.store_path.absolute_path)
    closures = await closure_sizes(s.path_infos, infos) if args.closure_size or args.json else {}
    if args.json:
        print(json.dumps([_json(i, closures.get(i.store_path.absolute_path)) for i in infos]))
        return

    def size(n: int) -> str:
        return human(n) if args.human_readable else str(n)

    width = max((len(i.store_path.absolute_path) for i in infos), default=0)
    for info in infos:
        path = info.store_path.absolute_path
        if narinfo and not (args.size or args.closure_size):
            print(_narinfo_lines(info))
            continue
        columns = [path.ljust(width) if (args.size or args.closure_size) else path]
        if args.size:
            columns.append(size(info.nar_size).rjust(10))
        if args.closure_size:
            columns.append(size(closures[path]).rjust(10))
        print("\t".join(columns).rstrip())


async def _lookup(s: Services, texts: list[str]) -> tuple[list[PathInfo], list[str]]:
    """The PathInfos of the store paths ``texts`` name, and messages for those missing."""
    found: list[PathInfo] = []
    missing: list[str] = []
    for text in texts:
        try:
            path, sub = parse_path(text)
        except NixCompatError as e:
            missing.append(str(e))
            continue
        info = await s.path_infos.get(path.digest)
        if info is None or info.store_path != path:
            missing.append(f"{path} is not in the store")
        else:
            if sub:
                missing.append(f"{text}: a path inside {path}, not a store path")
                continue
            found.append(info)
    return found, missing


async def _closure(s: Services, infos: list[PathInfo]) -> list[PathInfo]:
    return await path_info_closure(s.path_infos, [i.store_path for i in infos])


async def cmd_path_info(args: argparse.Namespace) -> int:
    """``tvix-store path-info``: metadata of store paths, those present even if some are not."""
    return await _show(args, narinfo=True)


async def cmd_list(args: argparse.Namespace) -> int:
    """``tvix-store list``: the store paths in the store (or the closures of those given)."""
    return await _show(args, narinfo=False)


async def _show(args: argparse.Namespace, *, narinfo: bool) -> int:
    """The paths given (every stored path when none are), with their closures under ``-r``.

    Those present are printed even when others are not (reported; exit 1).
    """
    async with open_services(args) as s:
        if args.paths:
            infos, missing = await _lookup(s, args.paths)
        else:
            infos, missing = [info async for info in s.path_infos.list()], []
        if args.recursive:
            infos = await _closure(s, infos)
        await _print(s, infos, args, narinfo=narinfo)
    for message in missing:
        print(f"tvix-store: error: {message}", file=sys.stderr)
    return 1 if missing else 0


async def cmd_info(args: argparse.Namespace) -> int:
    """``tvix-store info``: the services in use and what the store holds, deduplicated."""
    async with open_services(args) as s:
        stats = await store_stats(s.path_infos.list(), s.directories)
    print(f"store:               {s.where}")
    print(f"store paths:         {stats.store_paths:,}")
    print(f"NAR bytes:           {stats.nar_bytes:,} ({human(stats.nar_bytes)})")
    print(f"files:               {stats.files:,} ({human(stats.file_bytes)})")
    print(f"distinct blobs:      {len(stats.blobs):,} ({human(stats.blob_bytes)})")
    print(f"directories:         {stats.directories:,} distinct")
    print(f"deduplication:       {stats.dedup_ratio:.2f}x (file bytes / distinct blob bytes)")
    if s.data_dir is not None and s.data_dir.is_dir():
        disk = disk_usage(s.data_dir)
        print(f"bytes stored:        {disk:,} ({human(disk)} on disk, metadata included)")
        if disk:
            print(
                f"saving:              {stats.nar_bytes / disk:.2f}x "
                "(NAR bytes / bytes stored: deduplication and compression)"
            )
    if stats.missing_directories:
        print(
            f"warning: {stats.missing_directories} root Directories are missing "
            "(see tvix-store verify)",
            file=sys.stderr,
        )
    return 0
