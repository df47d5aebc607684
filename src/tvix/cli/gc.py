"""``tvix-store delete``, ``pin`` and ``gc``: removing store paths and their garbage.

They work on the embedded store (the data directory, or the services the
options name). The GC's lock and the pins live where the PathInfo service
keeps them (a PostgreSQL one: in its database, shared by every machine
using it), otherwise in the data directory (``gc.lock``, ``gc.sqlite``),
which every process collecting such a store must then share. Running
``tvix-store gc`` while a daemon serves the same data directory is safe
(see :mod:`tvix.store.gc`); the daemon can also collect by itself
(``daemon --gc-interval``).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tvix.cli.common import CLIError, Services, default_data_dir, open_services
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.storepath import StorePath
from tvix.store.gc import (
    DEFAULT_GRACE,
    DEFAULT_MAX_UNUSED,
    DEFAULT_THRESHOLD,
    GCReport,
    collect,
    data_dir_usage,
    delete_paths,
    move_pins,
)
from tvix.store.gcstate import GCState, SQLiteGCState
from tvix.store.resolve import parse_path

__all__ = ["add_gc_commands", "data_dir_of", "parse_duration", "run_gc"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30``, ``45s``, ``90m``, ``12h``, ``30d``, ``2w``."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (a number with s, m, h, d or w, e.g. 30d)"
        )
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


def data_dir_of(args: argparse.Namespace) -> Path:
    """The data directory of this store (its GC state's, unless the PathInfo service keeps it).

    The one ``--store`` names, else ``--data-dir``, else the default.
    """
    store = getattr(args, "store", None)
    if store is not None and not store.startswith("grpc+"):
        path = Path(store.removeprefix("file://")).expanduser()
    else:
        path = args.data_dir if args.data_dir is not None else default_data_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _store_path(text: str) -> StorePath:
    try:
        path, sub = parse_path(text)
    except NixCompatError as e:
        raise CLIError(str(e)) from e
    if sub:
        raise CLIError(f"{text}: a store path, not a path inside one")
    return path


@contextlib.asynccontextmanager
async def _gc_state(s: Services, data_dir: Path) -> AsyncIterator[GCState]:
    """The GC state of the store ``s``: its PathInfo service's, else ``data_dir``'s.

    Pins an earlier version kept in ``data_dir`` for a store whose PathInfo
    service now keeps them are moved there first (told on stderr).
    """
    shared = s.path_infos.gc_state
    if shared is not None:
        if (data_dir / "gc.sqlite").exists():
            local = SQLiteGCState(data_dir)
            try:
                moved = await move_pins(local, shared)
            finally:
                await local.close()
            for name, path in moved:
                print(
                    f"tvix-store: moved the pin {name!r} ({path.absolute_path}) from "
                    f"{data_dir / 'gc.sqlite'} to {shared.where}",
                    file=sys.stderr,
                )
        yield shared
        return
    state = SQLiteGCState(data_dir)
    try:
        yield state
    finally:
        await state.close()


@contextlib.asynccontextmanager
async def _open(args: argparse.Namespace) -> AsyncIterator[tuple[Services, GCState]]:
    data_dir = data_dir_of(args)
    async with open_services(args) as s, _gc_state(s, data_dir) as state:
        yield s, state


async def cmd_delete(args: argparse.Namespace) -> int:
    """``tvix-store delete STOREPATH...``."""
    targets = [_store_path(p) for p in args.paths]
    async with _open(args) as (s, state):
        gone = await delete_paths(s.path_infos, targets, state=state, recursive=args.recursive)
    for p in gone:
        print(p.absolute_path)
    print(
        f"tvix-store: deleted {len(gone)} store paths; `tvix-store gc` frees their contents",
        file=sys.stderr,
    )
    return 0


async def cmd_pin(args: argparse.Namespace) -> int:
    """``tvix-store pin add|remove|list``."""
    async with _open(args) as (s, state):
        if args.action == "add":
            path = _store_path(args.path)
            if await s.path_infos.get(path.digest) is None:
                raise CLIError(f"{path.absolute_path} is not in the store")
            await state.add_pin(args.name, path)
        elif args.action == "remove":
            if not await state.remove_pin(args.name):
                raise CLIError(f"no pin named {args.name!r}")
        else:
            for name, path in await state.pins():
                print(f"{name}\t{path.absolute_path}")
    return 0


async def run_gc(
    s: Services,
    data_dir: Path,
    *,
    grace: float = DEFAULT_GRACE,
    keep_younger_than: float | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    max_unused: float = DEFAULT_MAX_UNUSED,
    dry_run: bool = False,
) -> GCReport:
    """One GC of the store ``s`` (its GC state its PathInfo service's, else ``data_dir``'s)."""
    async with _gc_state(s, data_dir) as state:
        return await collect(
            s.blobs,
            s.directories,
            s.path_infos,
            state=state,
            grace=grace,
            keep_younger_than=keep_younger_than,
            threshold=threshold,
            max_unused=max_unused,
            dry_run=dry_run,
        )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def describe(report: GCReport, freed_on_disk: int | None = None) -> list[str]:
    """The lines ``tvix-store gc`` prints about ``report``."""
    verb = "would delete" if report.dry_run else "deleted"
    b, c = report.blobs, report.compaction
    lines = [f"{verb} store path {p.absolute_path}" for p in report.paths]
    lines += [f"warning: {p}: its root Directory is missing" for p in report.damaged]
    lines.append(
        f"{report.roots} roots: {report.directories_live} Directories and "
        f"{report.blobs_live} blobs live"
    )
    lines.append(
        f"{verb} {len(report.paths)} store paths, {report.directories} Directories, "
        f"{b.chunks} chunks and {b.blobs} blob records ({_mib(b.bytes)} unreferenced)"
    )
    if report.dry_run:
        lines.append(
            f"would compact {c.packs} packs, copying {_mib(c.moved)} still live "
            "(before this GC's deletions)"
        )
    else:
        lines.append(
            f"compacted {c.packs} packs: copied {_mib(c.moved)}, freed {_mib(c.freed)}"
            + (f"; the data directory shrank by {_mib(freed_on_disk)}" if freed_on_disk else "")
            + f" in {report.seconds:.1f} s"
        )
    lines.append(", ".join(f"{k} {v:.1f} s" for k, v in report.phases.items()))
    return lines


async def cmd_gc(args: argparse.Namespace) -> int:
    """``tvix-store gc``."""
    data_dir = data_dir_of(args)
    before = data_dir_usage(str(data_dir))
    async with open_services(args) as s:
        report = await run_gc(
            s,
            data_dir,
            grace=args.grace,
            keep_younger_than=args.keep_younger_than,
            threshold=args.threshold,
            max_unused=args.max_unused,
            dry_run=args.dry_run,
        )
    freed = None if args.dry_run else before - data_dir_usage(str(data_dir))
    for line in describe(report, freed):
        print(line)
    return 0


def add_gc_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``delete``, ``pin`` and ``gc`` through ``command(name, fn, help, description)``."""
    p = command(
        "delete",
        cmd_delete,
        "remove store paths (their contents go at the next gc)",
        "Remove the PathInfo of each STOREPATH, as nix store delete. Refuses, removing "
        "nothing, a path another stored path still refers to (unless --recursive) or a "
        "path in a pinned closure. Contents are freed by the next `tvix-store gc`.",
    )
    p.add_argument("paths", nargs="+", metavar="STOREPATH")
    p.add_argument(
        "--recursive",
        action="store_true",
        help="also delete every stored path that refers to these, transitively",
    )

    p = command(
        "pin",
        cmd_pin,
        "name store paths whose closures gc and delete must keep",
        "pin add NAME STOREPATH | pin remove NAME | pin list. A pinned path and its closure "
        "are kept by `gc --keep-younger-than` whatever their age and refused by `delete`.",
    )
    pin_sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = pin_sub.add_parser("add", help="pin STOREPATH as NAME")
    a.add_argument("name", metavar="NAME")
    a.add_argument("path", metavar="STOREPATH")
    r = pin_sub.add_parser("remove", help="drop the pin NAME")
    r.add_argument("name", metavar="NAME")
    pin_sub.add_parser("list", help="list the pins")

    p = command(
        "gc",
        cmd_gc,
        "delete what no store path needs, and compact packs",
        "Mark every Directory and blob reachable from the store paths (and pins), delete the "
        "rest, and rewrite packs that became mostly dead. Safe while imports, uploads or a "
        "daemon write to the same store: anything written or found present less than "
        "--grace ago is kept. A second gc of the same store is refused while one runs.",
    )
    p.add_argument("--dry-run", action="store_true", help="report what would go; change nothing")
    p.add_argument(
        "--keep-younger-than",
        type=parse_duration,
        metavar="DURATION",
        help="also delete store paths added longer ago than DURATION (e.g. 30d), except "
        "pinned closures and the closures of younger paths",
    )
    p.add_argument(
        "--grace",
        type=parse_duration,
        default=DEFAULT_GRACE,
        metavar="DURATION",
        help="keep objects written or found present this recently, for writers still running "
        "(default 1h, at least 2m; 0 only when nothing writes to the store meanwhile)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=DEFAULT_THRESHOLD,
        metavar="FRACTION",
        help=f"compact packs less than this fraction live (default {DEFAULT_THRESHOLD})",
    )
    p.add_argument(
        "--max-unused",
        type=float,
        default=DEFAULT_MAX_UNUSED,
        metavar="FRACTION",
        help="then compact the most dead packs while dead bytes exceed this fraction of all "
        f"pack bytes (default {DEFAULT_MAX_UNUSED})",
    )
