"""``tvix-store copy``: copy store paths with their closures into the store.

Two forms:

``tvix-store copy --from SOURCE STOREPATH...``
    copies each STOREPATH and its closure from SOURCE, which is either a Nix
    binary cache (``http://``, ``https://``, ``file://``; NARs are
    downloaded, checked and ingested) or a tvix store: ``grpc+http://...``
    / ``grpc+unix://...`` names a daemon whose three services are used
    (``--from-store-composition FILE`` names any other store). Paths the
    destination has are skipped. Signatures are checked as Nix does: an
    input-addressed path needs a signature by one of
    ``--trusted-public-keys``; a content-addressed one passes without, its
    content checked against its address; ``--no-check-sigs`` trusts the
    source.
``tvix-store copy --reference-graph FILE``
    upstream's form: ingests every path listed in the ``closure`` of an
    ``exportReferencesGraph`` JSON file (e.g. ``.attrs.json`` of a
    ``__structuredAttrs`` build) from the local filesystem (under
    ``--store-root`` for a chroot store), checks its NAR against the
    graph's hash and size, and registers it with the graph's references.

The destination is the usual store (``--*-service-addr``, ``--data-dir``,
``--store-composition``).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tvix.castore.errors import InvalidURLError
from tvix.cli.common import (
    Services,
    StatusLine,
    UsageError,
    add_trust_args,
    open_services,
    trusted_keys,
)
from tvix.nixcompat.storepath import StorePath
from tvix.store.composition import Composition
from tvix.store.copy import (
    BinaryCacheSource,
    CopyResult,
    PathSource,
    StoreSource,
    copy_closure,
)
from tvix.store.errors import StoreError
from tvix.store.local_nix_store import read_closure, store_root_of
from tvix.store.pathinfo import PathInfo
from tvix.store.reference_graph import import_reference_graph, parse_reference_graph
from tvix.store.resolve import parse_path

__all__ = ["add_arguments", "cmd_copy"]

_CACHE_SCHEMES = ("http://", "https://", "file://")
_STORE_SCHEMES = ("grpc+http://", "grpc+unix://")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The copy command's own options."""
    p.add_argument("paths", nargs="*", metavar="STOREPATH", help="store paths to copy")
    source = p.add_argument_group("source (one of)")
    source.add_argument(
        "--from",
        dest="source",
        metavar="URL",
        help="a Nix binary cache (http://, https://, file://), a tvix-store daemon "
        "(grpc+http://host:port, grpc+unix:///path.sock) or a local Nix store (local, "
        "/nix/store, local?root=DIR: read from its database and disk)",
    )
    source.add_argument(
        "--from-store-composition",
        type=Path,
        metavar="FILE",
        help="a tvix store described by a composition file (its 'default' services)",
    )
    source.add_argument(
        "--reference-graph",
        type=Path,
        metavar="FILE",
        help="ingest the closure listed in an exportReferencesGraph JSON file from the "
        "local filesystem (no STOREPATH arguments)",
    )
    p.add_argument(
        "--store-root",
        type=Path,
        default=None,
        metavar="DIR",
        help="with --reference-graph: read /nix/store/... under DIR (a chroot store's root)",
    )
    add_trust_args(
        p,
        title="trust (--from)",
        description="Input-addressed paths need a signature by one of the trusted keys; "
        "content-addressed ones pass without, their content checked against their address.",
        no_check_sigs=True,
    )
    p.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=8,
        metavar="N",
        help="store paths fetched at a time (default 8)",
    )


class _Progress:
    """Paths done of those known so far, and bytes as they stream, on a :class:`StatusLine`.

    ``3/17+ paths`` while the closure is still being discovered, ``3/17``
    once it is known. Redrawn at most 10 times a second, only on a terminal.
    """

    def __init__(self) -> None:
        self.known = 0
        self.complete = False
        self.finished = 0
        self.nbytes = 0
        self._line = StatusLine()

    def discovered(self, path: StorePath) -> None:
        self.known += 1
        self._show()

    def closure_known(self) -> None:
        self.complete = True
        self._show()

    def moved(self, nbytes: int) -> None:
        self.nbytes += nbytes
        self._show()

    def done(self, info: PathInfo, copied: bool) -> None:
        self.finished += 1
        self._show()

    def _show(self) -> None:
        self._line.show(
            lambda: (
                f"copying: {self.finished}/{self.known}{'' if self.complete else '+'} paths, "
                f"{self.nbytes / 1e6:,.1f} MB ({self._line.rate(self.nbytes):,.1f} MB/s)"
            )
        )

    def finish(self) -> None:
        self._line.clear()


