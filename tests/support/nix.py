"""The real Nix (Debian's nix-bin, 2.8) as the authority in tests, isolated.

Every :class:`Nix` has its own configuration, state, caches and a chroot
store under one temporary directory: it
never reads ``/etc/nix`` and never writes to ``/nix``. Logical store paths
stay ``/nix/store/...``, so hashes are the real ones.

The session fixture ``nix`` is available everywhere (``tests/conftest.py``
imports it); mark the tests ``@pytest.mark.nix``. The fixture fails (it does not
skip) when nix is not installed: the test command installs it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

__all__ = ["Nix", "NixError", "nix"]

_TOOLS = ("nix", "nix-store", "nix-hash")
# Lets a chroot-store build run /bin/sh in the sandbox it forces on.
_SANDBOX_PATHS = "/bin=/usr/bin /usr /lib=/usr/lib /lib64=/usr/lib64"


class NixError(AssertionError):
    """A nix command failed; the message carries its command line and stderr."""


class Nix:
    """An isolated Nix environment rooted at *workdir*, with one chroot store."""

    def __init__(self, workdir: Path) -> None:
        missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
        if missing:
            raise RuntimeError(
                f"the real Nix is not installed (missing {', '.join(missing)}); "
                "install Debian's nix-bin (apt-get install nix-bin) or run ./dev test"
            )
        self.workdir = workdir
        self.store_root = workdir / "store"
        #: The store URL of this environment's chroot store.
        self.store = f"local?root={self.store_root}"
        conf_dir = workdir / "etc"
        conf_dir.mkdir(parents=True, exist_ok=True)
        (conf_dir / "nix.conf").write_text("")
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("NIX_") and k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME")
        }
        env.update(
            HOME=str(workdir / "home"),
            NIX_CONF_DIR=str(conf_dir),
            NIX_USER_CONF_FILES=str(conf_dir / "nix.conf"),
            XDG_CACHE_HOME=str(workdir / "xdg-cache"),
            XDG_CONFIG_HOME=str(workdir / "xdg-config"),
            XDG_DATA_HOME=str(workdir / "xdg-data"),
            NIX_STATE_DIR=str(workdir / "state"),
            NIX_LOG_DIR=str(workdir / "log"),
            NIX_CONFIG="\n".join(
                [
                    "experimental-features = nix-command",
                    f"store = {self.store}",
                    "substituters =",
                    "trusted-public-keys =",
                    "require-sigs = true",
                    "build-users-group =",
                    "narinfo-cache-negative-ttl = 0",
                    "narinfo-cache-positive-ttl = 0",
                    "connect-timeout = 10",
                    "download-attempts = 1",
                    "fsync-metadata = false",
                    f"sandbox-paths = {_SANDBOX_PATHS}",
                ]
            ),
        )
        (workdir / "home").mkdir(exist_ok=True)
        #: The environment every command runs with.
        self.env = env

    # -- running commands --

    def run(
        self, *args: str | os.PathLike[str], input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a command (e.g. ``"nix-store", "--dump", path``) in this environment.

        Output is captured. With *check*, a non-zero exit raises
        :class:`NixError` showing the command and its stderr.
        """
        argv = [os.fspath(a) for a in args]
        proc = subprocess.run(
            argv, env=self.env, input=input, capture_output=True, check=False, timeout=120
        )
        if check and proc.returncode != 0:
            raise NixError(
                f"{' '.join(argv)} exited {proc.returncode}:\n"
                f"{proc.stderr.decode(errors='replace')}"
            )
        return proc

    def _out(self, *args: str | os.PathLike[str]) -> str:
        return self.run(*args).stdout.decode().strip()

    # -- NARs and hashes --

    def dump(self, path: str | os.PathLike[str]) -> bytes:
        """``nix-store --dump PATH``: the NAR bytes of a local path."""
        return self.run("nix-store", "--dump", path).stdout

    def hash_path(self, path: str | os.PathLike[str]) -> str:
        """The nixbase32 sha256 of the NAR of *path* (``nix-hash --type sha256 --base32``)."""
        return self._out("nix-hash", "--type", "sha256", "--base32", path)

    def to_base32(self, algo: str, *hex_digests: str) -> list[str]:
        """``nix-hash --to-base32``: the nixbase32 spelling of each hex digest."""
        return self._out("nix-hash", "--type", algo, "--to-base32", *hex_digests).split()

    def to_base16(self, algo: str, *nix32_digests: str) -> list[str]:
        """``nix-hash --to-base16``: the hex spelling of each nixbase32 digest."""
        return self._out("nix-hash", "--type", algo, "--to-base16", *nix32_digests).split()

    # -- adding to the store --

    def add(self, path: str | os.PathLike[str]) -> str:
        """``nix-store --add PATH`` (recursive, named after the basename): the store path."""
        return self._out("nix-store", "--store", self.store, "--add", path)

    def add_fixed(
        self, path: str | os.PathLike[str], recursive: bool = False, algo: str = "sha256"
    ) -> str:
        """``nix-store --add-fixed [--recursive] ALGO PATH``: the store path."""
        flags = ["--recursive"] if recursive else []
        return self._out("nix-store", "--store", self.store, "--add-fixed", *flags, algo, path)

    def add_path_dry_run(
        self, name: str, path: str | os.PathLike[str]
    ) -> subprocess.CompletedProcess[bytes]:
        """``nix store add-path --dry-run --store dummy:// -n NAME PATH``, unchecked."""
        return self.run(
            "nix",
            "store",
            "add-path",
            "--dry-run",
            "--store",
            "dummy://",
            "-n",
            name,
            path,
            check=False,
        )

    def add_text(self, name: str, content: str, references: Iterable[str] = ()) -> str:
        """Add a text path (``builtins.toFile``) whose content mentions *references*.

        The references are spliced into *content* (one per line after it),
        so Nix records them. Returns the store path.
        """
        refs = "".join(f"\n${{builtins.storePath {ref}}}" for ref in references)
        expr = f'builtins.toFile {json.dumps(name)} {_nix_string(content)[:-1]}{refs}"'
        return self._out("nix", "eval", "--impure", "--raw", "--store", self.store, "--expr", expr)

    def build(self, name: str, references: Sequence[str] = (), self_reference: bool = True) -> str:
        """Build an input-addressed path (it has a Deriver) referring to *references*
        and, with *self_reference*, to itself. Returns the output path.
        """
        script = "echo built > $out" + ("; echo $out >> $out" if self_reference else "")
        # Interpolating builtins.storePath is what makes Nix record a reference.
        script += "".join(f"; echo ${{builtins.storePath {ref}}} >> $out" for ref in references)
        expr = (
            f"derivation {{ name = {json.dumps(name)}; system = builtins.currentSystem; "
            f'builder = "/bin/sh"; PATH = "/bin"; args = [ "-c" "{script}" ]; }}'
        )
        return self._out(
            "nix-build", "--store", self.store, "--no-out-link", "--expr", expr
        ).splitlines()[-1]

    def store_file(self, store_path: str) -> Path:
        """Where *store_path* (``/nix/store/...``) lives on disk in the chroot store."""
        return self.store_root / store_path.lstrip("/")

    def path_info_json(self, store_path: str, store: str | None = None) -> dict[str, Any]:
        """``nix path-info --json STORE_PATH``: its one JSON object."""
        out = self._out("nix", "path-info", "--store", store or self.store, "--json", store_path)
        info: list[dict[str, Any]] = json.loads(out)
        assert len(info) == 1, info
        return info[0]

    # -- binary caches --

    def copy_to_file_cache(
        self,
        store_path: str,
        cache_dir: str | os.PathLike[str],
        secret_key_file: str | os.PathLike[str] | None = None,
        compression: str = "none",
    ) -> None:
        """``nix copy --to file://CACHE_DIR?compression=…[&secret-key=…]`` of a closure."""
        url = f"file://{os.fspath(cache_dir)}?compression={compression}"
        if secret_key_file is not None:
            url += f"&secret-key={os.fspath(secret_key_file)}"
        self.run("nix", "copy", "--store", self.store, "--to", url, store_path)

    def narinfo_from_file_cache(self, cache_dir: str | os.PathLike[str], store_path: str) -> bytes:
        """The raw ``<hash>.narinfo`` a file:// cache holds for *store_path*."""
        hash_part = store_path.removeprefix("/nix/store/")[:32]
        return (Path(cache_dir) / f"{hash_part}.narinfo").read_bytes()

    def verify_in_cache(
        self, cache_dir: str | os.PathLike[str], store_path: str, trusted_public_keys: str
    ) -> subprocess.CompletedProcess[bytes]:
        """``nix store verify`` of a path in a file:// cache, trusting only the given keys.

        Unchecked: exit 0 = valid and trusted, 2 = untrusted, 1 = corrupt.
        """
        return self.run(
            "nix",
            "store",
            "verify",
            "--store",
            f"file://{os.fspath(cache_dir)}",
            "--option",
            "trusted-public-keys",
            trusted_public_keys,
            store_path,
            check=False,
        )

    # -- keys --

    def generate_key(self, name: str) -> tuple[str, str]:
        """``nix key generate-secret`` + ``convert-secret-to-public``: (secret, public)."""
        secret = self.run("nix", "key", "generate-secret", "--key-name", name).stdout.decode()
        public = self.run("nix", "key", "convert-secret-to-public", input=secret.encode())
        return secret, public.stdout.decode().strip()

    def secret_to_public(self, secret: str) -> str:
        """``nix key convert-secret-to-public`` of *secret*."""
        out = self.run("nix", "key", "convert-secret-to-public", input=secret.encode()).stdout
        return out.decode().strip()


def _nix_string(s: str) -> str:
    """Quote *s* as a Nix string literal (no interpolation)."""
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    return f'"{escaped}"'


@pytest.fixture(scope="session")
def nix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nix]:
    """A session-wide isolated :class:`Nix`; fails if nix is not installed."""
    try:
        env = Nix(tmp_path_factory.mktemp("nix"))
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    yield env
    # Chroot stores contain read-only directories; make them removable.
    for root, dirs, _ in os.walk(env.store_root):
        for d in dirs:
            p = os.path.join(root, d)
            if not os.path.islink(p):
                os.chmod(p, 0o755)
