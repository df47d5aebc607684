"""Whether a PathInfo may be used: one trust policy for every way into the store.

Blobs and Directories verify themselves (they are addressed by their
digest); a PathInfo does not, so one from a source we do not control is
only as good as its signatures. :class:`TrustPolicy` decides, as Nix does
for substitutes, and is what the ``nix+http`` PathInfo service, the
``trusted`` combinator and :class:`~tvix.store.copy.StoreSource` apply:

signatures (:meth:`TrustPolicy.check_signatures`)
    With ``require_sigs``, a PathInfo (or the narinfo it comes from) needs a
    signature that verifies under one of ``keys``, or, with ``accept_ca``,
    to be content-addressed with the store path its content address gives.
    Anything else raises :class:`~tvix.store.errors.UntrustedPathInfoError`.
content (:meth:`TrustPolicy.check_content`)
    A signature covers the NAR hash, not the root node that says where the
    contents are in castore. With ``verify_nar``, the NAR of the root node
    is rendered and must have the signed sha256 and size (else
    :class:`~tvix.store.errors.UntrustedPathInfoError`). With ``accept_ca``,
    the content of a content-addressed path must match its content address
    (as Nix checks when importing; else
    :class:`~tvix.castore.errors.IntegrityError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from tvix.castore.blobservice.base import BlobService
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, StorageError
from tvix.castore.nodes import FileNode
from tvix.nixcompat import nixbase32
from tvix.nixcompat.cahash import CAHash, CAKind
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.hashes import HashAlgo
from tvix.nixcompat.narinfo import NarInfo
from tvix.nixcompat.signing import VerifyingKey
from tvix.nixcompat.storepath import build_ca_path
from tvix.store.errors import UntrustedPathInfoError
from tvix.store.nar.calculate import NarCalculation, calculate_nar
from tvix.store.nar.render import render_nar
from tvix.store.pathinfo import PathInfo

__all__ = ["TrustPolicy", "UntrustedPathInfoError", "check_ca_content"]


class TrustPolicy:
    """Which PathInfos are trusted: signed by ``keys``, or content-addressed (see the module docs).

    ``require_sigs=False`` trusts every signature-wise (the content checks
    still apply when asked for). A policy needs castore services only for
    its content checks.
    """

    __slots__ = ("accept_ca", "keys", "require_sigs", "verify_nar")

    def __init__(
        self,
        keys: Mapping[str, VerifyingKey] | Iterable[VerifyingKey] = (),
        *,
        require_sigs: bool = True,
        accept_ca: bool = False,
        verify_nar: bool = False,
    ) -> None:
        self.keys: Mapping[str, VerifyingKey] = (
            dict(keys) if isinstance(keys, Mapping) else {k.name: k for k in keys}
        )
        self.require_sigs = require_sigs
        self.accept_ca = accept_ca
        self.verify_nar = verify_nar

    def __repr__(self) -> str:
        return (
            f"TrustPolicy(keys={sorted(self.keys)}, require_sigs={self.require_sigs}, "
            f"accept_ca={self.accept_ca}, verify_nar={self.verify_nar})"
        )

    def check_signatures(self, info: PathInfo | NarInfo) -> None:
        """Return if ``info`` is trusted by its signatures (or content address), else raise.

        Raises :class:`~tvix.store.errors.UntrustedPathInfoError` naming who
        signed it and which keys are trusted. Works on a narinfo too, so a
        NAR is not downloaded for a path that would be refused.
        """
        if not self.require_sigs or info.verify(self.keys.values()):
            return
        if self.accept_ca and _ca_path_ok(info):
            return
        signers = sorted({s.name for s in info.signatures})
        known = ", ".join(sorted(self.keys)) or "none"
        why = (
            f"signed by {', '.join(signers)}; no valid signature by a trusted key"
            if signers
            else "unsigned: no signature to check"
        )
        raise UntrustedPathInfoError(
            f"{info.store_path} is not signed by a trusted key ({why}; trusted: {known})"
        )

    async def check_content(
        self,
        info: PathInfo,
        blob_service: BlobService | None,
        directory_service: DirectoryService | None,
        *,
        nar_calculator: NarCalculation | None = None,
    ) -> None:
        """Check what ``info``'s root node points to, as far as the policy asks (module docs).

        ``nar_calculator`` (optional) computes the NAR, e.g. a
        :class:`~tvix.store.nar.calculate.NarCalculator` that remembers
        results. Content missing from the services raises the castore error
        (a :class:`~tvix.castore.errors.StorageError`).
        """
        if self.verify_nar:
            if nar_calculator is not None:
                size, sha256 = await nar_calculator.calculate(info.node)
            elif blob_service is not None and directory_service is not None:
                size, sha256 = await calculate_nar(blob_service, directory_service, info.node)
            else:
                raise ValueError("verify_nar needs the blob and directory services")
            if (size, sha256) != (info.nar_size, info.nar_sha256):
                raise UntrustedPathInfoError(
                    f"{info.store_path}: the contents its root node points to are not the NAR "
                    f"its PathInfo describes: sha256:{nixbase32.encode(sha256)} ({size} "
                    "bytes), not the signed "
                    f"sha256:{nixbase32.encode(info.nar_sha256)} ({info.nar_size} bytes)"
                )
        if self.accept_ca and info.ca is not None:
            if blob_service is None or directory_service is None:
                raise ValueError("checking content addresses needs the blob and directory services")
            await check_ca_content(blob_service, directory_service, info, info.ca)

    async def check(
        self,
        info: PathInfo,
        blob_service: BlobService | None = None,
        directory_service: DirectoryService | None = None,
        *,
        nar_calculator: NarCalculation | None = None,
    ) -> None:
        """:meth:`check_signatures`, then :meth:`check_content`."""
        self.check_signatures(info)
        await self.check_content(
            info, blob_service, directory_service, nar_calculator=nar_calculator
        )


def _ca_path_ok(info: PathInfo | NarInfo) -> bool:
    """Whether ``info`` is content-addressed and its store path is the one its address gives."""
    ca = info.ca
    if ca is None:
        return False
    path = info.store_path
    refs = [r for r in info.references if r != path]
    try:
        computed = build_ca_path(
            path.name, ca, refs, self_reference=len(refs) != len(info.references)
        )
    except NixCompatError:
        return False
    return computed == path


async def check_ca_content(
    blobs: BlobService, dirs: DirectoryService, info: PathInfo, ca: CAHash
) -> None:
    """Raise :class:`IntegrityError` unless the stored content hashes to ``ca``."""
    if ca.kind is CAKind.NAR:
        if ca.algo is HashAlgo.SHA256:
            got = info.nar_sha256
        else:
            h = hashlib.new(str(ca.algo))
            async for piece in render_nar(blobs, dirs, info.node):
                h.update(piece)
            got = h.digest()
    else:
        node = info.node
        if not isinstance(node, FileNode):
            raise IntegrityError(
                f"{info.store_path}: content address {ca} is of a file, the NAR is not one"
            )
        reader = await blobs.open_read(node.digest)
        if reader is None:
            raise StorageError(f"{info.store_path}: blob {node.digest.hex()} vanished")
        h = hashlib.new(str(ca.algo))
        async with reader:
            while chunk := await reader.read(1 << 20):
                h.update(chunk)
        got = h.digest()
    if got != ca.digest:
        raise IntegrityError(
            f"{info.store_path}: content does not match its content address {ca} "
            f"({ca.algo} of the content is {got.hex()})"
        )
