"""``tvix-store`` commands in separate processes on the embedded default store, judged by Nix."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fixtures import Closure
from tests.support.nix import Nix
from tests.support.services import Run
from tests.support.trees import make_tree

pytestmark = [pytest.mark.e2e, pytest.mark.nix]


def test_help(tvix_store: Run) -> None:
    out = tvix_store("--help").stdout.decode()
    for command in ("import", "path-info", "dump-path", "cat", "ls"):
        assert command in out
    assert "BLOB_SERVICE_ADDR" in tvix_store("import", "--help").stdout.decode()


def test_import_and_read_back(tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path) -> None:
    tree = make_tree(tmp_path / "tree")
    single = tmp_path / "hello.txt"
    single.write_bytes(b"hello\n")
    out = tvix_store("import", tree, single).stdout.decode().split()
    assert out == [nix.add(tree), nix.add(single)]
    store_path = out[0]
    # Everything below went to the data directory and survives the process.
    assert (data_dir / "pathinfo.sqlite").exists()

    assert tvix_store("dump-path", store_path).stdout == nix.dump(tree)
    assert tvix_store("dump-path", store_path + "/nested").stdout == nix.dump(tree / "nested")

    info = json.loads(tvix_store("path-info", "--json", store_path).stdout)[0]
    want = nix.path_info_json(store_path)
    assert info["path"] == want["path"]
    assert info["narHash"] == want["narHash"]
    assert info["narSize"] == want["narSize"]
    assert info["references"] == want["references"]
    assert info["ca"] == want["ca"]
    text = tvix_store("path-info", store_path).stdout.decode()
    assert f"NarSize: {want['narSize']}" in text
    sha = base64.b64decode(want["narHash"].removeprefix("sha256-"))
    assert sha.hex() in [nix.to_base16("sha256", text.split("NarHash: sha256:")[1].split()[0])[0]]

    assert tvix_store("cat", store_path + "/nested/deeper/deepest/leaf").stdout == (
        bytes(range(256)) * 3
    )
    # A non-UTF-8 sub path, passed as the raw bytes of argv.
    raw = os.fsdecode(os.fsencode(store_path) + b"/\xff\xfe-latin1-\xe9/f\xe9")
    assert tvix_store("cat", raw).stdout == b"non-utf8 names"

    listing = tvix_store("ls", store_path).stdout.split(b"\n")
    assert b"regular.txt" in listing
    assert b"\xff\xfe-latin1-\xe9" in listing
    long = tvix_store("ls", "-l", store_path).stdout.decode(errors="replace")
    assert "-r-xr-xr-x" in long  # exec.sh
    assert "link -> regular.txt" in long


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cat", "/nix/store/00000000000000000000000000000000-nope"), "is not in the store"),
        (("path-info", "/nix/store/00000000000000000000000000000000-nope"), "is not in the store"),
        (("cat", "/nix/store/short-nope"), "hash"),
        (("cat", "/tmp/not-a-store-path"), "not in the store"),
    ],
)
def test_missing_path(tvix_store: Run, args: tuple[str, ...], message: str) -> None:
    proc = tvix_store(*args, check=False)
    assert proc.returncode == 1
    err = proc.stderr.decode()
    assert err.startswith("tvix-store: error: ")
    assert message in err
    assert err.count("\n") == 1


def test_missing_sub_path_and_kind_errors(tvix_store: Run, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", big_size=10)
    store_path = tvix_store("import", tree).stdout.decode().strip()
    proc = tvix_store("cat", store_path + "/nope", check=False)
    assert proc.returncode == 1
    assert "/nope does not exist" in proc.stderr.decode()
    proc = tvix_store("cat", store_path + "/nested", check=False)
    assert "is a directory" in proc.stderr.decode()
    proc = tvix_store("ls", store_path + "/regular.txt/x", check=False)
    assert "is not a directory" in proc.stderr.decode()


def test_import_errors(tvix_store: Run, tmp_path: Path) -> None:
    tree = tmp_path / "t"
    tree.mkdir()
    os.mkfifo(tree / "fifo")
    proc = tvix_store("import", tree, check=False)
    assert proc.returncode == 1
    assert "fifo: unsupported file type (FIFO)" in proc.stderr.decode()
    proc = tvix_store("import", tmp_path / "missing", check=False)
    assert proc.returncode == 1
    assert "missing" in proc.stderr.decode()


def test_explicit_memory_services(tvix_store: Run, nix: Nix, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    env = {
        "BLOB_SERVICE_ADDR": "memory://",
        "DIRECTORY_SERVICE_ADDR": "memory://",
        "PATH_INFO_SERVICE_ADDR": "memory://",
    }
    assert tvix_store("import", f, env=env).stdout.decode().strip() == nix.add(f)
    proc = tvix_store("import", f, env={"BLOB_SERVICE_ADDR": "bogus://"}, check=False)
    assert proc.returncode == 1
    assert "unknown scheme 'bogus'" in proc.stderr.decode()


def test_store_composition(tvix_store: Run, nix: Nix, tmp_path: Path) -> None:
    comp = tmp_path / "store.toml"
    comp.write_text(
        f"""
