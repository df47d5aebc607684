"""DirectoryGraph: the order checks, validation and the two drains, as tables."""

from __future__ import annotations

import pytest

from tvix.castore.directory import Directory
from tvix.castore.directoryservice.graph import (
    ClosureError,
    DirectoryGraph,
    Order,
    leaves_to_root,
)
from tvix.castore.errors import StorageError, ValidationError
from tvix.castore.nodes import DirectoryNode
from tvix.castore.testing.fixtures import (
    DIRECTORY_A,
    DIRECTORY_B,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_WITH_KEEP,
)

# Refers to DIRECTORY_WITH_KEEP with a wrong size.
LIAR = Directory(directories=[DirectoryNode(b"keep", DIRECTORY_WITH_KEEP.digest, 42)])
# Refers to DIRECTORY_WITH_KEEP twice, once with the wrong size.
SPLIT = Directory(
    directories=[
        DirectoryNode(b"a", DIRECTORY_WITH_KEEP.digest, DIRECTORY_WITH_KEEP.size),
        DirectoryNode(b"b", DIRECTORY_WITH_KEEP.digest, 42),
    ]
)


def _node(name: bytes, d: Directory) -> DirectoryNode:
    return DirectoryNode(name, d.digest, d.size)


# A DAG whose reversed BFS is not leaves to root: X is a child of the root and of Z.
X = DIRECTORY_WITH_KEEP
Z = Directory(directories=[_node(b"x", X)])
Y = Directory(directories=[_node(b"z", Z)])
DAG = Directory(directories=[_node(b"a", X), _node(b"b", Y)])

L2R = Order.LEAVES_TO_ROOT
R2L = Order.ROOT_TO_LEAVES


@pytest.mark.parametrize(
    ("order", "added", "leaves_first", "bfs"),
    [
        (L2R, [DIRECTORY_A], [DIRECTORY_A], [DIRECTORY_A]),
        (L2R, [DIRECTORY_A, DIRECTORY_B], [DIRECTORY_A, DIRECTORY_B], [DIRECTORY_B, DIRECTORY_A]),
        (
            L2R,
            [DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_WITH_KEEP, DIRECTORY_COMPLICATED],
            [DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED],
            [DIRECTORY_COMPLICATED, DIRECTORY_C, DIRECTORY_WITH_KEEP],
        ),
        (R2L, [DIRECTORY_B, DIRECTORY_A], [DIRECTORY_A, DIRECTORY_B], [DIRECTORY_B, DIRECTORY_A]),
        (R2L, [DAG, X, Y, Z], [X, Z, Y, DAG], [DAG, X, Y, Z]),
        (None, [DAG, X, Y, Z], [X, Z, Y, DAG], [DAG, X, Y, Z]),
        (None, [Z, X, DAG, Y], [X, Z, Y, DAG], [DAG, X, Y, Z]),
    ],
    ids=["single", "chain", "duplicates", "r2l-chain", "r2l-dag", "any-dag", "any-shuffled"],
)
def test_valid(
    order: Order | None,
    added: list[Directory],
    leaves_first: list[Directory],
    bfs: list[Directory],
) -> None:
    root = DAG.digest if order is None else None

    def build() -> DirectoryGraph:
        graph = DirectoryGraph(order, root)
        for d in added:
            graph.add(d)
        return graph

    graph = build()
    assert graph.validate() == bfs[0].digest
    assert graph.drain_leaves_to_root() == leaves_first
    assert len(graph) == 0
    graph = build()
    graph.validate()
    assert graph.drain_root_to_leaves() == bfs


