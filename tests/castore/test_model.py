"""The castore data model: validation, digests, wire conversion."""

from __future__ import annotations

import blake3
import pytest

from tvix._proto import castore_pb2 as pb
from tvix.castore import (
    B3Digest,
    Directory,
    DirectoryNode,
    FileNode,
    SymlinkNode,
    ValidationError,
)
from tvix.castore.proto import (
    directory_from_bytes,
    directory_from_proto,
    directory_to_proto,
    node_from_proto,
    node_to_proto,
)
from tvix.castore.testing.fixtures import (
    DIRECTORY_A,
    DIRECTORY_C,
    DIRECTORY_COMPLICATED,
    DIRECTORY_WITH_KEEP,
    EMPTY_BLOB_DIGEST,
    b3,
)

D = EMPTY_BLOB_DIGEST
# For files with contents: only the empty blob has the empty blob's digest.
F = b3(b"contents")


def test_known_digests() -> None:
    assert Directory().digest.hex() == (
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    )
    assert Directory().digest == blake3.blake3(b"").digest()
    keep = Directory(files=[FileNode(b".keep", D, 0)])
    assert keep.digest.hex() == "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"


@pytest.mark.parametrize(
    "directory", [DIRECTORY_A, DIRECTORY_WITH_KEEP, DIRECTORY_C, DIRECTORY_COMPLICATED]
)
def test_encoding_matches_protobuf_deterministic(directory: Directory) -> None:
    m = directory_to_proto(directory)
    assert m.SerializeToString(deterministic=True) == directory.encode()
    assert directory_from_proto(m) == directory
    assert directory_from_bytes(directory.encode()).digest == directory.digest


def test_encoding_of_large_values() -> None:
    d = Directory(
        directories=[DirectoryNode(b"d", D, 2**40)],
        files=[FileNode(b"f", F, 2**64 - 1, True), FileNode(b"g", F, 300)],
        symlinks=[SymlinkNode(b"s" * 200, b"t" * 1000)],
    )
    m = pb.Directory(
        directories=[pb.DirectoryNode(name=b"d", digest=D, size=2**40)],
        files=[
            pb.FileNode(name=b"f", digest=F, size=2**64 - 1, executable=True),
            pb.FileNode(name=b"g", digest=F, size=300),
        ],
        symlinks=[pb.SymlinkNode(name=b"s" * 200, target=b"t" * 1000)],
    )
    assert d.encode() == m.SerializeToString(deterministic=True)


def test_size_as_upstream_computes_it() -> None:
    """``2·entries + Σ`` child sizes: every tvix-store since August 2024 and snix."""
    assert DIRECTORY_WITH_KEEP.size == 2
    assert DIRECTORY_C.size == 2 * 2 + 2 * DIRECTORY_WITH_KEEP.size
    assert DIRECTORY_COMPLICATED.size == 2 * 5 + DIRECTORY_C.size + DIRECTORY_WITH_KEEP.size


def test_upstream_known_answers() -> None:
    """Upstream's fixtures, built as ingestion builds them, have upstream's digests."""
    empty = Directory()
    with_keep = Directory(files=[FileNode(b".keep", EMPTY_BLOB_DIGEST, 0)])
    assert with_keep.digest.hex() == (
        "8b5b5d642b646bb8ed504b0862c39413e87e57491497de7bd075953f7b83810e"
    )
    complicated = Directory(
        directories=[DirectoryNode(b"keep", with_keep.digest, with_keep.size)],
        files=[FileNode(b".keep", EMPTY_BLOB_DIGEST, 0)],
        symlinks=[SymlinkNode(b"aa", b"/nix/store/somewhereelse")],
    )
    assert with_keep.size == 2
    assert complicated.digest.hex() == (
        "424a7f6ce08d805d15b428062faae96299a1675d708c3a39261afe38cdd04feb"
    )
    b = Directory(directories=[DirectoryNode(b"a", empty.digest, empty.size)])
    assert empty.size == 0
    assert b.digest.hex() == "8701f4722d8dae7f2c40fa003331b8437a3825f9e1bfd3a77998c64cc226b9cc"
    d = Directory(
        directories=[
            DirectoryNode(b"a", empty.digest, empty.size),
            DirectoryNode(b"b", b.digest, b.size),
        ]
    )
    assert b.size == 2
    assert d.digest.hex() == "76cd8b55b37333961c1778ba997e57df92e219926ae5a66c414b810331a77603"


