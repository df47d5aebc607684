"""Nix store paths: parsing, validation, and computing content-addressed paths.

A store path is ``/nix/store/<hash>-<name>``: ``<hash>`` is 32 nixbase32
characters (20 bytes), ``<name>`` 1 to 211 characters from
``A-Za-z0-9+-._?=``.

Leading dots: Nix 2.8 — the authority here — accepts names starting with
``.``, including ``.`` and ``..`` exactly, and so do we. Such names are
harmless in a store path, whose base name always starts with the hash; newer
Nix versions reject them, so a path named that way may not be portable.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from functools import total_ordering
from typing import Any, overload

from tvix.nixcompat import nixbase32
from tvix.nixcompat.cahash import CAHash, CAKind
from tvix.nixcompat.errors import InvalidCAHashError, InvalidStorePathError, Nixbase32Error
from tvix.nixcompat.hashes import HashAlgo

__all__ = [
    "DIGEST_SIZE",
    "HASH_PART_LEN",
    "MAX_NAME_LEN",
    "STORE_DIR",
    "StorePath",
    "build_ca_path",
    "compress_hash",
    "make_store_path",
    "validate_name",
]

#: The logical store directory; part of every store path hash.
STORE_DIR = "/nix/store"
_STORE_PREFIX = STORE_DIR + "/"
_STORE_PREFIX_B = _STORE_PREFIX.encode()
#: Length of a store path digest in bytes.
DIGEST_SIZE = 20
#: Length of a store path's hash part in characters.
HASH_PART_LEN = 32
#: The longest name Nix accepts.
MAX_NAME_LEN = 211

_NAME_RE = re.compile(r"[A-Za-z0-9+\-._?=]{1,211}")
_NAME_BAD_CHAR_RE = re.compile(r"[^A-Za-z0-9+\-._?=]")


def validate_name(name: str) -> str:
    """Check that *name* is a valid store path name and return it.

    Raises:
        InvalidStorePathError: the name is empty, longer than 211 characters,
            or has a character outside ``A-Za-z0-9+-._?=`` (the message names it).
    """
    if _NAME_RE.fullmatch(name) is not None:
        return name
    if not name:
        raise InvalidStorePathError("store path name is empty")
    bad = _NAME_BAD_CHAR_RE.search(name)
    if bad is not None:
        raise InvalidStorePathError(
            f"invalid character {bad.group()!r} at position {bad.start()} "
            f"in store path name {name!r}"
        )
    raise InvalidStorePathError(
        f"store path name {name[:40]!r}… is {len(name)} characters, longer than {MAX_NAME_LEN}"
    )


@total_ordering
class StorePath:
    """An immutable, validated store path: a 20-byte digest and a name.

    Equal store paths compare and hash equal; they order by base name, as
    Nix orders them (which is *not* the order of the digest bytes).
    ``str()`` gives the absolute path.
    """

    __slots__ = ("_digest", "_hash_part", "_name")

    _digest: bytes
    _name: str
    _hash_part: str

    def __init__(self, digest: bytes, name: str) -> None:
        """Build a store path from its 20-byte *digest* and *name*.

        Raises:
            InvalidStorePathError: the digest is not 20 bytes or the name is invalid.
        """
        digest = bytes(digest)
        if len(digest) != DIGEST_SIZE:
            raise InvalidStorePathError(
                f"store path digest must be {DIGEST_SIZE} bytes, not {len(digest)}"
            )
        object.__setattr__(self, "_digest", digest)
        object.__setattr__(self, "_name", validate_name(name))
        object.__setattr__(self, "_hash_part", nixbase32.encode(digest))

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, key: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    @classmethod
    def _from_parts(cls, hash_part: str, name: str, what: str) -> StorePath:
        try:
            digest = nixbase32.decode(hash_part)
        except Nixbase32Error as e:
            raise InvalidStorePathError(f"invalid hash part in {what!r}: {e}") from None
        try:
            validate_name(name)
        except InvalidStorePathError as e:
            raise InvalidStorePathError(f"{e} (in {what!r})") from None
        path = object.__new__(cls)
        object.__setattr__(path, "_digest", digest)
        object.__setattr__(path, "_name", name)
        object.__setattr__(path, "_hash_part", hash_part)
        return path

    @classmethod
    def from_base_name(cls, base_name: str | bytes) -> StorePath:
        """Parse ``<hash>-<name>`` (for example a PathInfo root node's name).

        Raises:
            InvalidStorePathError: no ``-`` after a 32-character hash part,
                invalid nixbase32 in the hash part, or an invalid name; the
                message says which.
        """
        if not isinstance(base_name, str):
            raw = bytes(base_name)
            try:
                base_name = raw.decode("ascii")
            except UnicodeDecodeError:
                raise InvalidStorePathError(f"store path base name {raw!r} is not ASCII") from None
        if len(base_name) > HASH_PART_LEN and base_name[HASH_PART_LEN] == "-":
            return cls._from_parts(
                base_name[:HASH_PART_LEN], base_name[HASH_PART_LEN + 1 :], base_name
            )
        dash = base_name.find("-")
        if dash == -1:
            raise InvalidStorePathError(
                f"store path base name {base_name!r} lacks the '-' between hash part and name"
            )
        raise InvalidStorePathError(
            f"hash part of store path base name {base_name!r} is {dash} characters, "
            f"expected {HASH_PART_LEN}"
        )

    @classmethod
    def from_absolute_path(cls, path: str | bytes) -> StorePath:
        """Parse ``/nix/store/<hash>-<name>``.

        Raises:
            InvalidStorePathError: the path is not directly in ``/nix/store``
                (a sub path is an error here, see :meth:`from_absolute_path_full`),
                or the base name is invalid.
        """
        store_path, sub = cls.from_absolute_path_full(path)
        if sub:
            raise InvalidStorePathError(f"{path!r} is below a store path, not a store path")
        return store_path

    @overload
    @classmethod
    def from_absolute_path_full(cls, path: str) -> tuple[StorePath, str]: ...
    @overload
    @classmethod
    def from_absolute_path_full(cls, path: bytes) -> tuple[StorePath, bytes]: ...
    @classmethod
    def from_absolute_path_full(cls, path: str | bytes) -> tuple[StorePath, str | bytes]:
        """Parse ``/nix/store/<hash>-<name>[/<sub path>]``.

        Returns the store path and the sub path relative to it, without the
        leading ``/`` (empty if there is none), of the same type as *path*.
        A single trailing ``/`` is allowed. The sub path is not validated.

        Raises:
            InvalidStorePathError: the path is not under ``/nix/store/`` or its
                base name is invalid.
        """
        if isinstance(path, str):
            if not path.startswith(_STORE_PREFIX):
                raise InvalidStorePathError(f"{path!r} is not in the store {STORE_DIR!r}")
            base, _, sub = path[len(_STORE_PREFIX) :].partition("/")
            return cls.from_base_name(base), sub
        if not path.startswith(_STORE_PREFIX_B):
            raise InvalidStorePathError(f"{path!r} is not in the store {STORE_DIR!r}")
        base_b, _, sub_b = bytes(path[len(_STORE_PREFIX_B) :]).partition(b"/")
        return cls.from_base_name(base_b), sub_b

    @property
    def digest(self) -> bytes:
        """The 20-byte digest (the nixbase32-decoded hash part)."""
        return self._digest

    @property
    def name(self) -> str:
        """The name, the part after ``<hash>-``."""
        return self._name

    @property
    def hash_part(self) -> str:
        """The 32-character nixbase32 hash part."""
        return self._hash_part

    @property
    def base_name(self) -> str:
        """``<hash>-<name>``."""
        return f"{self._hash_part}-{self._name}"

    @property
    def absolute_path(self) -> str:
        """``/nix/store/<hash>-<name>``."""
        return f"{_STORE_PREFIX}{self._hash_part}-{self._name}"

    def __str__(self) -> str:
        return self.absolute_path

    def __repr__(self) -> str:
        return f"StorePath({self.absolute_path!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StorePath):
            return NotImplemented
        return self._digest == other._digest and self._name == other._name

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, StorePath):
            return NotImplemented
        return (self._hash_part, self._name) < (other._hash_part, other._name)

    def __hash__(self) -> int:
        return hash((self._digest, self._name))

    def __reduce__(self) -> tuple[Any, ...]:
        return (StorePath, (self._digest, self._name))


def compress_hash(digest: bytes, size: int = DIGEST_SIZE) -> bytes:
    """XOR-fold *digest* to *size* bytes: byte *i* goes into byte ``i % size``.

    This is how Nix shortens a sha256 to the 20 bytes of a store path hash.
    """
    out = bytearray(size)
    for i, b in enumerate(digest):
        out[i % size] ^= b
    return bytes(out)


def make_store_path(path_type: str, inner_sha256: bytes, name: str) -> StorePath:
    """Return the store path Nix's ``makeStorePath`` computes.

    That is ``compress_hash(sha256("<path_type>:sha256:<hex inner>:/nix/store:<name>"))``
    with *name*. *path_type* is e.g. ``source``, ``text:<ref>…``, ``output:out``.

    Raises:
        InvalidStorePathError: *name* is not a valid store path name.
        ValueError: *inner_sha256* is not 32 bytes.
    """
    if len(inner_sha256) != 32:
        raise ValueError(f"inner sha256 must be 32 bytes, not {len(inner_sha256)}")
    validate_name(name)
    fingerprint = f"{path_type}:sha256:{inner_sha256.hex()}:{STORE_DIR}:{name}"
    return StorePath(compress_hash(hashlib.sha256(fingerprint.encode()).digest()), name)


def _reference_path(ref: str | StorePath) -> str:
    if isinstance(ref, StorePath):
        return ref.absolute_path
    if ref.startswith("/"):
        return StorePath.from_absolute_path(ref).absolute_path
    return StorePath.from_base_name(ref).absolute_path


def build_ca_path(
    name: str,
    ca_hash: CAHash,
    references: Iterable[str | StorePath] = (),
    self_reference: bool = False,
) -> StorePath:
    """Return the store path of content-addressed content, as Nix computes it.

    *references* are other store paths (``StorePath``, absolute paths or
    base names; duplicates collapse), *self_reference* says whether the
    content refers to its own path.

    - ``NAR`` with sha256 (``nix-store --add``): type ``source`` followed by
      ``:<ref>`` per sorted reference and ``:self``, over the NAR hash.
    - ``TEXT`` (``builtins.toFile``): type ``text`` plus references, over
      the sha256 of the bytes; it cannot refer to itself.
    - ``FLAT``, and ``NAR`` with another algorithm (``--add-fixed``): type
      ``output:out`` over ``sha256("fixed:out:[r:]<algo>:<hex>:")``; no
      references at all.

    Raises:
        InvalidCAHashError: references or a self reference where the kind
            allows none.
        InvalidStorePathError: an invalid name or reference.
    """
    refs = sorted({_reference_path(r) for r in references})
    if ca_hash.kind is CAKind.TEXT:
        if self_reference:
            raise InvalidCAHashError("a text store path cannot refer to itself")
        return make_store_path(":".join(["text", *refs]), ca_hash.digest, name)
    if ca_hash.kind is CAKind.NAR and ca_hash.algo is HashAlgo.SHA256:
        parts = ["source", *refs]
        if self_reference:
            parts.append("self")
        return make_store_path(":".join(parts), ca_hash.digest, name)
    if refs or self_reference:
        raise InvalidCAHashError(
            f"a fixed-output path hashed {'recursively' if ca_hash.kind is CAKind.NAR else 'flat'}"
            f" with {ca_hash.algo} cannot have references"
        )
    recursive = "r:" if ca_hash.kind is CAKind.NAR else ""
    inner = f"fixed:out:{recursive}{ca_hash.algo}:{ca_hash.digest.hex()}:"
    return make_store_path("output:out", hashlib.sha256(inner.encode()).digest(), name)