def _store_paths(texts: list[str]) -> list[StorePath]:
    out = []
    for text in texts:
        path, sub = parse_path(text)
        if sub:
            raise UsageError(f"{text}: copy takes store paths, not paths inside them")
        out.append(path)
    return out


@contextlib.asynccontextmanager
async def _source(
    args: argparse.Namespace, dest: Services, progress: _Progress
) -> AsyncIterator[PathSource]:
    keys = list((trusted_keys(args) or {}).values())
    require = not args.no_check_sigs
    if args.from_store_composition is not None:
        composition = Composition.from_file(args.from_store_composition)
        description = f"store {args.from_store_composition}"
    elif args.source.startswith(_CACHE_SCHEMES):
        source = BinaryCacheSource(
            args.source,
            dest.blobs,
            dest.directories,
            trusted_keys=keys,
            require_sigs=require,
            progress=progress.moved,
        )
        try:
            yield source
        finally:
            await source.close()
        return
    elif args.source.startswith(_STORE_SCHEMES):
        composition = Composition.from_urls(args.source, args.source, args.source)
        description = f"store {args.source}"
    else:
        raise InvalidURLError(
            f"--from {args.source!r}: expected a binary cache (http://, https://, file://) "
            "or a tvix-store daemon (grpc+http://, grpc+unix://)"
        )
    async with composition:
        blobs, dirs, infos = composition.build_all()
        yield StoreSource(
            blobs,
            dirs,
            infos,
            dest.blobs,
            dest.directories,
            trusted_keys=keys,
            require_sigs=require,
            description=description,
            progress=progress.moved,
        )


def _local_store(args: argparse.Namespace) -> Path | None:
    """The root of the local Nix store ``--from`` names, if it names one."""
    if args.source is None:
        return None
    try:
        return store_root_of(args.source)
    except StoreError as e:
        raise UsageError(str(e)) from None


def _check_args(args: argparse.Namespace) -> None:
    sources = [a for a in (args.source, args.from_store_composition, args.reference_graph) if a]
    if len(sources) != 1:
        raise UsageError(
            "give exactly one of --from, --from-store-composition and --reference-graph"
        )
    if args.reference_graph is not None:
        if args.paths:
            raise UsageError("--reference-graph copies the closure the file lists: no STOREPATHs")
    else:
        if not args.paths:
            raise UsageError("no STOREPATH to copy")
        if args.store_root is not None:
            raise UsageError("--store-root only applies to --reference-graph")
    if args.jobs < 1:
        raise UsageError("--jobs must be positive")


async def cmd_copy(args: argparse.Namespace) -> int:
    """``tvix-store copy``: copy closures from --from, or ingest a --reference-graph."""
    _check_args(args)
    progress = _Progress()
    try:
        if args.reference_graph is not None:
            entries = parse_reference_graph(args.reference_graph.read_bytes())
            async with open_services(args) as s:
                result = await import_reference_graph(
                    s.blobs,
                    s.directories,
                    s.path_infos,
                    entries,
                    store_root=args.store_root or "",
                    jobs=args.jobs,
                    observer=progress,
                )
        elif (root := _local_store(args)) is not None:
            # A local Nix store: its database says what to copy, its disk has the contents.
            entries = read_closure(root, _store_paths(args.paths))
            async with open_services(args) as s:
                result = await import_reference_graph(
                    s.blobs,
                    s.directories,
                    s.path_infos,
                    entries,
                    store_root="" if root == Path("/") else str(root),
                    jobs=args.jobs,
                    observer=progress,
                )
        else:
            roots = _store_paths(args.paths)
            async with open_services(args) as s, _source(args, s, progress) as source:
                result = await copy_closure(
                    source, s.path_infos, roots, jobs=args.jobs, observer=progress
                )
    finally:
        progress.finish()
    _report(result)
    return 0


def _report(result: CopyResult) -> None:
    nbytes = sum(i.nar_size for i in result.copied)
    print(
        f"tvix-store: copied {len(result.copied)} store paths ({nbytes / 1e6:,.1f} MB of NAR), "
        f"{len(result.present)} already present",
        file=sys.stderr,
    )
