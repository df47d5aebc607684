"""``Directory``: one level of a tree, addressed by the blake3 of its encoding."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from heapq import merge
from itertools import pairwise
from operator import attrgetter
from typing import Any

import blake3

from tvix.castore._protowire import encode_varint
from tvix.castore.digest import B3Digest
from tvix.castore.errors import ValidationError
from tvix.castore.nodes import MAX_SIZE, DirectoryNode, FileNode, Node, SymlinkNode

__all__ = ["Directory"]

_by_name = attrgetter("name")


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + encode_varint(len(payload)) + payload


def _check_sorted(kind: str, nodes: tuple[Node, ...]) -> None:
    for prev, cur in pairwise(nodes):
        if not prev.name < cur.name:
            what = "duplicate name" if prev.name == cur.name else "not sorted"
            raise ValidationError(f"invalid Directory: {kind} {what}: {prev.name!r}, {cur.name!r}")


class Directory:
    """The direct children of a directory, in three lists sorted by name.

    A ``Directory`` that exists is valid: every name is valid (see
    :func:`tvix.castore.nodes.validate_name`), each list is sorted bytewise,
    and names are unique across the three lists. Building one that breaks a
    rule raises :class:`ValidationError` naming the rule.

    Its identity, :attr:`digest`, is the blake3 of its canonical protobuf
    encoding (:meth:`encode`): fields in number order, defaults omitted.
    """

    __slots__ = ("_digest", "_encoded", "directories", "files", "size", "symlinks")

    directories: tuple[DirectoryNode, ...]
    files: tuple[FileNode, ...]
    symlinks: tuple[SymlinkNode, ...]
    _encoded: bytes | None
    _digest: B3Digest | None
    size: int
    """The ``size`` a DirectoryNode pointing here gets, computed as every
    upstream tvix-store (since August 2024) and snix do: ``2·entries + Σ`` the
    child directories' sizes (each entry counts once, and once more; see
    :meth:`accepts_size` for the other rules in use)."""

    def __init__(
        self,
        directories: Iterable[DirectoryNode] = (),
        files: Iterable[FileNode] = (),
        symlinks: Iterable[SymlinkNode] = (),
    ) -> None:
        dirs, fls, syms = tuple(directories), tuple(files), tuple(symlinks)
        for kind, nodes, cls in (
            ("directories", dirs, DirectoryNode),
            ("files", fls, FileNode),
            ("symlinks", syms, SymlinkNode),
        ):
            for node in nodes:
                if type(node) is not cls:
                    raise ValidationError(
                        f"invalid Directory: {kind} holds a {type(node).__name__}"
                    )
            _check_sorted(kind, nodes)
        if (dirs and fls) or (dirs and syms) or (fls and syms):
            names = {n.name for n in dirs}
            names.update(n.name for n in fls)
            names.update(n.name for n in syms)
            if len(names) != len(dirs) + len(fls) + len(syms):
                dup = _first_duplicate(dirs, fls, syms)
                raise ValidationError(f"invalid Directory: duplicate name {dup!r}")
        size = 2 * (len(dirs) + len(fls) + len(syms)) + sum(d.size for d in dirs)
        if size > MAX_SIZE:
            raise ValidationError("invalid Directory: size overflows a uint64")
        setattr_ = object.__setattr__
        setattr_(self, "directories", dirs)
        setattr_(self, "files", fls)
        setattr_(self, "symlinks", syms)
        setattr_(self, "size", size)
        setattr_(self, "_encoded", None)
        setattr_(self, "_digest", None)

    @classmethod
    def from_nodes(cls, nodes: Iterable[Node]) -> Directory:
        """A Directory holding ``nodes`` in any order (they are sorted here)."""
        dirs: list[DirectoryNode] = []
        files: list[FileNode] = []
        syms: list[SymlinkNode] = []
        for node in nodes:
            if isinstance(node, DirectoryNode):
                dirs.append(node)
            elif isinstance(node, FileNode):
                files.append(node)
            else:
                syms.append(node)
        return cls(
            sorted(dirs, key=_by_name), sorted(files, key=_by_name), sorted(syms, key=_by_name)
        )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Directory is immutable")

    def encode(self) -> bytes:
        """The canonical protobuf encoding (deterministic: fields in order, defaults omitted)."""
        encoded = self._encoded
        if encoded is None:
            parts: list[bytes] = []
            append = parts.append
            for d in self.directories:
                body = b"\x0a" + encode_varint(len(d.name)) + d.name + b"\x12\x20" + d.digest
                if d.size:
                    body += b"\x18" + encode_varint(d.size)
                append(_field(b"\x0a", body))
            for f in self.files:
                body = b"\x0a" + encode_varint(len(f.name)) + f.name + b"\x12\x20" + f.digest
                if f.size:
                    body += b"\x18" + encode_varint(f.size)
                if f.executable:
                    body += b"\x20\x01"
                append(_field(b"\x12", body))
            for s in self.symlinks:
                body = _field(b"\x0a", s.name) + _field(b"\x12", s.target)
                append(_field(b"\x1a", body))
            encoded = b"".join(parts)
            object.__setattr__(self, "_encoded", encoded)
        return encoded

    @property
    def digest(self) -> B3Digest:
        """blake3 of :meth:`encode`."""
        digest = self._digest
        if digest is None:
            digest = B3Digest(blake3.blake3(self.encode()).digest())
            object.__setattr__(self, "_digest", digest)
        return digest

    def accepts_size(self, size: int) -> bool:
        """Whether a DirectoryNode pointing here may give ``size`` as its size.

        Every rule a known writer uses is accepted, so closures written by
        any of them stay valid (``Σ`` is the sum of the child directories'
        sizes as this Directory gives them):

        - ``entries + Σ``: the protocol's documented rule, which tvix-store
          before August 2024 and this project before adopting upstream's
          wrote;
        - ``2·entries + Σ``: what upstream computes since then (:attr:`size`);
        - ``files + symlinks + 2·directories + Σ``: what the newest snix
          sources move to.
        """
        entries = len(self.directories) + len(self.files) + len(self.symlinks)
        below = self.size - 2 * entries
        return size in (
            self.size,
            entries + below,
            len(self.files) + len(self.symlinks) + 2 * len(self.directories) + below,
        )

    def nodes(self) -> Iterator[Node]:
        """Every entry, directories, files and symlinks merged in name order."""
        return merge(self.directories, self.files, self.symlinks, key=_by_name)

    def __len__(self) -> int:
        return len(self.directories) + len(self.files) + len(self.symlinks)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Directory):
            return NotImplemented
        return self.encode() == other.encode()

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return (
            f"Directory(digest={self.digest.hex()}, directories={len(self.directories)}, "
            f"files={len(self.files)}, symlinks={len(self.symlinks)})"
        )


def _first_duplicate(*lists: tuple[Node, ...]) -> bytes:
    seen: set[bytes] = set()
    for nodes in lists:
        for node in nodes:
            if node.name in seen:
                return node.name
            seen.add(node.name)
    raise AssertionError("no duplicate")  # pragma: no cover
