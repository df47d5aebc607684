"""A Directory closure as a graph: checked as it is built, then walked in either order.

Every place that receives a closure (a putter, the gRPC client's recursive
get, the cache and race combinators, ``copy``) has the same questions: does
each Directory arrive in the promised order, does every reference name the
size of the Directory it refers to, is everything reachable from the root and
nothing missing? :class:`DirectoryGraph` answers them once (upstream tvix:
``directory_graph.rs`` and ``order_validator.rs``); its users only phrase the
answer for their audience (a :class:`~tvix.castore.errors.ValidationError` for
a caller sending a bad closure, an
:class:`~tvix.castore.errors.IntegrityError` for a source sending one).

Orders:

:attr:`Order.LEAVES_TO_ROOT`
    As a :class:`~tvix.castore.directoryservice.base.DirectoryPutter` takes
    them: each Directory after every Directory it refers to; the root comes
    last. A reference to a Directory not added is left *dangling*: it may be
    stored already, which only the caller can tell (see :meth:`validate`). A
    Directory added again is ignored.
:attr:`Order.ROOT_TO_LEAVES`
    As :meth:`~tvix.castore.directoryservice.base.DirectoryService.get_recursive`
    yields them: the root first, then each Directory only while a Directory
    added earlier refers to it and it was not added yet.
``None``
    Any order; only :meth:`validate` checks the whole.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.errors import IntegrityError, StorageError, ValidationError

__all__ = [
    "ClosureError",
    "DirectoryGraph",
    "Order",
    "Reference",
    "leaves_to_root",
    "verified_closure",
]


class Order(enum.Enum):
    """The order in which Directories are added to a :class:`DirectoryGraph`."""

    LEAVES_TO_ROOT = "leaves to root"
    ROOT_TO_LEAVES = "root to leaves"


@dataclass(frozen=True, slots=True)
class Reference:
    """A Directory's entry referring to another Directory.

    Its name, the size it claims, and the digest of the Directory holding it.
    """

    name: bytes
    size: int
    parent: B3Digest


ClosureProblem = Literal[
    "empty",  # nothing was added
    "wrong-root",  # ROOT_TO_LEAVES: the first Directory is not the root expected
    "after-referrer",  # LEAVES_TO_ROOT: added after a Directory that refers to it
    "unreferenced",  # ROOT_TO_LEAVES: no Directory added before refers to it
    "again",  # ROOT_TO_LEAVES: added a second time
    "size-of-added",  # the Directory added has another size than a reference gives
    "size-in-reference",  # a reference gives another size than the Directory (or reference) known
    "missing",  # a reference to a Directory never added (and not stored)
    "unreachable",  # a Directory added is not below the root
]


class ClosureError(ValidationError):
    """A closure breaks a rule; :attr:`problem` says which, the other attributes where.

    ``digest`` is the Directory concerned; ``reference`` the reference to it
    involved (for a size or a missing Directory); ``size`` the size the graph
    knows for it, when it is about sizes; ``count`` how many Directories are
    unreachable or missing.
    """

    def __init__(
        self,
        problem: ClosureProblem,
        message: str,
        digest: B3Digest | None = None,
        *,
        reference: Reference | None = None,
        size: int | None = None,
        count: int = 1,
    ) -> None:
        super().__init__(message)
        self.problem = problem
        self.digest = digest
        self.reference = reference
        self.size = size
        self.count = count


def _wrong_size(
    problem: ClosureProblem, digest: B3Digest, ref: Reference, actual: int
) -> ClosureError:
    return ClosureError(
        problem,
        f"invalid closure: {ref.name!r} gives size {ref.size} for Directory {digest.hex()}, "
        f"whose size is {actual}",
        digest,
        reference=ref,
        size=actual,
    )


class DirectoryGraph:
    """Directories of one closure, checked as they are added (see the module docstring).

    ``root`` names the root up front; without it the root is the first
    Directory added (ROOT_TO_LEAVES) or the last (LEAVES_TO_ROOT). Every
    check raises :class:`ClosureError`.
    """

    def __init__(self, order: Order | None = None, root: B3Digest | None = None) -> None:
        self.order = order
        self._root = root
        self._nodes: dict[B3Digest, Directory] = {}
        # Referred to, not added (yet): the latest reference to each.
        self._dangling: dict[B3Digest, Reference] = {}
        # Dangling Directories referred to with more than one size: a reference per size.
        self._claims: dict[B3Digest, list[Reference]] = {}
        self._last: Directory | None = None

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, digest: object) -> bool:
        return digest in self._nodes

    @property
    def root(self) -> B3Digest | None:
        """The root: given, or derived from the order; ``None`` while nothing was added."""
        if self._root is not None:
            return self._root
        if self.order is Order.LEAVES_TO_ROOT:
            return None if self._last is None else self._last.digest
        return next(iter(self._nodes), None)

    def add(self, directory: Directory) -> bool:
        """Add ``directory``, checking the order and the sizes known so far.

        Returns ``False`` when it was added before (ignored, except that in
        LEAVES_TO_ROOT order it becomes the root candidate again).
        """
        digest = directory.digest
        self._last = directory
        if digest in self._nodes:
            if self.order is Order.ROOT_TO_LEAVES:
                raise ClosureError(
                    "again", f"invalid closure: Directory {digest.hex()} sent twice", digest
                )
            return False
        ref = self._dangling.get(digest)
        if self.order is Order.LEAVES_TO_ROOT and ref is not None:
            raise ClosureError(
                "after-referrer",
                f"invalid closure: Directory {digest.hex()} sent after a Directory that refers "
                f"to it as {ref.name!r} (closures go leaves first)",
                digest,
                reference=ref,
            )
        if self.order is Order.ROOT_TO_LEAVES:
            if not self._nodes:
                if self._root is not None and digest != self._root:
                    raise ClosureError(
                        "wrong-root",
                        f"invalid closure: Directory {digest.hex()} sent first, "
                        f"not the root {self._root.hex()}",
                        digest,
                    )
            elif ref is None:
                raise ClosureError(
                    "unreferenced",
                    f"invalid closure: Directory {digest.hex()} sent, which no Directory "
                    "sent before refers to",
                    digest,
                )
        if ref is not None:
            for claimed in self._claims.pop(digest, [ref]):
                if not directory.accepts_size(claimed.size):
                    raise _wrong_size("size-of-added", digest, claimed, directory.size)
            del self._dangling[digest]
        for child in directory.directories:
            reference = Reference(child.name, child.size, digest)
            known = self._nodes.get(child.digest)
            if known is not None:
                if not known.accepts_size(child.size):
                    raise _wrong_size("size-in-reference", child.digest, reference, known.size)
                continue
            other = self._dangling.get(child.digest)
            # The latest reference is the one errors name; references that give
            # other sizes (a closure may mix Directories written under different
            # size rules, see Directory.accepts_size) are each checked later.
            self._dangling[child.digest] = reference
            if other is not None and other.size != child.size:
                claims = self._claims.setdefault(child.digest, [other])
                if all(c.size != child.size for c in claims):
                    claims.append(reference)
        self._nodes[digest] = directory
        return True

    def dangling(self) -> dict[B3Digest, Reference]:
        """Directories referred to but not added: digest -> the latest reference to it."""
        return dict(self._dangling)

    def validate(self, stored: Mapping[B3Digest, Directory] | None = None) -> B3Digest:
        """Check the graph is one complete closure; returns its root.

        ``stored`` gives Directories stored already, which
        dangling references may refer to (LEAVES_TO_ROOT only: the other
        orders must be complete). Raises :class:`ClosureError` when nothing was
        added, a reference dangles (or names another size than the stored
        Directory has), or a Directory is not reachable from the root.
        """
        root = self.root
        if root is None:
            raise ClosureError("empty", "invalid closure: no Directories sent")
        if root not in self._nodes:
            raise ClosureError(
                "missing", f"invalid closure: the root {root.hex()} was not sent", root
            )
        have = stored if stored is not None and self.order is Order.LEAVES_TO_ROOT else {}
        for digest, ref in self._dangling.items():
            known = have.get(digest)
            if known is None:
                raise ClosureError(
                    "missing",
                    f"invalid closure: {ref.name!r} refers to Directory {digest.hex()}, "
                    "which was not sent before it and is not stored",
                    digest,
                    reference=ref,
                    count=len(self._dangling),
                )
            for claimed in self._claims.get(digest, [ref]):
                if not known.accepts_size(claimed.size):
                    raise _wrong_size("size-in-reference", digest, claimed, known.size)
        seen = {d.digest for d in self._reach(root)}
        if len(seen) != len(self._nodes):
            orphans = [d for d in self._nodes if d not in seen]
            raise ClosureError(
                "unreachable",
                f"invalid closure: {len(orphans)} Directories not reachable from the root "
                f"{root.hex()}, e.g. {orphans[0].hex()}",
                orphans[0],
                count=len(orphans),
            )
        return root

    def _reach(self, root: B3Digest) -> Iterator[Directory]:
        """Breadth-first from ``root`` over the Directories added, each once."""
        first = self._nodes[root]
        queue = [first]
        seen = {root}
        for directory in queue:  # grows while iterating
            yield directory
            for child in directory.directories:
                if child.digest not in seen and child.digest in self._nodes:
                    seen.add(child.digest)
                    queue.append(self._nodes[child.digest])

    def drain_root_to_leaves(self) -> list[Directory]:
        """The Directories below and including the root, breadth-first, each once.

        Empties the graph. Call :meth:`validate` first.
        """
        root = self.root
        out = [] if root is None or root not in self._nodes else list(self._reach(root))
        self._clear()
        return out

    def drain_leaves_to_root(self) -> list[Directory]:
        """The Directories below and including the root, each after those it refers to.

        Empties the graph. Call :meth:`validate` first.

        In LEAVES_TO_ROOT order this is the order they were added in.
        """
        root = self.root
        if self.order is Order.LEAVES_TO_ROOT:
            out = list(self._nodes.values())
        elif root is None or root not in self._nodes:
            out = []
        else:
            out = list(leaves_to_root(self._nodes, root, skip_missing=True))
        self._clear()
        return out

    def _clear(self) -> None:
        self._nodes = {}
        self._dangling = {}
        self._last = None


def leaves_to_root(
    closure: Mapping[B3Digest, Directory], root: B3Digest, *, skip_missing: bool = False
) -> Iterator[Directory]:
    """The Directories of ``closure`` below and including ``root``, each after its children.

    A depth-first post-order, iteratively (trees may be thousands of levels
    deep). The reverse of a breadth-first order is not always such an order:
    a Directory met early (as a shallow child) may also be referred to by a
    deeper one. A Directory referred to but not in ``closure`` raises
    :class:`~tvix.castore.errors.StorageError`, unless ``skip_missing``.
    """
    done: set[B3Digest] = set()
    top = closure.get(root)
    if top is None:
        if skip_missing:
            return
        raise StorageError(f"Directory {root.hex()} is missing")
    stack: list[tuple[Directory, int]] = [(top, 0)]
    while stack:
        directory, i = stack[-1]
        children = directory.directories
        while i < len(children) and (
            children[i].digest in done or (skip_missing and children[i].digest not in closure)
        ):
            i += 1
        if i == len(children):
            stack.pop()
            if directory.digest not in done:
                done.add(directory.digest)
                yield directory
            continue
        stack[-1] = (directory, i + 1)
        child = closure.get(children[i].digest)
        if child is None:
            raise StorageError(f"Directory {children[i].digest.hex()} is missing")
        # No cycle check needed: digests are hashes of the contents, so a Directory
        # cannot (feasibly) be below itself.
        stack.append((child, 0))


def verified_closure(
    root: B3Digest, directories: list[Directory]
) -> tuple[list[Directory], list[Directory]]:
    """Check that ``directories`` is exactly the closure of ``root``, from an untrusted source.

    Returns it twice: breadth-first from the root (each digest once, as
    :meth:`DirectoryService.get_recursive` yields it) and leaves first (each
    Directory after every Directory it refers to, as a
    :class:`DirectoryPutter` takes it). Raises
    :class:`~tvix.castore.errors.IntegrityError` if the first is not
    ``root``, a Directory referred to is missing or has another size than
    its parent says, or a Directory is not below ``root`` at all.
    """
    if not directories or directories[0].digest != root:
        got = directories[0].digest.hex() if directories else "nothing"
        raise IntegrityError(f"Directory {root.hex()}: the source returned {got} for it")
    graph = DirectoryGraph(root=root)
    try:
        for directory in directories:
            graph.add(directory)
        graph.validate()
    except ClosureError as e:
        raise IntegrityError(_source_problem(root, e)) from None
    bfs = list(graph._reach(root))
    return bfs, graph.drain_leaves_to_root()


def _source_problem(root: B3Digest, e: ClosureError) -> str:
    """``e`` said of a closure of ``root`` a source returned."""
    ref, digest = e.reference, e.digest
    where = f"closure of {root.hex()}"
    if e.problem == "unreachable" and digest is not None:
        return f"{where}: the source returned Directory {digest.hex()}, which is not below it"
    if ref is not None and digest is not None:
        if e.problem == "missing":
            return (
                f"{where}: {ref.name!r} in {ref.parent.hex()} refers to Directory "
                f"{digest.hex()}, which the source did not return"
            )
        if e.problem in ("size-of-added", "size-in-reference"):
            return (
                f"{where}: {ref.name!r} in {ref.parent.hex()} gives size {ref.size} for "
                f"Directory {digest.hex()}, whose size is {e.size}"
            )
    return f"{where}: {e}"
