"""Property tests of what the servers decode from the network: Directories, PathInfos, URLs.

Generated and mutated inputs either decode to a valid value or raise the
package's own error class (castore's ``ValidationError``, nar-bridge's
``BadRequest``); nothing else escapes.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from tvix._proto import store_pb2
from tvix.castore.directory import Directory
from tvix.castore.errors import ValidationError
from tvix.castore.nodes import DirectoryNode, FileNode, SymlinkNode
from tvix.castore.proto import directory_from_bytes
from tvix.castore.testing.fixtures import EMPTY_BLOB_DIGEST
from tvix.nar_bridge.errors import BadRequest
from tvix.nar_bridge.urls import (
    decode_castore_nar,
    encode_castore_nar,
    parse_hash_part,
    parse_nar_file_name,
)
from tvix.store.proto import pathinfo_from_proto, pathinfo_to_proto
from tvix.store.testing.fixtures import path_info

from .strategies import mutated, names

pytestmark = pytest.mark.property

digests = st.binary(min_size=32, max_size=32)


def _file(name: bytes, digest: bytes, size: int, executable: bool) -> FileNode:
    return (
        FileNode(name, EMPTY_BLOB_DIGEST, 0, executable)
        if size == 0
        else FileNode(name, digest, size, executable)
    )


nodes = st.one_of(
    st.builds(_file, names, digests, st.integers(0, 2**64 - 1), st.booleans()),
    st.builds(DirectoryNode, names, digests, st.integers(0, 2**64 - 1)),
    st.builds(
        SymlinkNode, names, st.binary(min_size=1, max_size=30).filter(lambda t: b"\0" not in t)
    ),
)


@st.composite
def directories(draw: st.DrawFn) -> Directory:
    by_name = {n.name: n for n in draw(st.lists(nodes, max_size=6))}
    try:
        return Directory.from_nodes(by_name.values())
    except ValidationError:
        # Sizes whose sum overflows a uint64: not a Directory.
        return Directory()


@given(directories())
def test_directory_encoding_round_trip(directory: Directory) -> None:
    assert directory_from_bytes(directory.encode()) == directory


@given(st.one_of(mutated(directories().map(Directory.encode)), st.binary(max_size=200)))
def test_directory_decoding_never_crashes(data: bytes) -> None:
    try:
        directory = directory_from_bytes(data)
    except ValidationError:
        return
    # Whatever decodes is valid and canonical again.
    assert directory_from_bytes(directory.encode()) == directory


valid_pathinfos = st.builds(
    lambda n, kind: pathinfo_to_proto(path_info(n, kind)).SerializeToString(),
    st.integers(0, 50),
    st.sampled_from(["file", "directory", "symlink"]),
)


@given(st.one_of(mutated(valid_pathinfos), st.binary(max_size=200)))
def test_pathinfo_decoding_never_crashes(data: bytes) -> None:
    try:
        message = store_pb2.PathInfo.FromString(data)
    except DecodeError:
        return  # not a message at all: the servers answer INVALID_ARGUMENT before decoding
    with contextlib.suppress(ValidationError):
        pathinfo_from_proto(message)


@given(nodes)
def test_castore_nar_url_round_trip(node: Any) -> None:
    decoded = decode_castore_nar(encode_castore_nar(node))
    assert decoded == node.renamed(b"root")


@given(
    st.one_of(
        st.text(max_size=120),
        mutated(nodes.map(lambda n: encode_castore_nar(n).encode())).map(
            lambda b: b.decode("latin-1")
        ),
    )
)
def test_nar_bridge_url_parsing_never_crashes(text: str) -> None:
    with contextlib.suppress(BadRequest):
        decode_castore_nar(text)
    parse_nar_file_name(text)  # None when it is not one
    with contextlib.suppress(BadRequest):
        parse_hash_part(text)
