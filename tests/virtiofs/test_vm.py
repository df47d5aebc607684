"""``tvix-store virtiofs`` serving real micro-VMs (QEMU, a Debian kernel, busybox).

One backend process, fetching from a ``tvix-store daemon`` over gRPC (so every
store path the guest sees is fetched on demand from a remote store), serves
two VMs one after the other; the first checks what the issue asks for
(nested directories, exec bits, symlinks, empty files, a file of many chunks
read at offsets and whole, the root listed with ``--list-root``, a missing
store path, the digests as extended attributes, read with Debian's getfattr,
and ``statfs`` telling the store's size), the second that the backend
serves the next VM (one with two request queues). See
:mod:`tests.support.microvm` for the guest.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest

from tests.support.daemons import TVIX_STORE, cli_env, daemon, tvix_store
from tests.support.microvm import VmAssets, assets, missing_tools, run_vm
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.digest import EMPTY_BLOB_DIGEST, B3Digest
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.castore.nodes import DirectoryNode
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import from_url as path_info_service

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MISSING = "00000000000000000000000000000000-missing"
BLOB_XATTR = "user.tvix.castore.blob.digest"
DIRECTORY_XATTR = "user.tvix.castore.directory.digest"
# Offsets and lengths of reads of big.bin, in dd blocks: (block size, skip, count).
READS = ((65536, 40, 3), (1000, 777, 5), (4096, 0, 1), (65536, 0, 100))


@pytest.fixture(scope="module")
def vm() -> VmAssets:
    missing = missing_tools()
    if missing:
        pytest.skip(f"cannot boot a VM: install {' '.join(missing)} (./dev setup does, as root)")
    return assets()


def make_tree(root: Path) -> Path:
    """Every kind of entry the guest must see right."""
    root.mkdir(parents=True)
    (root / "plain.txt").write_bytes(b"hello\n")
    exe = root / "exec.sh"
    exe.write_bytes(b"#!/bin/sh\necho exec-ok\n")
    exe.chmod(0o755)
    (root / "group-x").write_bytes(b"only the owner's x bit counts")
    (root / "group-x").chmod(0o654)
    (root / "empty").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "link").symlink_to("plain.txt")
    (root / "dirlink").symlink_to("nested")
    (root / "abs-dangling").symlink_to("/nonexistent/target")
    deep = root / "nested" / "deeper" / "deepest"
    deep.mkdir(parents=True)
    (deep / "leaf").write_bytes(bytes(range(256)) * 3)
    (root / "nested" / "a").write_bytes(b"lower")
    # Random: about a dozen chunks of 256 KiB on average, none alike.
    (root / "big.bin").write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    return root


def expected_listing(tree: Path, name: str) -> set[str]:
    """What the guest's listing must say: modes as the store has them."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(tree):
        for entry in dirnames + filenames:
            path = Path(dirpath) / entry
            shown = "./" + name + "/" + str(path.relative_to(tree))
            if path.is_symlink():
                out.add(f"l 777 {os.readlink(path)} {shown}")
            elif path.is_dir():
                out.add(f"d 555 - {shown}")
            else:
                data = path.read_bytes()
                mode = "555" if path.stat().st_mode & 0o100 else "444"
                out.add(f"f {mode} {len(data)} {hashlib.sha256(data).hexdigest()} {shown}")
    out.add(f"d 555 - ./{name}")
    return out


LIST = """
find . -mindepth 1 | while read -r p; do
  if [ -L "$p" ]; then echo "@@ L l $(stat -c %a "$p") $(readlink "$p") $p"
  elif [ -d "$p" ]; then echo "@@ L d $(stat -c %a "$p") - $p"
  else echo "@@ L f $(stat -c %a "$p") $(stat -c %s "$p") $(sha256sum < "$p" | cut -d' ' -f1) $p"
  fi
done
"""


