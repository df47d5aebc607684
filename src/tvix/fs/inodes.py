"""Inode numbers for the entries the kernel knows, and their lookup counts.

Strategy: an entry's inode number is derived from *where* it is, not from
what it holds: ``blake3(parent inode || name)``, truncated to 63 bits. So

* numbers are stable for the life of the mount (and across mounts of the same
  store) without remembering them: an entry the kernel forgot and looks up
  again gets the same number back, yet the table only holds the inodes the
  kernel currently knows (it drops an entry when its lookup count reaches
  zero), so memory stays bounded however many files a walk touches;
* two paths never share an inode, even when their contents are equal.
  Upstream tvix shares one inode per blob/Directory digest; that makes equal
  files look like hard links (``tar``, ``rsync -H`` and ``du`` treat them so)
  with a link count of 1, and makes equal directories aliases of one another,
  which the kernel's dentry cache does not allow (it moves the one dentry
  around). The price is that equal files are cached by the kernel once per path.

The table holds each live inode twice, by number and by place (so listing a
directory again finds its entries without hashing): with its cached
attributes, about 480 bytes per entry the kernel knows; the kernel's own
caches decide how many that is.

A 63-bit hash collides among a million live entries with a probability of
about 1e-7; when the number is held by a *live* entry with another identity,
the next number of a probe sequence is used instead. That entry's number is
then only stable while the kernel knows it, which is the guarantee the
kernel needs; everything else keeps its derived number.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import TypeAlias

import blake3

from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["ROOT_INODE", "Attr", "EntryStat", "Inode", "InodeTable", "node_stat"]

ROOT_INODE = 1
_MASK = (1 << 63) - 1
_blake3 = blake3.blake3

_DIRECTORY = stat.S_IFDIR | 0o555
_REGULAR = stat.S_IFREG | 0o444
_EXECUTABLE = stat.S_IFREG | 0o555
_SYMLINK = stat.S_IFLNK | 0o777

EntryStat: TypeAlias = tuple[int, int, int]
"""What an entry shows besides its number and owner: ``(mode, size, blocks)``."""


def node_stat(node: Node | None) -> EntryStat:
    """The mode, size and 512-byte blocks shown for ``node`` (``None``: the root).

    Directories ``0555`` sized by their node's ``size`` (no blocks), files
    ``0444`` or ``0555`` (executable), symlinks ``0777`` sized by their target.
    """
    # Called for every entry of every listing fetched: the common kinds first,
    # by exact type (nodes are final classes).
    if type(node) is FileNode:
        size = node.size
        return _EXECUTABLE if node.executable else _REGULAR, size, (size + 511) // 512
    if type(node) is DirectoryNode:
        return _DIRECTORY, node.size, 0
    if node is None:
        return _DIRECTORY, 0, 0
    assert isinstance(node, SymlinkNode)  # the third kind
    return _SYMLINK, len(node.target), 0


def derived_inode(parent: int, name: bytes, attempt: int = 0) -> int:
    """The inode number of entry ``name`` of ``parent``.

    ``attempt`` > 0: a probe after a collision. Never 0 (no inode) or 1 (the
    root).
    """
    key = parent.to_bytes(8, "little") + name
    if attempt:
        key += b"\0" + attempt.to_bytes(4, "little")
    ino = int.from_bytes(_blake3(key).digest(8), "little") & _MASK
    return ino if ino > ROOT_INODE else derived_inode(parent, name, attempt + 1)


@dataclass(frozen=True, slots=True)
class Attr:
    """The attributes of one inode (timestamps and link count are the same for all)."""

    ino: int
    mode: int
    size: int
    blocks: int
    uid: int
    gid: int


class Inode:
    """An entry the kernel knows: where it is, what it is, how often it was looked up.

    ``node`` is ``None`` for the root (the directory of store paths); for a
    store path it is the PathInfo's root node, named after its base name.
    ``attrs`` caches the attributes the filesystem built for it (they never
    change: the content is immutable).
    """

    __slots__ = ("attrs", "ino", "name", "nlookup", "node", "parent")

    def __init__(self, ino: int, parent: int, name: bytes, node: Node | None) -> None:
        self.ino = ino
        self.parent = parent
        self.name = name
        self.node = node
        self.nlookup = 0
        self.attrs: Attr | None = None


class InodeTable:
    """The live inodes, by number. The root is always present and never forgotten."""

    def __init__(self) -> None:
        self.root = Inode(ROOT_INODE, ROOT_INODE, b"", None)
        self._inodes: dict[int, Inode] = {ROOT_INODE: self.root}
        # The same live inodes by place, so listing a directory again finds its
        # entries without deriving their numbers again.
        self._by_place: dict[tuple[int, bytes], Inode] = {}

    def __len__(self) -> int:
        return len(self._inodes)

    def get(self, ino: int) -> Inode | None:
        """The live inode ``ino``, or ``None`` when the kernel cannot know it."""
        return self._inodes.get(ino)

    def entry(self, parent: Inode, name: bytes, node: Node) -> Inode:
        """The inode of entry ``name`` (holding ``node``) of ``parent``, created if new.

        Does not count a lookup: call :meth:`remember` once the kernel has been
        told about it, or :meth:`discard` if it was not after all.
        """
        # A listing's first walk calls this once per entry: the common case
        # (a new entry, no collision) is kept to a few dictionary look-ups.
        pino = parent.ino
        place = (pino, name)
        known = self._by_place.get(place)
        if known is not None and (known.node is node or known.node == node):
            return known
        ino = int.from_bytes(_blake3(pino.to_bytes(8, "little") + name).digest(8), "little") & _MASK
        if ino > ROOT_INODE and ino not in self._inodes:
            inode = Inode(ino, pino, name, node)
            self._inodes[ino] = inode
            self._by_place[place] = inode
            return inode
        attempt = 0
        while True:
            ino = derived_inode(pino, name, attempt)
            existing = self._inodes.get(ino)
            if existing is None:
                inode = Inode(ino, parent.ino, name, node)
                self._inodes[ino] = inode
                self._by_place[parent.ino, name] = inode
                return inode
            # The node is part of the identity: a store path re-registered with
            # other contents must not reuse an inode the kernel caches as the old one.
            if existing.parent == parent.ino and existing.name == name and existing.node == node:
                return existing
            attempt += 1

    @staticmethod
    def remember(inode: Inode) -> None:
        """Count one lookup of ``inode`` (the kernel now holds a reference)."""
        inode.nlookup += 1

    def discard(self, inode: Inode) -> None:
        """Drop ``inode`` if the kernel holds no reference to it."""
        if inode.nlookup <= 0 and inode.ino != ROOT_INODE:
            self._drop(inode)

    def forget(self, ino: int, nlookup: int) -> None:
        """The kernel dropped ``nlookup`` references to ``ino``; free it at zero."""
        inode = self._inodes.get(ino)
        if inode is None or ino == ROOT_INODE:
            return
        inode.nlookup -= nlookup
        if inode.nlookup <= 0:
            self._drop(inode)

    def _drop(self, inode: Inode) -> None:
        self._inodes.pop(inode.ino, None)
        place = (inode.parent, inode.name)
        # Only if it is this inode there (after a collision probe it may be another).
        if self._by_place.get(place) is inode:
            del self._by_place[place]
