"""End to end: stateless daemons sharing one SeaweedFS bucket and one PostgreSQL database.

Two ``tvix-store daemon`` processes run from the same composition file. What
is written through one is read through the other; after one is killed with
SIGKILL the other still serves everything, intact. The real Nix wrote what
is copied in and judges what comes out.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support.daemons import TVIX_STORE, daemon, tvix_store
from tests.support.fixtures import Closure
from tests.support.servers import SeaweedFS
from tests.support.trees import make_tree

pytestmark = [pytest.mark.e2e, pytest.mark.nix, pytest.mark.slow]


def _composition(path: Path, s3_url: str, pg_url: str) -> Path:
    path.write_text(
        f"""
[blobservices.default]
type = "objectstore"
url = "{s3_url}"

[directoryservices.default]
type = "url"
url = "{pg_url}"

[pathinfoservices.default]
type = "url"
url = "{pg_url}"
"""
    )
    return path


def _via(url: str) -> dict[str, str]:
    return {"BLOB_SERVICE_ADDR": url, "DIRECTORY_SERVICE_ADDR": url, "PATH_INFO_SERVICE_ADDR": url}


def test_two_daemons_one_store(
    closure: Closure, weed: SeaweedFS, s3_url: str, pg_url: str, tmp_path: Path
) -> None:
    nix = closure.nix
    composition = _composition(tmp_path / "store.toml", s3_url, pg_url)
    tree = make_tree(tmp_path / "tree", big_size=3 << 20)
    with (
        daemon(composition=composition) as (first, first_url),
        daemon(composition=composition) as (_, second_url),
    ):
        # Written through the first daemon ...
        store_path = tvix_store("import", tree, env=_via(first_url)).stdout.decode().strip()
        assert store_path == nix.add(tree)
        tvix_store(
            "copy", "--from", closure.cache_url("zstd"),
            "--trusted-public-keys", closure.public, closure.built,
            env=_via(first_url),
        )  # fmt: skip
        # ... read through the second.
        assert tvix_store("dump-path", store_path, env=_via(second_url)).stdout == nix.dump(tree)
        first.send_signal(signal.SIGKILL)
        first.wait()
        # Nothing is lost with the first daemon gone: the second serves it all, intact.
        every = [store_path, closure.tree, closure.text, closure.built]
        for path in every[1:]:
            nar = tvix_store("dump-path", path, env=_via(second_url)).stdout
            assert nar == nix.dump(nix.store_file(path)), path
        verify = tvix_store("verify", *every, env=_via(second_url))
        assert "all intact" in verify.stderr.decode()
        # And the store can be copied out through the survivor, signatures checked.
        data = tmp_path / "copy"
        tvix_store(
            "copy", "--from", second_url, "--trusted-public-keys", closure.public,
            closure.built, "--data-dir", data,
        )  # fmt: skip
        nar = tvix_store("dump-path", closure.built, "--data-dir", data).stdout
        assert nar == nix.dump(nix.store_file(closure.built))


def _nar_bridge_usage() -> str:
    proc = subprocess.run(
        [
            os.environ.get("PYTHON", TVIX_STORE[0]),
            "-c",
            "import sys; from tvix.cli.nar_bridge import main; sys.exit(main())",
            "--help",
        ],
        capture_output=True,
        timeout=60,
    )
    return proc.stdout.decode()


def test_nix_downloads_from_nar_bridge_on_shared_store(
    closure: Closure, weed: SeaweedFS, s3_url: str, pg_url: str, tmp_path: Path
) -> None:
    assert "--listen-address" in _nar_bridge_usage()
    composition = _composition(tmp_path / "store.toml", s3_url, pg_url)
    with daemon(composition=composition) as (_, daemon_url):
        tvix_store(
            "copy", "--from", closure.cache_url("xz"),
            "--trusted-public-keys", closure.public, closure.built,
            env=_via(daemon_url),
        )  # fmt: skip
        env = {**os.environ, **_via(daemon_url)}
        bridge = subprocess.Popen(
            [
                TVIX_STORE[0],
                "-c",
                "import sys; from tvix.cli.nar_bridge import main; sys.exit(main())",
                "--listen-address",
                "127.0.0.1:0",
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            assert bridge.stderr is not None
            line = bridge.stderr.readline().decode()
            m = re.search(r"(http://\S+)", line)
            assert m, f"nar-bridge did not start: {line!r}"
            dest = tmp_path / "nix-dest"
            closure.nix.run(
                "nix", "copy", "--option", "trusted-public-keys", closure.public,
                "--from", m.group(1).rstrip("/"), "--to", f"local?root={dest}", closure.built,
            )  # fmt: skip
            got = closure.nix.run("nix-store", "--dump", dest / closure.built.lstrip("/")).stdout
            assert got == closure.nix.dump(closure.nix.store_file(closure.built))
        finally:
            bridge.kill()
            bridge.wait()
