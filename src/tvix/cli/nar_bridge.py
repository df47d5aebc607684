"""``nar-bridge``: the store as a Nix HTTP binary cache, for downloads and uploads."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tvix import __version__
from tvix.cli.common import CLIError, add_service_args, open_services, run, setup_logging
from tvix.nar_bridge import BasicAuth, NarBridge, load_credentials
from tvix.nar_bridge.compression import COMPRESSIONS, resolve_compression
from tvix.nar_bridge.nar_files import FILE_NAME, NarFiles
from tvix.nar_bridge.site import build_app
from tvix.nixcompat.errors import InvalidKeyError
from tvix.nixcompat.signing import SigningKey

PROG = "nar-bridge"
DEFAULT_LISTEN = "[::1]:9000"
# Seconds a connection has to send the headers of a request (see serve()).
HEADER_TIMEOUT = 30.0


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen: a TCP host and port, or a unix socket path."""

    host: str | None = None
    port: int = 0
    unix_path: str | None = None

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """``HOST:PORT``, ``[V6]:PORT`` or ``unix:///path``; raises :class:`CLIError`."""
        if text.startswith("unix://"):
            path = text.removeprefix("unix://")
            if not path.startswith("/"):
                raise CLIError(f"--listen-address {text!r}: a unix socket path must be absolute")
            return cls(unix_path=path)
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise CLIError(
                f"--listen-address {text!r}: expected HOST:PORT, [IPV6]:PORT or unix:///PATH"
            )
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise CLIError(f"--listen-address {text!r}: put an IPv6 address in brackets")
        return cls(host=host, port=int(port))

    @property
    def local(self) -> bool:
        """Whether only this machine can connect: a unix socket, ``localhost`` or a loopback IP."""
        if self.host is None or self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: it may well be reached over a network


def _site(runner: web.AppRunner, address: ListenAddress) -> web.BaseSite:
    if address.unix_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.unix_path)
        return web.UnixSite(runner, address.unix_path)
    return web.TCPSite(runner, address.host, address.port, reuse_address=True)


def default_state_dir() -> Path:
    """``$XDG_STATE_HOME/tvix-store/nar-bridge``, else ``~/.local/state/tvix-store/nar-bridge``."""
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "tvix-store" / "nar-bridge"


def _bound_urls(runner: web.AppRunner) -> list[str]:
    urls = []
    for addr in runner.addresses:
        if isinstance(addr, str):
            urls.append(f"unix://{addr}")
        else:
            host, port = addr[0], addr[1]
            urls.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    return urls


async def serve(args: argparse.Namespace) -> int:
    """Serve the store as a Nix HTTP binary cache until SIGINT or SIGTERM."""
    address = ListenAddress.parse(args.listen_address)
    signing_key = None
    if args.signing_key_file is not None:
        try:
            signing_key = SigningKey.from_file(args.signing_key_file)
        except InvalidKeyError as e:
            raise CLIError(f"--signing-key-file {args.signing_key_file}: {e}") from None
    auth = None
    if args.upload_auth_file is not None:
        if not args.allow_upload:
            raise CLIError("--upload-auth-file only makes sense with --allow-upload")
        try:
            auth = BasicAuth(load_credentials(args.upload_auth_file))
        except ValueError as e:
            raise CLIError(f"--upload-auth-file: {e}") from None
    async with open_services(args) as s:
        # The uploaded NAR files' URLs: beside the store when it is a data directory.
        state_dir = args.state_dir or s.data_dir or default_state_dir()
        nar_files = NarFiles(str(state_dir / FILE_NAME))
        bridge = NarBridge(
            s.blobs,
            s.directories,
            s.path_infos,
            priority=args.priority,
            signing_key=signing_key,
            allow_upload=args.allow_upload,
            upload_auth=auth,
            nar_files=nar_files,
            compression=resolve_compression(args.compression, local=address.local),
        )
        app = build_app(
            bridge,
            ui=not args.no_ui,
            stats_interval=args.stats_interval,
            # The embedded store's data directory: the counts include its size on disk.
            data_dir=str(s.data_dir) if s.data_dir is not None else None,
        )
        # keepalive_timeout is also how long a new connection has to send a
        # request's headers: aiohttp starts it when the connection is made and
        # restarts it only after a response, so a client trickling its headers
        # (slowloris), or sending nothing, is cut off after it.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=args.header_timeout,
        )
        await runner.setup()
        try:
            await _site(runner, address).start()
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            for url in _bound_urls(runner):
                # Tests and scripts wait for this line to learn the port of ":0".
                print(f"{PROG}: listening on {url}", file=sys.stderr, flush=True)
            for line in _describe(s.where, bridge, signing_key, args, address):
                print(f"{PROG}: {line}", file=sys.stderr, flush=True)
            await stop.wait()
            print(f"{PROG}: shutting down", file=sys.stderr, flush=True)
        finally:
            await runner.cleanup()
            await nar_files.close()
    return 0


