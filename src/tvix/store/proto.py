"""Conversion between the store model and its wire (protobuf) messages.

A received PathInfo is rejected with :class:`InvalidPathInfoError` naming the
rule it breaks: unknown fields, an invalid root node, a root node name that is
no store path base name, references of the wrong length or disagreeing with
their names, a missing narinfo, bad signatures, deriver or content address.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from tvix._proto import store_pb2 as pb
from tvix.castore.errors import ValidationError
from tvix.castore.proto import node_from_proto, node_to_proto
from tvix.nixcompat.cahash import CAHash, CAKind
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.hashes import HashAlgo
from tvix.nixcompat.signing import Signature
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import InvalidPathInfoError
from tvix.store.pathinfo import PathInfo

__all__ = [
    "pathinfo_from_bytes",
    "pathinfo_from_proto",
    "pathinfo_to_bytes",
    "pathinfo_to_proto",
    "pb",
]

_CA = pb.NARInfo.CA
_CA_TO_MODEL = {
    _CA.NAR_SHA256: (CAKind.NAR, HashAlgo.SHA256),
    _CA.NAR_SHA1: (CAKind.NAR, HashAlgo.SHA1),
    _CA.NAR_SHA512: (CAKind.NAR, HashAlgo.SHA512),
    _CA.NAR_MD5: (CAKind.NAR, HashAlgo.MD5),
    _CA.TEXT_SHA256: (CAKind.TEXT, HashAlgo.SHA256),
    _CA.FLAT_SHA1: (CAKind.FLAT, HashAlgo.SHA1),
    _CA.FLAT_MD5: (CAKind.FLAT, HashAlgo.MD5),
    _CA.FLAT_SHA256: (CAKind.FLAT, HashAlgo.SHA256),
    _CA.FLAT_SHA512: (CAKind.FLAT, HashAlgo.SHA512),
}
_CA_TO_WIRE = {v: k for k, v in _CA_TO_MODEL.items()}


def _reject_unknown(msg: Message, what: str) -> None:
    if len(UnknownFieldSet(msg)):
        raise InvalidPathInfoError(f"invalid PathInfo: unknown fields in {what}")


def pathinfo_from_proto(m: pb.PathInfo) -> PathInfo:
    """The model of a received PathInfo; raises :class:`InvalidPathInfoError`."""
    _reject_unknown(m, "PathInfo")
    if not m.HasField("node"):
        raise InvalidPathInfoError("invalid PathInfo: no root node")
    try:
        node = node_from_proto(m.node)
    except ValidationError as e:
        raise InvalidPathInfoError(f"invalid PathInfo root node: {e}") from None
    try:
        store_path = StorePath.from_base_name(node.name)
    except NixCompatError as e:
        raise InvalidPathInfoError(
            f"invalid PathInfo: root node name {node.name!r} is no store path: {e}"
        ) from None
    if not m.HasField("narinfo"):
        raise InvalidPathInfoError(f"invalid PathInfo {store_path}: no narinfo")
    ni = m.narinfo
    _reject_unknown(ni, "NARInfo")
    if len(ni.reference_names) != len(m.references):
        raise InvalidPathInfoError(
            f"invalid PathInfo {store_path}: {len(m.references)} references but "
            f"{len(ni.reference_names)} reference names"
        )
    references = []
    for i, (digest, name) in enumerate(zip(m.references, ni.reference_names, strict=True)):
        if len(digest) != 20:
            raise InvalidPathInfoError(
                f"invalid PathInfo {store_path}: reference {i} is {len(digest)} bytes, not 20"
            )
        try:
            ref = StorePath.from_base_name(name)
        except NixCompatError as e:
            raise InvalidPathInfoError(
                f"invalid PathInfo {store_path}: reference name {name!r}: {e}"
            ) from None
        if ref.digest != digest:
            raise InvalidPathInfoError(
                f"invalid PathInfo {store_path}: reference name {name!r} does not match "
                f"reference digest {i}"
            )
        references.append(ref)
    try:
        signatures = [Signature(s.name, s.data) for s in ni.signatures]
    except NixCompatError as e:
        raise InvalidPathInfoError(f"invalid PathInfo {store_path}: {e}") from None
    deriver = None
    if ni.HasField("deriver"):
        try:
            deriver = StorePath(ni.deriver.digest, ni.deriver.name + ".drv")
        except NixCompatError as e:
            raise InvalidPathInfoError(f"invalid PathInfo {store_path}: deriver: {e}") from None
    ca = None
    if ni.HasField("ca"):
        kind_algo = _CA_TO_MODEL.get(ni.ca.type)
        if kind_algo is None:
            raise InvalidPathInfoError(
                f"invalid PathInfo {store_path}: unknown content address type {ni.ca.type}"
            )
        try:
            ca = CAHash(*kind_algo, ni.ca.digest)
        except NixCompatError as e:
            raise InvalidPathInfoError(f"invalid PathInfo {store_path}: {e}") from None
    return PathInfo(
        store_path=store_path,
        node=node,
        nar_size=ni.nar_size,
        nar_sha256=ni.nar_sha256,
        references=tuple(references),
        signatures=tuple(signatures),
        deriver=deriver,
        ca=ca,
    )


def pathinfo_to_proto(info: PathInfo) -> pb.PathInfo:
    """The wire message of a PathInfo."""
    ni = pb.NARInfo(
        nar_size=info.nar_size,
        nar_sha256=info.nar_sha256,
        signatures=[pb.NARInfo.Signature(name=s.name, data=s.data) for s in info.signatures],
        reference_names=[r.base_name for r in info.references],
    )
    if info.deriver is not None:
        ni.deriver.CopyFrom(
            pb.StorePath(name=info.deriver.name.removesuffix(".drv"), digest=info.deriver.digest)
        )
    if info.ca is not None:
        ni.ca.CopyFrom(_CA(type=_CA_TO_WIRE[(info.ca.kind, info.ca.algo)], digest=info.ca.digest))
    return pb.PathInfo(
        node=node_to_proto(info.node),
        references=[r.digest for r in info.references],
        narinfo=ni,
    )


def pathinfo_to_bytes(info: PathInfo) -> bytes:
    """The deterministic protobuf encoding of ``info``."""
    return pathinfo_to_proto(info).SerializeToString(deterministic=True)


def pathinfo_from_bytes(data: bytes) -> PathInfo:
    """Decode a PathInfo from its protobuf encoding; raises :class:`InvalidPathInfoError`."""
    try:
        message = pb.PathInfo.FromString(data)
    except DecodeError as e:
        raise InvalidPathInfoError(f"invalid PathInfo encoding: {e}") from None
    return pathinfo_from_proto(message)
