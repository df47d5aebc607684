"""PathInfo: validation, wire conversion, signatures."""

from __future__ import annotations

import dataclasses

import pytest

from tvix._proto import store_pb2 as pb
from tvix.castore import FileNode
from tvix.castore.testing.fixtures import BLOB_A_DIGEST
from tvix.nixcompat.signing import Signature, SigningKey
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import InvalidPathInfoError
from tvix.store.proto import pathinfo_from_proto, pathinfo_to_proto
from tvix.store.testing.fixtures import DUMMY_KEY, path_info, store_path


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_wire_round_trip(kind: str) -> None:
    info = path_info(1, kind, refs=(2, 3)).with_signature(DUMMY_KEY)
    m = pathinfo_to_proto(info)
    assert m.narinfo.deriver.name == f"dummy-{kind}"  # .drv left out on the wire
    assert list(m.narinfo.reference_names) == [r.base_name for r in info.references]
    assert pathinfo_from_proto(pb.PathInfo.FromString(m.SerializeToString())) == info


def _wire(**narinfo_changes: object) -> pb.PathInfo:
    m = pathinfo_to_proto(path_info(1, refs=(2,)))
    for key, value in narinfo_changes.items():
        if key == "references":
            del m.references[:]
            m.references.extend(value)  # type: ignore[arg-type]
        elif key == "node_name":
            m.node.file.name = value  # type: ignore[assignment]
        elif key == "reference_names":
            del m.narinfo.reference_names[:]
            m.narinfo.reference_names.extend(value)  # type: ignore[arg-type]
        elif key == "no_narinfo":
            m.ClearField("narinfo")
        elif key == "no_node":
            m.ClearField("node")
        else:
            setattr(m.narinfo, key, value)
    return m


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"no_node": True}, "no root node"),
        ({"no_narinfo": True}, "no narinfo"),
        ({"node_name": b"not-a-store-path"}, "is no store path"),
        ({"node_name": b"a/b"}, "root node.*'/'"),
        ({"references": [b"\0" * 19]}, "reference 0 is 19 bytes"),
        ({"reference_names": []}, "1 references but 0 reference names"),
        (
            {"reference_names": [store_path(9, "dummy-ref").base_name]},
            "does not match reference digest 0",
        ),
        ({"reference_names": ["nonsense"]}, "reference name 'nonsense'"),
        ({"nar_sha256": b"short"}, "NAR sha256 .* 32 bytes"),
        ({"nar_size": 0}, "NAR size .* positive"),
    ],
)
def test_invalid_wire(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidPathInfoError, match=message):
        pathinfo_from_proto(_wire(**changes))


def test_bad_signature_rejected() -> None:
    m = pathinfo_to_proto(path_info(1))
    m.narinfo.signatures.add(name="k", data=b"\0" * 63)
    with pytest.raises(InvalidPathInfoError, match="63 bytes"):
        pathinfo_from_proto(m)


def test_unknown_fields_rejected() -> None:
    data = pathinfo_to_proto(path_info(1)).SerializeToString() + b"\x22\x00"  # field 4
    with pytest.raises(InvalidPathInfoError, match="unknown fields"):
        pathinfo_from_proto(pb.PathInfo.FromString(data))


def test_model_rules() -> None:
    info = path_info(1)
    with pytest.raises(InvalidPathInfoError, match="differs from the store path"):
        dataclasses.replace(info, node=FileNode(b"other", BLOB_A_DIGEST, 12))
    with pytest.raises(InvalidPathInfoError, match="duplicate references"):
        dataclasses.replace(info, references=(store_path(2), store_path(2)))
    with pytest.raises(InvalidPathInfoError, match=r"does not end in \.drv"):
        dataclasses.replace(info, deriver=store_path(3))


def test_signatures() -> None:
    info = path_info(1, refs=(2,))
    other = SigningKey.generate("other")
    signed = info.with_signature(DUMMY_KEY)
    assert signed.verify([DUMMY_KEY.to_public()])
    assert not signed.verify([other.to_public()])
    assert not info.verify([DUMMY_KEY.to_public()])
    # The fingerprint covers the references: changing them breaks the signature.
    tampered = dataclasses.replace(signed, references=())
    assert not tampered.verify([DUMMY_KEY.to_public()])
    # Re-signing with the same key name replaces, not duplicates.
    assert len(signed.with_signature(DUMMY_KEY).signatures) == 1
    both = signed.with_signature(other)
    assert {s.name for s in both.signatures} == {"test-key-1", "other"}
    assert isinstance(both.signatures[0], Signature)
    assert StorePath.from_absolute_path(info.store_path.absolute_path) == info.store_path