def first_boot_script(name: str) -> str:
    reads = "".join(
        f'echo "@@ R {bs} {skip} {count} '
        f"$(dd if={name}/big.bin bs={bs} skip={skip} count={count} 2>/dev/null "
        f'| sha256sum | cut -d" " -f1)"\n'
        for bs, skip, count in READS
    )
    return (
        # Reads at offsets first, while nothing of the file is cached in the guest.
        reads
        + f'echo "@@ X $(./{name}/exec.sh)"\n'
        + f'echo "@@ N $(cat {name}/dirlink/deeper/deepest/leaf | sha256sum | cut -d" " -f1)"\n'
        + f'stat {MISSING} >/dev/null 2>&1; echo "@@ M $?"\n'
        + f'echo "@@ E $(cat {MISSING}/x 2>&1)"\n'
        + 'echo "@@ ROOT $(ls | tr "\\n" " ")"\n'
        # Extended attributes (Debian's getfattr in the guest: busybox has none).
        + f'echo "@@ XF $(getfattr --only-values -n {BLOB_XATTR} {name}/plain.txt)"\n'
        + f'echo "@@ XD $(getfattr --only-values -n {DIRECTORY_XATTR} {name})"\n'
        + f'echo "@@ XL $(getfattr -d -m - {name}/nested/a | grep = | cut -d= -f1)"\n'
        + f'echo "@@ XE $(getfattr --only-values -n {BLOB_XATTR} {name}/empty)"\n'
        + f"getfattr -n user.other {name}/plain.txt >/dev/null 2>&1; "
        + 'echo "@@ XM $?"\n'
        + f'echo "@@ XS $(getfattr -h -d -m - {name}/link 2>&1 | grep -c =)"\n'
        # statfs: the store's size in 512-byte blocks, its paths, nothing available.
        + 'echo "@@ DF $(stat -f -c "%b %c %a" .)"\n'
        + LIST
    )


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path, str]]:
    """A store with the tree, its daemon, and ``tvix-store virtiofs`` fetching from it."""
    tree = make_tree(tmp_path / "tree")
    data_dir = tmp_path / "store"
    out = tvix_store("import", "--data-dir", data_dir, tree).stdout.decode()
    name = out.split()[-1].rsplit("/", 1)[1]
    socket_path = tmp_path / "vfs.sock"
    with daemon(data_dir=data_dir) as (_proc, url):
        args = ["virtiofs", "--list-root", str(socket_path)]
        for kind in ("blob", "directory", "path-info"):
            args += [f"--{kind}-service-addr", url]
        proc = subprocess.Popen([*TVIX_STORE, *args], env=cli_env(), stderr=subprocess.PIPE)
        try:
            _wait_for(proc, rb"listening at")
            yield proc, socket_path, tree, name
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _wait_for(proc: subprocess.Popen[bytes], pattern: bytes, timeout: float = 30) -> None:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stderr], [], [], 1)
        if ready:
            line = proc.stderr.readline()
            seen += line
            if re.search(pattern, line):
                return
            if not line:
                break
    raise AssertionError(f"backend not ready: {seen.decode(errors='replace')}")


async def _root_node(tree: Path) -> DirectoryNode:
    """The root node ``tree`` is imported as (the import is deterministic)."""
    info = await import_path(
        MemoryBlobService(), MemoryDirectoryService(), path_info_service("memory://"), tree
    )
    assert isinstance(info.node, DirectoryNode)
    return info.node


def test_two_vms_see_the_store(
    vm: VmAssets,
    backend: tuple[subprocess.Popen[bytes], Path, Path, str],
    tmp_path: Path,
) -> None:
    proc, socket_path, tree, name = backend
    data_dir, path = tmp_path / "store", f"/nix/store/{name}"
    big = (tree / "big.bin").read_bytes()

    first = run_vm(socket_path, vm, first_boot_script(name), tmp_path)
    assert "mounted" in first.lines, first.console
    assert "guest-rc 0" in first.lines, first.console
    assert "umounted" in first.lines, first.console
    # The file of many chunks, read at offsets (before anything of it was cached).
    for (bs, skip, count), line in zip(READS, first.values("R"), strict=True):
        want = hashlib.sha256(big[bs * skip : bs * (skip + count)]).hexdigest()
        assert line == f"{bs} {skip} {count} {want}", first.console
    assert first.values("X") == ["exec-ok"]  # executable, and run from the store
    leaf = hashlib.sha256(bytes(range(256)) * 3).hexdigest()
    assert first.values("N") == [leaf]  # through a symlink to a directory
    assert first.values("M") == ["1"]
    assert "No such file or directory" in first.values("E")[0]
    assert first.values("ROOT") == [name + " "]  # --list-root
    node = asyncio.run(_root_node(tree))
    assert first.values("XF") == [str(B3Digest(blake3.blake3(b"hello\n").digest()))]
    assert first.values("XD") == [str(node.digest)]
    assert first.values("XL") == [BLOB_XATTR]
    assert first.values("XE") == [str(EMPTY_BLOB_DIGEST)]
    assert first.values("XM") == ["1"]  # getfattr: no such attribute
    assert first.values("XS") == ["0"]  # a symlink has none
    info = json.loads(tvix_store("path-info", "--json", "--data-dir", data_dir, path).stdout)
    blocks, files, available = map(int, first.values("DF")[0].split())
    assert (blocks, files, available) == (-(-info[0]["narSize"] // 512), 1, 0), first.values("DF")
    assert set(first.values("L")) == expected_listing(tree, name)

    # The backend serves the next VM on the same socket (this one with two
    # request queues: the device has three rings).
    second = run_vm(
        socket_path,
        vm,
        f'echo "@@ C $(cat {name}/plain.txt)"\necho "@@ D $(ls {name}/nested | tr "\\n" " ")"\n',
        tmp_path,
        request_queues=2,
    )
    assert second.values("C") == ["hello"], second.console
    assert second.values("D") == ["a deeper "], second.console
    assert "umounted" in second.lines

    # A clean stop on SIGTERM: exit status 0, the socket gone.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert not socket_path.exists()
    print(f"boots: {first.seconds:.1f} s, {second.seconds:.1f} s ({first.accel})")
