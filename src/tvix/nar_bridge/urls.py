"""The URLs nar-bridge serves and accepts, and their parsing (client input, validated).

Served NARs are addressed by their root node, as upstream tvix/snix
nar-bridge does::

    nar/tvix-castore/<base64url, unpadded, of the castore Node protobuf>?narsize=<N>

The node is encoded with an empty name (the NAR does not contain the root's
name), so equal trees under different store paths share one URL. Such a URL
is self-contained: the NAR can be rendered from it without any metadata
lookup, by any nar-bridge on the same castore, after restarts. Nix requests
the narinfo's URL verbatim, query string included.

Uploaded NARs are named as Nix names them: ``nar/<nixbase32 FileHash>.nar``
plus the compression's extension (``.xz``, ``.bz2``, ``.zst``, ...).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from tvix.castore.errors import ValidationError
from tvix.castore.nodes import Node
from tvix.castore.proto import node_from_proto, node_to_proto, pb
from tvix.nar_bridge.errors import BadRequest
from tvix.nixcompat import nixbase32

__all__ = [
    "CASTORE_NAR_PREFIX",
    "SNIX_CASTORE_NAR_PREFIX",
    "NarFileName",
    "decode_castore_nar",
    "encode_castore_nar",
    "parse_hash_part",
    "parse_nar_file_name",
]

CASTORE_NAR_PREFIX = "nar/tvix-castore/"
#: The prefix snix's nar-bridge uses for the same URLs; accepted too.
SNIX_CASTORE_NAR_PREFIX = "nar/snix-castore/"

# Far above any real node (a symlink target is at most 4 KiB): bounds the work a
# hostile URL can cause.
_MAX_ENCODED = 8192
# Stand-in for the root name, which the URL leaves out and the NAR does not contain.
_ROOT_NAME = b"root"
_NAR_NAME = re.compile(r"([0-9a-df-np-sv-z]{52})\.nar((?:\.[a-z0-9]+)?)")


def encode_castore_nar(node: Node) -> str:
    """The path segment after :data:`CASTORE_NAR_PREFIX` for ``node`` (its name left out)."""
    message = node_to_proto(node)
    kind = message.WhichOneof("node")
    assert kind is not None
    getattr(message, kind).name = b""
    raw = message.SerializeToString(deterministic=True)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_castore_nar(encoded: str) -> Node:
    """The root node an encoded segment names; :class:`BadRequest` if it is not a valid one."""
    if len(encoded) > _MAX_ENCODED:
        raise BadRequest(f"NAR URL node too long ({len(encoded)} characters)")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        raise BadRequest(f"NAR URL node is not base64url: {encoded!r}") from None
    message = pb.Node()
    try:
        message.ParseFromString(raw)
    except DecodeError:
        raise BadRequest("NAR URL node is not a castore Node") from None
    kind = message.WhichOneof("node")
    if kind is None:
        raise BadRequest("NAR URL node is empty")
    inner = getattr(message, kind)
    if inner.name:
        raise BadRequest("NAR URL node must not carry a name")
    inner.name = _ROOT_NAME
    try:
        return node_from_proto(message)
    except ValidationError as e:
        raise BadRequest(f"NAR URL node is invalid: {e}") from None


@dataclass(frozen=True, slots=True)
class NarFileName:
    """``nar/<file hash>.nar[.ext]``: an uploaded (possibly compressed) NAR file."""

    file_hash: bytes
    extension: str

    @property
    def path(self) -> str:
        """The URL path, relative to the cache root: ``nar/<file hash>.nar[.ext]``."""
        return f"nar/{nixbase32.encode(self.file_hash)}.nar{self.extension}"


def parse_nar_file_name(name: str) -> NarFileName | None:
    """``<nixbase32 sha256>.nar[.ext]`` parsed, or ``None`` if ``name`` is not of that form."""
    match = _NAR_NAME.fullmatch(name)
    if match is None or not nixbase32.is_valid(match[1], 32):
        return None
    return NarFileName(nixbase32.decode(match[1]), match[2])


def parse_hash_part(text: str) -> bytes:
    """The 20-byte digest of a store path hash part (32 nixbase32 characters).

    Raises :class:`BadRequest` when ``text`` is not one.
    """
    if len(text) != 32 or not nixbase32.is_valid(text, 20):
        raise BadRequest(f"{text!r} is not a store path hash")
    return nixbase32.decode(text)