def _describe(
    where: str,
    bridge: NarBridge,
    signing_key: SigningKey | None,
    args: argparse.Namespace,
    address: ListenAddress,
) -> list[str]:
    """What the bridge serves, how, and who may upload (said once, as it starts)."""
    signed = f"signed by {signing_key.name}" if signing_key is not None else "unsigned"
    lines = [f"serving {where}: narinfos {signed}, NARs compressed: {bridge.compression}"]
    if not args.allow_upload:
        lines.append("uploads: off (--allow-upload turns them on)")
    elif args.upload_auth_file is not None:
        lines.append(f"uploads: on, HTTP basic auth with the users of {args.upload_auth_file}")
    else:
        lines.append("uploads: on, without authentication")
        if not address.local:
            lines.append(
                "warning: anyone who can reach this address can add store paths "
                "(--upload-auth-file requires a password)"
            )
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The ``nar-bridge`` command line parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve a tvix store as a Nix HTTP binary cache. Narinfos are rendered from "
        "the store's PathInfos (optionally signed); NARs are rendered on the "
        "fly from the castore, at URLs that encode their root node "
        "(nar/tvix-castore/<node>?narsize=N), with byte ranges so downloads can resume. With "
        "--allow-upload, `nix copy --to http://HOST:PORT` uploads NARs (plain, xz, bzip2, "
        "gzip or zstd) and narinfos into the store.",
        epilog="Use it as a substituter: nix copy --from http://[::1]:9000 /nix/store/…, "
        "or --option substituters http://[::1]:9000. Requests are logged with -v.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log each request (-vv: debug)"
    )
    parser.add_argument(
        "--listen-address",
        default=os.environ.get("NAR_BRIDGE_LISTEN_ADDRESS", DEFAULT_LISTEN),
        metavar="ADDR",
        help="HOST:PORT, [IPV6]:PORT or unix:///PATH; port 0 picks a free port, printed on "
        f"stderr as 'listening on URL' (env NAR_BRIDGE_LISTEN_ADDRESS; default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=39,
        help="the Priority in nix-cache-info; Nix prefers caches with lower values (default 39)",
    )
    parser.add_argument(
        "--signing-key-file",
        metavar="FILE",
        help="a Nix secret key file (nix key generate-secret): every narinfo is signed with "
        "it as it is served",
    )
    parser.add_argument(
        "--allow-upload",
        action="store_true",
        help="accept PUT of NARs and narinfos (nix copy --to); otherwise PUT answers 403",
    )
    parser.add_argument(
        "--upload-auth-file",
        default=os.environ.get("NAR_BRIDGE_UPLOAD_AUTH_FILE"),
        metavar="FILE",
        help="require HTTP basic auth for uploads, with the user:password lines of FILE "
        "(Nix sends them from its netrc file); reads stay open "
        "(env NAR_BRIDGE_UPLOAD_AUTH_FILE)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=os.environ.get("NAR_BRIDGE_STATE_DIR") or None,
        metavar="DIR",
        help=f"where {FILE_NAME} keeps the URLs uploaded NAR files were accepted under (Nix "
        "asks for them again: it caches the narinfos it uploaded), across restarts "
        "(env NAR_BRIDGE_STATE_DIR; default: the data directory when the store is one, else "
        "$XDG_STATE_HOME/tvix-store/nar-bridge or ~/.local/state/tvix-store/nar-bridge)",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=HEADER_TIMEOUT,
        metavar="SECONDS",
        help="close a connection that has not sent a request's headers this long after it "
        "was opened or after its last response: idle and trickling (slowloris) clients "
        f"(default {HEADER_TIMEOUT:g})",
    )
    parser.add_argument(
        "--compression",
        choices=("auto", *COMPRESSIONS),
        default="auto",
        help="compress the NARs narinfos point at, on the fly (their uncompressed URLs keep "
        "serving byte ranges). auto (the default): none when listening on loopback or a unix "
        "socket only, where compressing doubles the time, else zstd (3.5x smaller at ~100 MB/s "
        "of NAR, faster on links below ~800 Mbit/s); xz is slow (~15 MB/s)",
    )
    parser.add_argument(
        "--no-ui",
        action="store_true",
        help="do not serve the read-only store browser at / and /ui/ (the cache and /metrics stay)",
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="recount the store (for the browser's front page and the tvix_store_* metrics) "
        "in the background when the last count is older than this (default 300)",
    )
    add_service_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The ``nar-bridge`` command: parse ``argv``, serve, return the exit code."""
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run(PROG, lambda: serve(args))


if __name__ == "__main__":
    sys.exit(main())
