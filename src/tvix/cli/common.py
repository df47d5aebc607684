"""What every command shares: service addresses, trust options, the run loop, errors, progress."""

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
from tvix.nixcompat.signing import VerifyingKey, parse_public_keys
from tvix.store.composition import Composition
from tvix.store.errors import StoreError
from tvix.store.pathinfoservice import PathInfoService
from tvix.store.pathinfoservice.trust import TrustedPathInfoService

__all__ = [
    "CLIError",
    "Progress",
    "Services",
    "UsageError",
    "add_service_args",
    "add_trust_args",
    "default_data_dir",
    "local_blob_url",
    "local_store_urls",
    "open_services",
    "run",
    "trusted_keys",
    "trusted_services",
]

log = logging.getLogger("tvix")


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code 1."""


class UsageError(CLIError):
    """Options that do not go together: printed as one line, exit code 2 (as argparse's)."""


def default_data_dir() -> Path:
    """The data directory.

    ``$TVIX_STORE_DATA_DIR``, else ``$XDG_DATA_HOME/tvix-store``, else
    ``~/.local/share/tvix-store``.
    """
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
        "Where the store is. By default every command opens the embedded store in the data "
        "directory itself, as nix does with /nix/store; several processes (a daemon, a "
        "mount, commands) may share one data directory. --store points all three services "
        "at a daemon instead. Any service given by address replaces its part.",
    )
    g.add_argument(
        "--store",
        default=os.environ.get("TVIX_STORE_ADDR") or None,
        metavar="URL",
        help="the whole store at one place: a daemon (grpc+unix:///path.sock, "
        "grpc+http://host:port, grpc+https://host:port?ca=...) or a data directory (a path) "
        "(env TVIX_STORE_ADDR)",
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


def add_trust_args(
    parser: argparse.ArgumentParser,
    *,
    title: str = "trust",
    description: str | None = None,
    no_check_sigs: bool = False,
    verify_nar: bool = False,
) -> None:
    """The trust options of commands reading PathInfos from sources they do not control.

    ``--trusted-public-keys`` (env ``TVIX_TRUSTED_PUBLIC_KEYS``; ``None``
    when not given), and, when asked for, ``--no-check-sigs`` and
    ``--verify-nar``. Read them with :func:`trusted_keys`; what they mean is
    a :class:`~tvix.store.trust.TrustPolicy`.
    """
    g = parser.add_argument_group(
        title,
        description
        or "Blobs and directories verify themselves; PathInfos are only as good as their "
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
    if no_check_sigs:
        g.add_argument(
            "--no-check-sigs",
            action="store_true",
            help="trust the source: do not require signatures (hashes are still checked)",
        )
    if verify_nar:
        g.add_argument(
            "--verify-nar",
            action="store_true",
            help="also recompute the NAR hash of each accepted PathInfo from the content its "
            "root node points to (reads every blob once more) and refuse a mismatch: the "
            "signature does not cover the root node",
        )


def trusted_keys(args: argparse.Namespace) -> dict[str, VerifyingKey] | None:
    """The keys ``--trusted-public-keys`` names (``None`` when not given); :class:`CLIError`."""
    if args.trusted_public_keys is None:
        return None
    try:
        return parse_public_keys(args.trusted_public_keys)
    except NixCompatError as e:
        raise CLIError(f"--trusted-public-keys: {e}") from None


@dataclass
class Services:
    """The three services a command works with, and where they are (for messages)."""

    blobs: BlobService
    directories: DirectoryService
    path_infos: PathInfoService
    where: str = ""
    #: The data directory, when the three services are its embedded store.
    data_dir: Path | None = None


#: Where upstream's client commands look for a daemon; ours open the local store
#: unless told (``--store``), and use this only as the example in messages.
DAEMON_URL = "grpc+http://[::1]:8000"

# Service URL schemes whose data lives only as long as the process.
_EPHEMERAL = ("memory://", "objectstore+memory://")


def _store_urls(store: str) -> tuple[tuple[str, str, str], Path | None]:
    """The three URLs ``--store`` names, and the data directory when it names one."""
    if store.startswith("grpc+"):
        return (store, store, store), None
    if "://" in store and not store.startswith("file://"):
        raise UsageError(
            f"--store {store}: expected a daemon (grpc+unix:///path.sock, grpc+http://host:port, "
            "grpc+https://host:port) or a data directory"
        )
    data_dir = Path(store.removeprefix("file://")).expanduser()
    return local_store_urls(data_dir), data_dir


def _refuse_vanishing_paths(urls: tuple[str, str, str]) -> None:
    """Refuse to record store paths whose contents are gone when the command ends."""
    blob, directory, path_info = urls
    if path_info.startswith(_EPHEMERAL):
        return
    for kind, url in (("blob", blob), ("directory", directory)):
        if url.startswith(_EPHEMERAL):
            raise CLIError(
                f"the {kind} service {url} forgets everything when this command ends, but the "
                f"PathInfo service {path_info} keeps what is put: its store paths would refer "
                "to contents that are gone (use persistent services, or memory:// for all three)"
            )


@contextlib.asynccontextmanager
async def open_services(args: argparse.Namespace) -> AsyncIterator[Services]:
    """Build the services the options name; close them afterwards.

    A composition file gives all three (its ``default`` of each kind);
    ``--store`` names a daemon or a data directory for all three; otherwise
    the embedded store in the data directory (``--data-dir``, else
    :func:`default_data_dir`). Each ``--*-service-addr`` given replaces its
    part. Raises :class:`CLIError` for contradicting options, and for a mix
    that would record store paths whose contents vanish.
    """
    explicit_addrs = (
        args.blob_service_addr,
        args.directory_service_addr,
        args.path_info_service_addr,
    )
    if args.store_composition is not None:
        if any(explicit_addrs) or args.store is not None:
            raise UsageError(
                "--store-composition excludes --store and the --*-service-addr options"
            )
        if args.data_dir is not None:
            raise UsageError(
                "--data-dir and --store-composition name two different stores: give one "
                "(a composition can name sqlite and objectstore files in any directory)"
            )
        composition = Composition.from_file(args.store_composition)
        where = f"the composition {args.store_composition}"
        embedded_in = None
    else:
        data_dir: Path | None = args.data_dir if args.data_dir is not None else default_data_dir()
        if args.store is not None:
            if args.data_dir is not None:
                raise UsageError("--store and --data-dir name two stores: give one")
            defaults, data_dir = _store_urls(args.store)
        else:
            assert data_dir is not None
            defaults = local_store_urls(data_dir)
        urls = (
            args.blob_service_addr or defaults[0],
            args.directory_service_addr or defaults[1],
            args.path_info_service_addr or defaults[2],
        )
        _refuse_vanishing_paths(urls)
        if data_dir is not None and any(u in local_store_urls(data_dir) for u in urls):
            data_dir.mkdir(parents=True, exist_ok=True)
        log.debug("services: blob=%s directory=%s path-info=%s", *urls)
        composition = Composition.from_urls(*urls)
        embedded_in = (
            data_dir if data_dir is not None and urls == local_store_urls(data_dir) else None
        )
        if embedded_in is not None:
            where = f"the data directory {data_dir}"
        elif len(set(urls)) == 1:
            where = urls[0]
        else:
            where = f"blobs {urls[0]}, directories {urls[1]}, path infos {urls[2]}"
    async with composition:
        yield Services(*composition.build_all(), where=where, data_dir=embedded_in)


def trusted_services(args: argparse.Namespace, services: Services) -> Services:
    """``services`` with the PathInfo service wrapped in a trust check when keys are given.

    For commands with ``add_trust_args(..., verify_nar=True)``.
    """
    keys = trusted_keys(args)
    if keys is None:
        if args.verify_nar:
            raise CLIError(
                "--verify-nar needs --trusted-public-keys (an unsigned NAR hash "
                "vouches for nothing)"
            )
        return services
    if not keys:
        raise CLIError("--trusted-public-keys names no key: every store path would be refused")
    checked = TrustedPathInfoService(
        services.path_infos,
        keys.values(),
        verify_nar=args.verify_nar,
        blob_service=services.blobs,
        directory_service=services.directories,
    )
    return Services(
        services.blobs, services.directories, checked, services.where, services.data_dir
    )


class StatusLine:
    """One line of status on stderr, redrawn at most every 0.1 s, only on a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self._last = 0.0
        self._start = time.monotonic()

    def rate(self, nbytes: int) -> float:
        """MB/s since the line was made."""
        return nbytes / max(time.monotonic() - self._start, 1e-6) / 1e6

    def show(self, render: Callable[[], str]) -> None:
        """Redraw the line with what ``render`` says, unless it was drawn just now."""
        now = time.monotonic()
        if self.enabled and now - self._last > 0.1:
            self._last = now
            sys.stderr.write(f"\r\x1b[K{render()}")
            sys.stderr.flush()

    def clear(self) -> None:
        """Erase the line, if it was drawn."""
        if self.enabled and self._last:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


class Progress:
    """Files and bytes written so far, on a :class:`StatusLine`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.files = 0
        self.nbytes = 0
        self._line = StatusLine()

    def advance(self, files: int, nbytes: int) -> None:
        """``files`` more files with ``nbytes`` more bytes were written."""
        self.files += files
        self.nbytes += nbytes
        self._line.show(
            lambda: (
                f"{self.what}: {self.files:,} files, {self.nbytes / 1e6:,.1f} MB "
                f"({self._line.rate(self.nbytes):,.0f} MB/s)"
            )
        )

    def done(self) -> None:
        """The work is over: erase the line."""
        self._line.clear()


def setup_logging(verbosity: int) -> None:
    """Log to stderr: warnings by default, info with -v, debug with -vv (or env TVIX_LOG).

    grpc's own logging (its C core) is shown only with -vvv (see :mod:`tvix.cli`).
    """
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
    except UsageError as e:
        print(f"{prog}: error: {e} (see {prog} --help)", file=sys.stderr)
        return 2
    except (CLIError, CastoreError, StoreError, NixCompatError, OSError) as e:
        log.debug("failure", exc_info=True)
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