@pytest.mark.parametrize(
    ("directory", "documented", "upstream", "newest"),
    [
        # entries + Σ, 2·entries + Σ, files + symlinks + 2·directories + Σ
        (Directory(), 0, 0, 0),
        (DIRECTORY_WITH_KEEP, 1, 2, 1),
        # Two directories of size 2 each (Σ = 4).
        (DIRECTORY_C, 2 + 4, 4 + 4, 4 + 4),
        # Directories of sizes 8 and 2, two files, a symlink (Σ = 10).
        (DIRECTORY_COMPLICATED, 5 + 10, 10 + 10, 3 + 4 + 10),
    ],
)
def test_every_known_size_rule_is_accepted(
    directory: Directory, documented: int, upstream: int, newest: int
) -> None:
    """Closures written under any rule a known writer uses stay valid; nothing else is."""
    assert directory.size == upstream
    for size in (documented, upstream, newest):
        assert directory.accepts_size(size), size
    others = {documented, upstream, newest}
    for size in range(max(others) + 3):
        assert directory.accepts_size(size) == (size in others), size


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: FileNode(b"", D, 0), "empty"),
        (lambda: FileNode(b"a/b", D, 0), "'/'"),
        (lambda: FileNode(b"a\0b", D, 0), "NUL"),
        (lambda: FileNode(b".", D, 0), r"'\.' and '\.\.'"),
        (lambda: DirectoryNode(b"..", D, 0), r"'\.' and '\.\.'"),
        (lambda: FileNode(b"a", b"\0" * 31, 0), "digest length: 31"),
        (lambda: DirectoryNode(b"a", b"\0" * 33, 0), "digest length: 33"),
        (lambda: FileNode(b"a", D, -1), "uint64"),
        (lambda: FileNode(b"a", F, 2**64), "uint64"),
        (lambda: FileNode(b"a", F, 0), "size 0 contradicts its digest"),
        (lambda: FileNode(b"a", D, 1), "size 1 contradicts its digest"),
        (lambda: SymlinkNode(b"a", b""), "empty target"),
        (lambda: SymlinkNode(b"a", b"x\0y"), "NUL"),
        (
            lambda: Directory(files=[FileNode(b"b", D, 0), FileNode(b"a", D, 0)]),
            "files not sorted",
        ),
        (
            lambda: Directory(files=[FileNode(b"a", D, 0), FileNode(b"a", D, 0)]),
            "files duplicate name",
        ),
        (
            lambda: Directory(
                directories=[DirectoryNode(b"a", D, 0)], symlinks=[SymlinkNode(b"a", b"t")]
            ),
            "duplicate name b'a'",
        ),
        (
            lambda: Directory(files=[SymlinkNode(b"a", b"t")]),  # type: ignore[list-item]
            "files holds a SymlinkNode",
        ),
    ],
)
def test_invalid(build: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        build()  # type: ignore[operator]


def test_sorting_is_bytewise() -> None:
    # b"Z" < b"a" < b"\xff": bytewise, not locale or case-insensitive.
    d = Directory.from_nodes(
        [FileNode(b"\xff", D, 0), FileNode(b"a", D, 0), SymlinkNode(b"Z", b"t")]
    )
    assert [n.name for n in d.nodes()] == [b"Z", b"a", b"\xff"]
    with pytest.raises(ValidationError, match="not sorted"):
        Directory(files=[FileNode(b"\xff", D, 0), FileNode(b"a", D, 0)])


def test_immutable() -> None:
    with pytest.raises(AttributeError):
        DIRECTORY_A.size = 3  # type: ignore[misc]
    node = FileNode(b"a", D, 0)
    with pytest.raises(AttributeError):
        node.size = 3  # type: ignore[misc]


def test_b3digest() -> None:
    digest = B3Digest(D)
    assert B3Digest.from_hex(digest.hex()) == digest
    assert B3Digest.from_str(str(digest)) == digest
    assert str(digest).startswith("b3:")
    with pytest.raises(ValidationError, match="invalid hex"):
        B3Digest.from_hex("zz")


def test_unknown_fields_rejected() -> None:
    data = DIRECTORY_WITH_KEEP.encode() + b"\x22\x01x"  # field 4, length-delimited
    with pytest.raises(ValidationError, match="Directory: unknown fields"):
        directory_from_bytes(data)
    inner = pb.FileNode(name=b"a", digest=D).SerializeToString() + b"\x28\x01"  # field 5 varint
    nested = b"\x12" + bytes([len(inner)]) + inner
    with pytest.raises(ValidationError, match="FileNode: unknown fields"):
        directory_from_bytes(nested)


def test_invalid_wire_directory_rejected() -> None:
    m = pb.Directory(files=[pb.FileNode(name=b"b", digest=D), pb.FileNode(name=b"a", digest=D)])
    with pytest.raises(ValidationError, match="not sorted"):
        directory_from_proto(m)
    m = pb.Directory(files=[pb.FileNode(name=b"a", digest=b"short")])
    with pytest.raises(ValidationError, match=r"node b'a'.*digest length"):
        directory_from_proto(m)
    with pytest.raises(ValidationError, match="invalid Directory encoding"):
        directory_from_bytes(b"\x0a\xff")


@pytest.mark.parametrize(
    "node",
    [FileNode(b"f", F, 3, True), DirectoryNode(b"d", D, 7), SymlinkNode(b"s", b"\xfftarget")],
)
def test_node_round_trip(node: FileNode | DirectoryNode | SymlinkNode) -> None:
    assert node_from_proto(node_to_proto(node)) == node


def test_empty_node_rejected() -> None:
    with pytest.raises(ValidationError, match="no node set"):
        node_from_proto(pb.Node())
