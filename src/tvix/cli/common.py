"""What every command shares: service addresses, the run loop, errors, progress."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tvix.castore.blobservice import BlobService
from tvix.castore.directoryservice import DirectoryService
from tvix.castore.errors import CastoreError
from tvix.nixcompat.errors import NixCompatError
from tvix.store.composition import Composition
from tvix.store.errors import StoreError
from tvix.store.pathinfoservice import PathInfoService

__all__ = [
    "CLIError",
    "Progress",
    "Services",
    "add_service_args",
    "default_data_dir",
    "local_blob_url",
    "local_store_urls",
    "open_services",
    "run",
]

log = logging.getLogger("tvix")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


def default_data_dir() -> Path:
    """``$TVIX_STORE_DATA_DIR``, else ``$XDG_DATA_HOME/tvix-store``, else
    ``~/.local/share/tvix-store``."""
    env = os.environ.get("TVIX_STORE_DATA_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "tvix-store"


def local_blob_url(data_dir: Path) -> str:
    """The blob store of the embedded store in ``data_dir``.

    Blobs are kept in packs (``packs+file``, in ``DIR/packs``: a few pack
    files and an SQLite index). A data directory made before packs existed
    holds an ``objectstore+file`` store in ``DIR/blobs`` (one file per
    chunk) and no packed store: it is opened as it is, so nothing is lost
    or needs migrating (its new blobs keep going there too).
    """
    root = data_dir.absolute()
    old = root / "blobs"
    packed = root / "packs" / "index.sqlite"
    if not packed.exists() and ((old / "chunks").is_dir() or (old / "blobs").is_dir()):
        return f"objectstore+file://{old}"
    return f"packs+file://{root / 'packs'}"


def local_store_urls(data_dir: Path) -> tuple[str, str, str]:
    """The service URLs of the embedded store kept in ``data_dir``."""
    return (
        local_blob_url(data_dir),
        f"sqlite://{data_dir.absolute() / 'directories.sqlite'}",
        f"sqlite://{data_dir.absolute() / 'pathinfo.sqlite'}",
    )


def add_service_args(parser: argparse.ArgumentParser) -> None:
    """The options naming the three services (each also an environment variable)."""
    g = parser.add_argument_group(
        "store",
        "Where the store is. Client commands talk to the daemon at grpc+http://[::1]:8000 "
        "unless a data directory is given (then they open the embedded store there "
        "themselves); the daemon serves the embedded store in the data directory. Any "
        "service given by address replaces its part.",
    )
    g.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="data directory of the embedded store (env TVIX_STORE_DATA_DIR; "
        "default $XDG_DATA_HOME/tvix-store or ~/.local/share/tvix-store)",
    )
    g.add_argument(
        "--store-composition",
        type=Path,
        default=os.environ.get("TVIX_STORE_COMPOSITION"),
        metavar="FILE",
        help="a composition file (TOML) naming and wiring the services; the ones named "
        "'default' are used (env TVIX_STORE_COMPOSITION)",
    )
    for kind, env in (
        ("blob", "BLOB_SERVICE_ADDR"),
        ("directory", "DIRECTORY_SERVICE_ADDR"),
        ("path-info", "PATH_INFO_SERVICE_ADDR"),
    ):
        g.add_argument(
            f"--{kind}-service-addr",
            default=os.environ.get(env),
            metavar="URL",
            help=f"{kind.replace('-', ' ')} service URL (env {env}), e.g. memory://",
        )


@dataclass
class Services:
    """The three services a command works with."""

    blobs: BlobService
    directories: DirectoryService
    path_infos: PathInfoService


DAEMON_URL = "grpc+http://[::1]:8000"


@contextlib.asynccontextmanager
async def open_services(
    args: argparse.Namespace, *, local: bool = False
) -> AsyncIterator[Services]:
    """Build the services the options name; close them afterwards.

    A composition file gives all three (its ``default`` of each kind);
    otherwise each address given replaces its default. The default is the
    embedded store in the data directory when ``local`` (the daemon) or when
    a data directory is asked for (``--data-dir``, ``TVIX_STORE_DATA_DIR``);
    otherwise it is the daemon at ``grpc+http://[::1]:8000``, as upstream's
    client commands do.
    """
    if args.store_composition is not None:
        if any((args.blob_service_addr, args.directory_service_addr, args.path_info_service_addr)):
            raise CLIError("--store-composition excludes the --*-service-addr options")
        composition = Composition.from_file(args.store_composition)
    else:
        asked = args.data_dir is not None or bool(os.environ.get("TVIX_STORE_DATA_DIR"))
        data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
        if local or asked:
            defaults = local_store_urls(data_dir)
        else:
            defaults = (DAEMON_URL, DAEMON_URL, DAEMON_URL)
        urls = (
            args.blob_service_addr or defaults[0],
            args.directory_service_addr or defaults[1],
            args.path_info_service_addr or defaults[2],
        )
        if any(u in local_store_urls(data_dir) for u in urls):
            data_dir.mkdir(parents=True, exist_ok=True)
        log.debug("services: blob=%s directory=%s path-info=%s", *urls)
        composition = Composition.from_urls(*urls)
    async with composition:
        yield Services(*composition.build_all())


class Progress:
    """A one-line progress report on stderr, only when stderr is a terminal."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.enabled = sys.stderr.isatty()
        self.files = 0
        self.nbytes = 0
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, files: int, nbytes: int) -> None:
        self.files += files
        self.nbytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self._last > 0.1:
            self._last = now
            rate = self.nbytes / max(now - self._start, 1e-6) / 1e6
            sys.stderr.write(
                f"\r\x1b[K{self.what}: {self.files:,} files, {self.nbytes / 1e6:,.1f} MB "
                f"({rate:,.0f} MB/s)"
            )
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def setup_logging(verbosity: int) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv (or env TVIX_LOG)."""
    level = os.environ.get("TVIX_LOG", "").upper() or (
        "DEBUG" if verbosity > 1 else "INFO" if verbosity == 1 else "WARNING"
    )
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run(prog: str, main: Callable[[], Coroutine[Any, Any, int | None]]) -> int:
    """Run ``main`` and map failures to a one-line message and an exit code.

    0 success, 1 a failure (the message says what), 130 interrupted.
    """
    try:
        return asyncio.run(main()) or 0
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error of ours. Point stdout
        # at /dev/null so the interpreter's final flush does not fail again.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, CastoreError, StoreError, NixCompatError, OSError) as e:
        log.debug("failure", exc_info=True)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
