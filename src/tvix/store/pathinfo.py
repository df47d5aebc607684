"""``PathInfo``: a Nix store path, the root node of its contents, and its Nix metadata."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nixcompat import nixbase32
from tvix.nixcompat.cahash import CAHash
from tvix.nixcompat.narinfo import NarInfo, fingerprint
from tvix.nixcompat.signing import Signature, SigningKey, VerifyingKey
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import InvalidPathInfoError

__all__ = ["PathInfo"]


@dataclass(frozen=True, slots=True)
class PathInfo:
    """A store path and its contents in castore, with what a narinfo needs.

    Immutable and validated when built (:class:`InvalidPathInfoError`
    names the rule broken):

    - ``node`` is named after ``store_path``'s base name (``<hash>-<name>``);
    - ``nar_sha256`` is 32 bytes and ``nar_size`` is positive;
    - ``references`` are store paths (the wire form keeps their 20-byte
      digests and full names side by side), without duplicates;
    - ``signatures`` carry a key name and 64 bytes each;
    - ``deriver``, when known, names a ``.drv`` store path.
    """

    store_path: StorePath
    node: Node
    nar_size: int
    nar_sha256: bytes
    references: tuple[StorePath, ...] = ()
    signatures: tuple[Signature, ...] = ()
    deriver: StorePath | None = None
    ca: CAHash | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.store_path, StorePath):
            raise InvalidPathInfoError(f"store path must be a StorePath, not {self.store_path!r}")
        if not isinstance(self.node, DirectoryNode | FileNode | SymlinkNode):
            raise InvalidPathInfoError(f"root node must be a castore node, not {self.node!r}")
        base = self.store_path.base_name.encode()
        if self.node.name != base:
            raise InvalidPathInfoError(
                f"root node name {self.node.name!r} differs from the store path's base name "
                f"{base.decode()!r}"
            )
        if len(self.nar_sha256) != 32:
            raise InvalidPathInfoError(
                f"NAR sha256 of {self.store_path} must be 32 bytes, not {len(self.nar_sha256)}"
            )
        if self.nar_size <= 0:
            raise InvalidPathInfoError(
                f"NAR size of {self.store_path} must be positive, not {self.nar_size}"
            )
        refs = tuple(self.references)
        for ref in refs:
            if not isinstance(ref, StorePath):
                raise InvalidPathInfoError(
                    f"reference {ref!r} of {self.store_path} is no StorePath"
                )
        if len(set(refs)) != len(refs):
            raise InvalidPathInfoError(f"duplicate references in {self.store_path}")
        object.__setattr__(self, "references", refs)
        sigs = tuple(self.signatures)
        for sig in sigs:
            if not isinstance(sig, Signature):
                raise InvalidPathInfoError(
                    f"signature {sig!r} of {self.store_path} is no Signature"
                )
        object.__setattr__(self, "signatures", sigs)
        if self.deriver is not None and not self.deriver.name.endswith(".drv"):
            raise InvalidPathInfoError(
                f"deriver {self.deriver} of {self.store_path} does not end in .drv"
            )

    def fingerprint(self) -> str:
        """The string Nix signs: ``1;<path>;sha256:<nar hash>;<nar size>;<refs>``."""
        return fingerprint(self.store_path, self.nar_sha256, self.nar_size, self.references)

    def with_signature(self, key: SigningKey) -> PathInfo:
        """A copy signed by ``key`` (replacing an earlier signature by the same key name)."""
        sig = key.sign(self.fingerprint())
        others = tuple(s for s in self.signatures if s.name != sig.name)
        return _replace(self, signatures=(*others, sig))

    def with_signatures(self, extra: Iterable[Signature]) -> PathInfo:
        """A copy with the signatures of both (one per key name and data)."""
        sigs = list(self.signatures)
        for sig in extra:
            if sig not in sigs:
                sigs.append(sig)
        return _replace(self, signatures=tuple(sigs))

    def verify(self, keys: Iterable[VerifyingKey]) -> bool:
        """Whether a signature verifies against one of the trusted ``keys``."""
        fp = self.fingerprint()
        by_name = {k.name: k for k in keys}
        return any(
            (key := by_name.get(sig.name)) is not None and key.verify(fp, sig)
            for sig in self.signatures
        )

    @classmethod
    def from_narinfo(cls, narinfo: NarInfo, node: Node) -> PathInfo:
        """The PathInfo ``narinfo`` describes, its contents at ``node`` (renamed as the path).

        ``node`` must be the root of the NAR the narinfo's ``NarHash`` and
        ``NarSize`` describe: checking that is the caller's job. The
        narinfo's references, signatures, deriver and content address are
        kept; its file fields (``URL``, ``Compression``, ``FileHash``) are
        about one copy of the NAR and are not.
        """
        return cls(
            store_path=narinfo.store_path,
            node=node.renamed(narinfo.store_path.base_name.encode()),
            nar_size=narinfo.nar_size,
            nar_sha256=narinfo.nar_hash,
            references=narinfo.references,
            signatures=narinfo.signatures,
            deriver=narinfo.deriver,
            ca=narinfo.ca,
        )

    def to_narinfo(self, url: str | None = None, compression: str = "none") -> NarInfo:
        """The narinfo Nix would serve for this path (uncompressed NAR by default).

        ``url`` defaults to ``nar/<nixbase32 NAR sha256>.nar``, as Nix names an
        uncompressed NAR; FileHash and FileSize then equal NarHash and NarSize.
        """
        plain = compression == "none"
        return NarInfo(
            store_path=self.store_path,
            url=url if url is not None else f"nar/{nixbase32.encode(self.nar_sha256)}.nar",
            compression=compression,
            file_hash=self.nar_sha256 if plain else None,
            file_size=self.nar_size if plain else None,
            nar_hash=self.nar_sha256,
            nar_size=self.nar_size,
            references=self.references,
            deriver=self.deriver,
            signatures=self.signatures,
            ca=self.ca,
        )


def _replace(info: PathInfo, **changes: object) -> PathInfo:
    return replace(info, **changes)  # type: ignore[arg-type]
