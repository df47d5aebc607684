r"""The JSON NAR listing of a node tree, as Nix writes it with ``write-nar-listing=true``.

A binary cache that serves ``<hash>.ls`` lets a client browse a store path
(``nix-index``, Hydra's file views, Nix's ``local-nar-cache``) and fetch
single files by byte range without the NAR. Its shape::

    {"version":1,"root":{"type":"directory","entries":{"bin":{"type":"regular",
    "size":18,"executable":true,"narOffset":400}, ...}}}

``narOffset`` is where the file's contents start in the NAR. Everything
follows from the node tree (:class:`~tvix.store.nar.seekable.NarLayout`): no
blob is read. The bytes match Nix's own writer: compact, keys in its order,
entries in byte order of their names, names written as their raw bytes (a
name that is not UTF-8 stays as it is, as Nix leaves it), and only ``"``,
``\``, and control characters escaped (``\n``, ``\r``, ``\t``, else
``\u00XX``).
"""

from __future__ import annotations

from collections.abc import Iterator

from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nixcompat.nar import wire
from tvix.store.nar.seekable import NarLayout

__all__ = ["nar_listing", "walk_nar"]

_SHORT = {ord('"'): b'\\"', ord("\\"): b"\\\\", 10: b"\\n", 13: b"\\r", 9: b"\\t"}
_ESCAPES = {c: _SHORT.get(c, b"\\u%04x" % c) for c in (*range(32), ord('"'), ord("\\"))}


def _string(raw: bytes) -> bytes:
    """A JSON string of raw bytes, escaped as Nix escapes it."""
    if not any(b < 32 or b in (34, 92) for b in raw):
        return b'"' + raw + b'"'
    return b'"' + b"".join(_ESCAPES.get(b, bytes((b,))) for b in raw) + b'"'


def walk_nar(layout: NarLayout) -> Iterator[tuple[int, Node | None, int]]:
    """The tree of ``layout`` in NAR order, with where each node starts in the NAR.

    Yields ``(depth, node, offset)`` for each node (the root at depth 0) and
    ``(depth, None, offset)`` after the last entry of each directory. A
    file's ``offset`` is where its contents start; a directory's or symlink's
    is where its ``(`` starts.
    """
    pos = len(wire.MAGIC)
    stack: list[Iterator[Node]] = []
    node: Node | None = layout.root
    while True:
        if node is not None:
            depth = len(stack)
            if isinstance(node, FileNode):
                header = wire.EXECUTABLE_HEADER if node.executable else wire.REGULAR_HEADER
                yield depth, node, pos + len(header) + 8
                pos += layout.node_size(node)
            elif isinstance(node, SymlinkNode):
                yield depth, node, pos
                pos += layout.node_size(node)
            else:
                yield depth, node, pos
                pos += len(wire.DIRECTORY_HEADER)
                stack.append(layout.closure[node.digest].nodes())
                node = None
                continue
            node = None
            if not stack:
                return
            pos += len(wire.CLOSE)  # the entry's `)`
            continue
        child = next(stack[-1], None)
        if child is None:
            stack.pop()
            yield len(stack), None, pos
            pos += len(wire.CLOSE)  # the directory's `)`
            if not stack:
                return
            pos += len(wire.CLOSE)  # the entry's `)`
            continue
        pos += len(wire.ENTRY_HEADER) + 8 + len(child.name) + wire.padding(len(child.name))
        pos += len(wire.NODE)
        node = child


def nar_listing(layout: NarLayout) -> bytes:
    """The ``.ls`` document of ``layout``'s NAR, byte for byte as Nix writes it."""
    out = [b'{"version":1,"root":']
    # Whether the next entry of each open directory needs a comma first.
    first: list[bool] = []
    for depth, node, offset in walk_nar(layout):
        if node is None:
            out.append(b"}}")
            first.pop()
            continue
        if depth:
            if not first[-1]:
                out.append(b",")
            first[-1] = False
            out.append(_string(node.name) + b":")
        if isinstance(node, FileNode):
            out.append(b'{"type":"regular","size":%d' % node.size)
            if node.executable:
                out.append(b',"executable":true')
            out.append(b',"narOffset":%d}' % offset)
        elif isinstance(node, SymlinkNode):
            out.append(b'{"type":"symlink","target":' + _string(node.target) + b"}")
        else:
            assert isinstance(node, DirectoryNode)
            out.append(b'{"type":"directory","entries":{')
            first.append(True)
    out.append(b"}")
    return b"".join(out)
