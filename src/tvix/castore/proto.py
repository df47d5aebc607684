"""Conversion between the castore model and its wire (protobuf) messages.

The generated code lives in :mod:`tvix._proto`; nothing else in castore
touches it. A received message is rejected with :class:`ValidationError` when
it carries fields this protocol version does not know (they would be dropped
silently and change the Directory's digest) or breaks a rule of the model.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from tvix._proto import castore_pb2 as pb
from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.errors import ValidationError
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode

__all__ = [
    "directory_from_bytes",
    "directory_from_proto",
    "directory_to_proto",
    "node_from_proto",
    "node_to_proto",
    "pb",
]


def _reject_unknown(msg: Message, what: str) -> None:
    if len(UnknownFieldSet(msg)):
        raise ValidationError(f"invalid {what}: unknown fields")


def _directory_node(m: pb.DirectoryNode) -> DirectoryNode:
    _reject_unknown(m, "DirectoryNode")
    return DirectoryNode(m.name, _digest(m.digest, m.name), m.size)


def _file_node(m: pb.FileNode) -> FileNode:
    _reject_unknown(m, "FileNode")
    return FileNode(m.name, _digest(m.digest, m.name), m.size, m.executable)


def _symlink_node(m: pb.SymlinkNode) -> SymlinkNode:
    _reject_unknown(m, "SymlinkNode")
    return SymlinkNode(m.name, m.target)


def _digest(raw: bytes, name: bytes) -> B3Digest:
    try:
        return B3Digest(raw)
    except ValidationError as e:
        raise ValidationError(f"invalid node {name!r}: {e}") from None


def directory_from_proto(m: pb.Directory) -> Directory:
    """The model of a received Directory; raises :class:`ValidationError` if invalid."""
    _reject_unknown(m, "Directory")
    return Directory(
        [_directory_node(d) for d in m.directories],
        [_file_node(f) for f in m.files],
        [_symlink_node(s) for s in m.symlinks],
    )


def directory_from_bytes(data: bytes) -> Directory:
    """Decode a Directory from its protobuf encoding; raises :class:`ValidationError`."""
    m = pb.Directory()
    try:
        m.ParseFromString(data)
    except DecodeError as e:
        raise ValidationError(f"invalid Directory encoding: {e}") from None
    return directory_from_proto(m)


def directory_to_proto(d: Directory) -> pb.Directory:
    """The wire message of a Directory.

    Parsed from its canonical encoding: cheaper than building it field by field.
    """
    m = pb.Directory()
    m.ParseFromString(d.encode())
    return m


def node_from_proto(m: pb.Node) -> Node:
    """The model of a received Node; raises :class:`ValidationError` if it is unset or invalid."""
    _reject_unknown(m, "Node")
    kind = m.WhichOneof("node")
    if kind == "directory":
        return _directory_node(m.directory)
    if kind == "file":
        return _file_node(m.file)
    if kind == "symlink":
        return _symlink_node(m.symlink)
    raise ValidationError("invalid Node: no node set")


def node_to_proto(node: Node) -> pb.Node:
    """The wire message of a node."""
    if isinstance(node, DirectoryNode):
        return pb.Node(
            directory=pb.DirectoryNode(name=node.name, digest=node.digest, size=node.size)
        )
    if isinstance(node, FileNode):
        return pb.Node(
            file=pb.FileNode(
                name=node.name, digest=node.digest, size=node.size, executable=node.executable
            )
        )
    return pb.Node(symlink=pb.SymlinkNode(name=node.name, target=node.target))
