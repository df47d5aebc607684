"""Session fixtures for tests against real servers: one SeaweedFS and one PostgreSQL per session,
isolated per test, and a closure built by the real Nix in binary caches served over HTTP.

The servers start on first use and stop at the end of the session (also
when tests fail). Each test gets a fresh bucket prefix or database schema,
so tests never see each other's data and no server is restarted.
"""

from __future__ import annotations

import functools
import http.server
import itertools
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.nix import Nix
from tests.support.servers import PostgreSQL, SeaweedFS, postgresql, seaweedfs
from tests.support.trees import make_tree
from tvix.nixcompat.signing import SigningKey

_counter = itertools.count()


@pytest.fixture(scope="session")
def weed() -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 server; the S3 credentials are put into this process's environment."""
    with seaweedfs() as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgreSQL]:
    """A PostgreSQL server (superuser ``postgres``, trust auth on 127.0.0.1)."""
    with postgresql() as server:
        yield server


@pytest.fixture
def s3_url(weed: SeaweedFS) -> str:
    """An ``objectstore+s3://`` URL of a prefix no other test uses."""
    return weed.url(f"t{os.getpid()}-{next(_counter)}")


@pytest.fixture
def pg_url(pg: PostgreSQL) -> str:
    """A ``postgresql://`` URL with a schema no other test uses."""
    return pg.dsn() + f"?schema=t{next(_counter)}"


# -- a Nix closure in binary caches, served over HTTP -------------------------------------------

COMPRESSIONS = ("none", "xz", "zstd", "bzip2")


@dataclass
class Closure:
    """A small closure built by the real Nix, copied into one binary cache per compression.

    ``tree`` (content-addressed, NAR sha256, a directory with a multi-MiB
    file), ``flat`` (content-addressed, flat), ``text`` (text, refers to
    ``tree``) and ``built`` (input-addressed, has a Deriver, refers to
    ``tree``, ``text`` and itself). Every narinfo is signed by ``secret``.
    """

    nix: Nix
    tree: str
    flat: str
    text: str
    built: str
    secret: SigningKey
    secret_file: Path
    public: str
    caches: dict[str, Path]
    http_root: Path
    http_url: str
    reference_graph: Path

    @property
    def paths(self) -> list[str]:
        return [self.tree, self.flat, self.text, self.built]

    def cache_url(self, compression: str) -> str:
        """The http:// URL of the cache with NARs compressed by ``compression``."""
        return f"{self.http_url}/{self.caches[compression].name}"

    def copy_cache(self, compression: str, name: str) -> tuple[Path, str]:
        """A private, served copy of a cache (to tamper with): its directory and URL."""
        target = self.http_root / name
        shutil.copytree(self.caches[compression], target)
        return target, f"{self.http_url}/{name}"


def _reference_graph(nix: Nix, path: str, target: Path) -> Path:
    """The ``.attrs.json`` of a ``__structuredAttrs`` build exporting the closure of ``path``."""
    # With structured attrs the builder gets no environment: it sources .attrs.sh.
    # The final `exit $?` keeps bash from exec'ing cp as its last command: the
    # sandbox then often reports the build as killed by signal 9 (seen with 2.8).
    expr = (
        'derivation { name = "graph"; system = builtins.currentSystem; builder = "/bin/bash"; '
        "__structuredAttrs = true; "
        f"exportReferencesGraph.closure = [ (builtins.storePath {path}) ]; "
        'args = [ "-c" "source .attrs.sh; /bin/cp .attrs.json \\${outputs[out]}; exit $?" ]; }'
    )
    out = nix.run("nix-build", "--store", nix.store, "--no-out-link", "--expr", expr)
    target.write_bytes(nix.store_file(out.stdout.decode().split()[-1]).read_bytes())
    return target


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def closure(nix: Nix, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Closure]:
    work = tmp_path_factory.mktemp("closure")
    tree = make_tree(work / "fixture-tree", big_size=2 << 20)
    flat_file = work / "fixture-flat.txt"
    flat_file.write_bytes(b"flat contents\n")
    tree_path = nix.add(tree)
    flat_path = nix.add_fixed(flat_file)
    text_path = nix.add_text("fixture-text", "refers to the tree", [tree_path])
    built = nix.build("fixture-built", [tree_path, text_path])
    graph = _reference_graph(nix, built, work / "attrs.json")
    secret_text, public = nix.generate_key("scale-test-1")
    secret_file = work / "secret-key"
    secret_file.write_text(secret_text)
    root = work / "http"
    root.mkdir()
    caches = {}
    for compression in COMPRESSIONS:
        cache = root / f"cache-{compression}"
        nix.copy_to_file_cache(built, cache, secret_file, compression)
        nix.copy_to_file_cache(flat_path, cache, secret_file, compression)
        caches[compression] = cache
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Closure(
            nix,
            tree_path,
            flat_path,
            text_path,
            built,
            SigningKey.parse(secret_text),
            secret_file,
            public,
            caches,
            root,
            f"http://127.0.0.1:{server.server_address[1]}",
            graph,
        )
    finally:
        server.shutdown()
        server.server_close()
