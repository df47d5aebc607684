"""Find the node at ``/nix/store/<hash>-<name>/sub/path``."""

from __future__ import annotations

import os

from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import StorageError
from tvix.castore.nodes import DirectoryNode, Node
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import NotFoundError
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["NotFoundError", "parse_path", "resolve"]


def parse_path(text: str) -> tuple[StorePath, list[bytes]]:
    """Split ``/nix/store/<hash>-<name>[/sub/path]`` (or ``<hash>-<name>[/...]``).

    Raises :class:`~tvix.nixcompat.errors.InvalidStorePathError` naming the problem.
    """
    if not text.startswith("/"):
        text = "/nix/store/" + text
    store_path, sub = StorePath.from_absolute_path_full(os.fsencode(text))
    return store_path, [c for c in sub.split(b"/") if c and c != b"."]


async def resolve(
    path_infos: PathInfoService, directories: DirectoryService, text: str
) -> tuple[PathInfo, Node]:
    """The PathInfo of the store path in ``text`` and the node its sub path names.

    Symlinks inside the store path are not followed. Raises
    :class:`NotFoundError` when the store path or the sub path does not exist.
    """
    store_path, components = parse_path(text)
    info = await path_infos.get(store_path.digest)
    if info is None or info.store_path != store_path:
        raise NotFoundError(f"{store_path} is not in the store")
    node: Node = info.node
    walked = store_path.absolute_path
    for component in components:
        if not isinstance(node, DirectoryNode):
            raise NotFoundError(f"{walked} is not a directory")
        directory = await directories.get(node.digest)
        if directory is None:
            raise StorageError(f"Directory {node.digest.hex()} of {walked} is missing")
        child = next((n for n in directory.nodes() if n.name == component), None)
        walked += "/" + component.decode(errors="surrogateescape")
        if child is None:
            raise NotFoundError(f"{walked} does not exist")
        node = child
    return info, node
