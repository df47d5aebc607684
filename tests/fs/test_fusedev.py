"""Mounting through ``fusermount3``, the way every user but root mounts.

The tests run as root, which mounts with ``mount(2)``; here the same process
takes the other road on purpose: ``fusermount3`` mounts and hands the device
back over a socket, and ``fusermount3 -u -z`` unmounts, ending the serving.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

import pytest

from tests.fs.mounting import force_unmount, is_mounted, mount_options
from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice.memory import MemoryDirectoryService
from tvix.fs import StoreFs
from tvix.fs.fusedev import DeviceError, open_mount, serve_device, unmount
from tvix.store.importer import import_path
from tvix.store.pathinfoservice import from_url as path_info_service

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("fusermount3") is None, reason="needs fusermount3 (fuse3)"),
]


def test_mount_serve_and_unmount_through_fusermount3(tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", big_size=200_000)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    served = threading.Event()
    names: list[str] = []
    errors: list[BaseException] = []

    async def main() -> None:
        blobs, directories = MemoryBlobService(), MemoryDirectoryService()
        path_infos = path_info_service("memory://")
        info = await import_path(blobs, directories, path_infos, tree)
        names.append(info.store_path.base_name)
        fs = StoreFs(blobs, directories, path_infos)
        fd = open_mount(str(mountpoint), fusermount=True)
        try:
            served.set()
            # Returns when the mount is gone: nothing sets this event.
            await serve_device(fs, fd, workers=4, stop=asyncio.Event())
        finally:
            os.close(fd)
            await fs.close()

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as e:
            errors.append(e)
        finally:
            served.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert served.wait(30), "not mounted within 30 s"
        assert not errors, errors
        assert is_mounted(mountpoint)
        options = mount_options(mountpoint)
        assert {"ro", "nosuid", "nodev"} <= set(options), options
        root = mountpoint / names[0]
        assert (root / "big.bin").read_bytes() == (tree / "big.bin").read_bytes()
        assert sorted(os.listdir(root)) == sorted(os.listdir(tree))
        unmount(str(mountpoint), fusermount=True)
        thread.join(30)
        assert not thread.is_alive(), "serving did not end when fusermount3 unmounted"
        assert not errors, errors
        assert not is_mounted(mountpoint)
    finally:
        force_unmount(mountpoint)


def test_fusermount3_refusal_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DeviceError) as e:
        open_mount(str(tmp_path / "absent"), fusermount=True)
    message = str(e.value)
    assert "\n" not in message
    assert "absent" in message or "No such file" in message, message
