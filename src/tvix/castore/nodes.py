"""The three kinds of node a Directory lists, and the rules their names follow.

Nodes are immutable and validated when built. Names are bytes (they need not
be UTF-8): non-empty, without ``/`` or NUL, and neither ``.`` nor ``..``. The
same rule holds for a root node (a PathInfo's root node is named after its
store path's base name).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from tvix.castore.digest import EMPTY_BLOB_DIGEST, B3Digest
from tvix.castore.errors import ValidationError

__all__ = ["MAX_SIZE", "DirectoryNode", "FileNode", "Node", "SymlinkNode", "validate_name"]

MAX_SIZE = 2**64 - 1


def validate_name(name: bytes) -> None:
    """Raise :class:`ValidationError` unless ``name`` is a valid entry name."""
    if not name:
        raise ValidationError("invalid name: empty")
    if b"/" in name:
        raise ValidationError(f"invalid name {name!r}: contains '/'")
    if b"\0" in name:
        raise ValidationError(f"invalid name {name!r}: contains a NUL byte")
    if name == b"." or name == b"..":
        raise ValidationError(f"invalid name {name!r}: '.' and '..' are not allowed")


def _digest(value: bytes) -> B3Digest:
    return value if type(value) is B3Digest else B3Digest(value)


def _check_size(name: bytes, size: int) -> None:
    if not 0 <= size <= MAX_SIZE:
        raise ValidationError(f"invalid size {size} of {name!r}: must fit in a uint64")


@dataclass(frozen=True, slots=True)
class FileNode:
    """A regular file: its name, the blake3 digest and size of its contents.

    The two must agree where they can be checked without the blob: a file of
    size 0 has the empty blob's digest, and a file with that digest has size 0.
    """

    name: bytes
    digest: B3Digest
    size: int
    executable: bool = False

    def __post_init__(self) -> None:
        validate_name(self.name)
        object.__setattr__(self, "digest", _digest(self.digest))
        _check_size(self.name, self.size)
        if (self.size == 0) != (self.digest == EMPTY_BLOB_DIGEST):
            raise ValidationError(
                f"invalid file {self.name!r}: size {self.size} contradicts its digest "
                f"{self.digest.hex()} (only the empty blob, "
                f"{EMPTY_BLOB_DIGEST.hex()[:12]}..., has size 0)"
            )

    def renamed(self, name: bytes) -> FileNode:
        """The same file under another name."""
        return FileNode(name, self.digest, self.size, self.executable)


@dataclass(frozen=True, slots=True)
class DirectoryNode:
    """A child directory: its name, the digest of its Directory and its ``size``.

    ``size`` counts every entry below the child: the child Directory's files,
    symlinks and directories, plus each of those directories' own ``size``
    (see :attr:`tvix.castore.Directory.size`).
    """

    name: bytes
    digest: B3Digest
    size: int

    def __post_init__(self) -> None:
        validate_name(self.name)
        object.__setattr__(self, "digest", _digest(self.digest))
        _check_size(self.name, self.size)

    def renamed(self, name: bytes) -> DirectoryNode:
        """The same directory under another name."""
        return DirectoryNode(name, self.digest, self.size)


@dataclass(frozen=True, slots=True)
class SymlinkNode:
    """A symbolic link: its name and its target (bytes, non-empty, no NUL)."""

    name: bytes
    target: bytes

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not self.target:
            raise ValidationError(f"invalid symlink {self.name!r}: empty target")
        if b"\0" in self.target:
            raise ValidationError(f"invalid symlink {self.name!r}: target contains a NUL byte")

    def renamed(self, name: bytes) -> SymlinkNode:
        """The same symlink under another name."""
        return SymlinkNode(name, self.target)


Node: TypeAlias = FileNode | DirectoryNode | SymlinkNode
"""Any of the three kinds of node."""