@pytest.mark.parametrize(
    ("order", "root", "added", "problem", "message"),
    [
        (L2R, None, [DIRECTORY_B, DIRECTORY_A], None, "sent after a Directory that refers to it"),
        (L2R, None, [DIRECTORY_WITH_KEEP, LIAR], None, "gives size 42 for Directory"),
        (L2R, None, [DIRECTORY_WITH_KEEP, SPLIT], None, "gives size 42"),
        (R2L, DIRECTORY_C.digest, [DIRECTORY_B], None, "sent first"),
        (R2L, None, [DIRECTORY_B, DIRECTORY_WITH_KEEP], None, "which no Directory sent before"),
        (R2L, None, [DIRECTORY_B, DIRECTORY_A, DIRECTORY_A], None, "sent twice"),
        (R2L, None, [LIAR, DIRECTORY_WITH_KEEP], None, "gives size 42"),
        (L2R, None, [], "empty", "no Directories sent"),
        (L2R, None, [DIRECTORY_C, DIRECTORY_COMPLICATED], "missing", "not sent before it"),
        (L2R, None, [DIRECTORY_WITH_KEEP, DIRECTORY_A], "unreachable", "1 Directories not reach"),
        (R2L, None, [DIRECTORY_COMPLICATED, DIRECTORY_C], "missing", "not sent before it"),
        (None, DAG.digest, [DAG, X, Y], "missing", "not sent before it"),
        (None, DAG.digest, [DAG, X, Y, Z, DIRECTORY_A], "unreachable", "not reachable"),
        (None, DAG.digest, [X], "missing", "the root .* was not sent"),
    ],
    ids=[
        "l2r-parent-first",
        "l2r-wrong-size",
        "l2r-references-disagree",
        "r2l-wrong-root",
        "r2l-unreferenced",
        "r2l-twice",
        "r2l-wrong-size",
        "empty",
        "l2r-dangling",
        "l2r-disconnected",
        "r2l-truncated",
        "any-missing",
        "any-extra",
        "any-no-root",
    ],
)
def test_invalid(
    order: Order | None,
    root: object,
    added: list[Directory],
    problem: str | None,
    message: str,
) -> None:
    graph = DirectoryGraph(order, root)  # type: ignore[arg-type]

    def build_and_validate() -> None:
        for d in added:
            graph.add(d)
        graph.validate()

    with pytest.raises(ClosureError, match=message) as raised:
        build_and_validate()
    assert isinstance(raised.value, ValidationError)
    if problem is not None:
        assert raised.value.problem == problem


def test_dangling_resolved_by_stored_directories() -> None:
    graph = DirectoryGraph(L2R)
    graph.add(DIRECTORY_C)
    graph.add(DIRECTORY_COMPLICATED)
    dangling = graph.dangling()
    assert list(dangling) == [DIRECTORY_WITH_KEEP.digest]
    assert dangling[DIRECTORY_WITH_KEEP.digest].parent == DIRECTORY_COMPLICATED.digest
    assert graph.validate({DIRECTORY_WITH_KEEP.digest: DIRECTORY_WITH_KEEP}) == (
        DIRECTORY_COMPLICATED.digest
    )
    assert graph.drain_leaves_to_root() == [DIRECTORY_C, DIRECTORY_COMPLICATED]
    liar = DirectoryGraph(L2R)
    liar.add(LIAR)
    with pytest.raises(ClosureError, match="gives size 42"):
        liar.validate({DIRECTORY_WITH_KEEP.digest: DIRECTORY_WITH_KEEP})


def test_references_that_disagree_are_each_checked() -> None:
    """Two sizes for one dangling Directory: fine if both are valid for it, else refused."""
    old_rule = DirectoryNode(b"a", DIRECTORY_WITH_KEEP.digest, 1)  # entries + sums
    new_rule = DirectoryNode(b"b", DIRECTORY_WITH_KEEP.digest, 2)  # upstream's 2 x entries
    both = Directory(directories=[old_rule, new_rule])
    graph = DirectoryGraph(L2R)
    graph.add(both)
    assert graph.validate({DIRECTORY_WITH_KEEP.digest: DIRECTORY_WITH_KEEP}) == both.digest
    graph = DirectoryGraph(L2R)
    graph.add(SPLIT)
    with pytest.raises(ClosureError, match="gives size 42"):
        graph.validate({DIRECTORY_WITH_KEEP.digest: DIRECTORY_WITH_KEEP})


def test_stored_sizes_do_not_complete_other_orders() -> None:
    graph = DirectoryGraph(R2L)
    graph.add(DIRECTORY_B)
    with pytest.raises(ClosureError, match="not sent before"):
        graph.validate({DIRECTORY_A.digest: DIRECTORY_A})


def test_leaves_to_root_deep_and_missing() -> None:
    chain = [DIRECTORY_A]
    for i in range(5000):
        chain.append(Directory(directories=[_node(b"d%d" % i, chain[-1])]))
    closure = {d.digest: d for d in chain}
    assert list(leaves_to_root(closure, chain[-1].digest)) == chain
    del closure[chain[10].digest]
    with pytest.raises(StorageError, match=f"Directory {chain[10].digest.hex()} is missing"):
        list(leaves_to_root(closure, chain[-1].digest))
    assert list(leaves_to_root(closure, chain[-1].digest, skip_missing=True)) == chain[11:]