[blobservices.default]
type = "objectstore"
url = "objectstore+file://{tmp_path}/blobs"

[directoryservices.default]
type = "sqlite"
path = "meta/dirs.sqlite"

[pathinfoservices.default]
type = "cache"
near = "recent"
far = "db"
[pathinfoservices.recent]
type = "lru"
capacity = 10
[pathinfoservices.db]
type = "sqlite"
path = "meta/pathinfo.sqlite"
"""
    )
    (tmp_path / "meta").mkdir()
    tree = make_tree(tmp_path / "tree", big_size=100)
    store_path = tvix_store("import", "--store-composition", comp, tree).stdout.decode().strip()
    assert store_path == nix.add(tree)
    # Relative paths resolve next to the composition file.
    assert (tmp_path / "meta" / "pathinfo.sqlite").exists()
    env = {"TVIX_STORE_COMPOSITION": str(comp)}
    assert tvix_store("dump-path", store_path, env=env).stdout == nix.dump(tree)

    comp.write_text('[blobservices.default]\ntype = "memory"\nfoo = 1\n')
    proc = tvix_store("import", "--store-composition", comp, tree, check=False)
    assert proc.returncode == 1
    assert "blobservices.default: unknown key 'foo'" in proc.stderr.decode()


def test_no_command_prints_the_commands_and_exits_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "tvix.cli.store"], capture_output=True, timeout=60)
    assert proc.returncode == 2
    err = proc.stderr.decode()
    for command in ("daemon", "import", "copy", "path-info", "dump-path", "mount"):
        assert command in err


def test_verbose_after_the_command(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "tvix.cli.store", "path-info", "-vv",
            "--data-dir", str(tmp_path), "/nix/store/" + "0" * 32 + "-x",
        ],
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert b" DEBUG " in proc.stderr


def test_list_path_info_sizes_and_closures_as_nix(tvix_store: Run, closure: Closure) -> None:
    """``list``/``path-info`` with -r/-s/-S print what ``nix path-info -rsS`` prints."""
    tvix_store(
        "copy", "--from", closure.cache_url("none"), "--trusted-public-keys", closure.public,
        closure.built, closure.flat,
    )  # fmt: skip
    nix_out = closure.nix.run(
        "nix", "--extra-experimental-features", "nix-command", "path-info", "-rsS", closure.built
    ).stdout.decode()
    want = {line.split()[0]: line.split()[1:] for line in nix_out.splitlines()}
    got_lines = tvix_store("path-info", "-rsS", closure.built).stdout.decode().splitlines()
    assert {line.split()[0]: line.split()[1:] for line in got_lines} == want
    listed = tvix_store("list").stdout.decode().split()
    assert sorted(listed) == sorted([*want, closure.flat])
    human = tvix_store("list", "-s", "-h", closure.tree).stdout.decode()
    assert human.split()[1].endswith(("K", "M"))
    as_json = json.loads(tvix_store("list", "--json", "-r", closure.built).stdout)
    assert {p["path"]: p["closureSize"] for p in as_json} == {
        path: int(sizes[1]) for path, sizes in want.items()
    }
    # The present paths are printed even when one is not; the missing one is an error.
    missing = "/nix/store/" + "0" * 32 + "-missing"
    proc = tvix_store("path-info", "-s", closure.tree, missing, check=False)
    assert proc.returncode == 1
    assert proc.stdout.decode().split()[0] == closure.tree
    assert f"{missing} is not in the store" in proc.stderr.decode()


def test_info_counts_what_is_shared(tvix_store: Run, tmp_path: Path) -> None:
    for name in ("a", "b"):
        tree = tmp_path / name
        tree.mkdir()
        (tree / "shared").write_bytes(b"the same bytes in both trees\n" * 1000)
        (tree / "own").write_text(name)
    tvix_store("import", tmp_path / "a", tmp_path / "b")
    out = tvix_store("info").stdout.decode()
    assert "store paths:         2" in out
    assert "files:               4 " in out
    assert "distinct blobs:      3 " in out
    assert "deduplication:       1.99x" in out or "deduplication:       2.00x" in out
    assert "bytes stored:" in out


def _on_a_terminal(args: list[str | Path], env: dict[str, str]) -> tuple[int, bytes]:
    """``tvix-store ARGS`` with stderr on a pseudo-terminal: its exit code and what it showed."""
    import pty

    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tvix.cli.store", *map(str, args)],
            stderr=secondary, stdout=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break  # EIO: the process closed the terminal (it ended)
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
    return proc.wait(timeout=120), seen


def test_verify_shows_progress_only_on_a_terminal(
    tvix_store: Run, tmp_path: Path, data_dir: Path
) -> None:
    tree = make_tree(tmp_path / "tree", big_size=8 << 20)
    tvix_store("import", tree)
    env = {**os.environ, "TVIX_STORE_DATA_DIR": str(data_dir)}
    returncode, seen = _on_a_terminal(["verify"], env)
    assert returncode == 0
    assert b"verifying: 1 store paths" in seen, seen
    assert b"MB checked" in seen
    quiet = tvix_store("verify")
    assert b"verifying:" not in quiet.stderr
    assert b"verified 1 store paths: all intact" in quiet.stderr


def test_copy_progress_counts_bytes_as_they_stream(
    tvix_store: Run, nix: Nix, tmp_path: Path, data_dir: Path
) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as f:
        for _ in range(96):
            f.write(os.urandom(1 << 20))
    path = nix.add(big)
    cache = tmp_path / "cache"
    nix.copy_to_file_cache(path, cache)
    big.unlink()
    args: list[str | Path] = ["copy", "--no-check-sigs", "--from", f"file://{cache}", path]
    env = {**os.environ, "TVIX_STORE_DATA_DIR": str(data_dir)}
    returncode, seen = _on_a_terminal(args, env)
    assert returncode == 0, seen
    # While the one path streams (0 of 1 done, more may be found): the bytes grow.
    streaming = re.findall(rb"copying: 0/1\+ paths, ([\d,.]+) MB", seen)
    sizes = [float(m.replace(b",", b"")) for m in streaming]
    assert len(set(sizes)) >= 3, seen
    assert sizes == sorted(sizes)
    assert sizes[-1] > 0
    assert sizes[-1] <= 100.7  # the NAR: 96 MiB and its framing (all
    # of it may be counted before the path is done)
    assert b"copied 1 store paths (100.7 MB of NAR)" in seen

    # Not on a terminal: the report line, and no progress.
    again = tmp_path / "again"
    quiet = tvix_store(*args, env={"TVIX_STORE_DATA_DIR": str(again)})
    assert b"copying:" not in quiet.stderr
    assert b"\r" not in quiet.stderr
    assert quiet.stderr.startswith(b"tvix-store: copied 1 store paths"), quiet.stderr


def test_import_flat_as_nix_store_add_file(tvix_store: Run, nix: Nix, tmp_path: Path) -> None:
    f = tmp_path / "tool.sh"
    f.write_bytes(b"#!/bin/sh\necho hi\n" * 3000)
    f.chmod(0o755)
    want = (
        nix.run("nix", "--extra-experimental-features", "nix-command", "store", "add-file", f)
        .stdout.decode()
        .strip()
    )
    got = tvix_store("import", "--flat", f).stdout.decode().strip()
    assert got == want
    assert tvix_store("dump-path", got).stdout == nix.dump(nix.store_file(want))
    info = json.loads(tvix_store("path-info", "--json", got).stdout)[0]
    assert info["ca"].startswith("fixed:sha256:")
    assert tvix_store("import", "--flat", tmp_path, check=False).returncode == 1
