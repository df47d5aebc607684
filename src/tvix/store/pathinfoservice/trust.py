"""A PathInfo service that serves only PathInfos signed by a trusted key.

Blobs and Directories verify themselves (they are addressed by their
digest); a PathInfo does not, so one from an untrusted source is only as
good as its signatures. Composition: ``type = "trusted"`` with ``inner``,
``trusted_public_keys`` and optionally ``verify_nar`` (see
:class:`TrustedPathInfoServiceConfig`), or build it directly.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.blobservice.base import BlobService
from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.directoryservice.base import DirectoryService
from tvix.castore.errors import IntegrityError, ValidationError
from tvix.nixcompat.errors import InvalidKeyError
from tvix.nixcompat.signing import VerifyingKey, parse_public_keys
from tvix.store.errors import UntrustedPathInfoError
from tvix.store.gcstate.base import GCState
from tvix.store.nar.calculate import NarCalculation, NarCalculator
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import Check, PathInfoService, check_digest
from tvix.store.trust import TrustPolicy

__all__ = ["TrustedPathInfoService", "TrustedPathInfoServiceConfig", "UntrustedPathInfoError"]

log = logging.getLogger(__name__)


class TrustedPathInfoService(PathInfoService):
    """Passes on a PathInfo from ``inner`` only when one of its signatures verifies.

    The check is a :class:`~tvix.store.trust.TrustPolicy` requiring a
    signature by one of ``trusted_keys`` (content-addressed paths get no
    exemption here). The signature covers the fingerprint Nix signs (store
    path, NAR hash, NAR size, references), not the root node that says
    where the contents are in castore. With ``verify_nar``, a PathInfo whose
    signature verifies is also checked against its contents: the NAR of its
    root node is rendered from ``blob_service`` and ``directory_service``
    (every blob is read) and its sha256 and size must be the signed ones, so
    a PathInfo whose root node was swapped is refused too. NAR results are
    remembered per root node (see
    :class:`~tvix.store.nar.calculate.NarCalculator`).

    Reads
        :meth:`get` asks ``inner`` (through
        :meth:`~tvix.store.pathinfoservice.base.PathInfoService.get_checked`)
        and returns its PathInfo when it passes :meth:`check`; a refused
        PathInfo raises :class:`~tvix.store.errors.UntrustedPathInfoError`
        naming why (it is not treated as absent: the caller learns that
        something untrusted was offered). When ``inner`` is a
        :class:`~tvix.store.pathinfoservice.race.RacePathInfoService`, the
        check runs inside the race, so a refused answer only disqualifies
        its source and a slower source's trusted answer can still win.
        :meth:`list` leaves out (with a warning) what the check refuses.
        :attr:`supports_list` and :attr:`supports_put` are ``inner``'s.
    Writes
        :meth:`put` stores into ``inner`` unchanged (no check: the writer
        vouches for what it writes). A PathInfo put without a trusted
        signature is refused when read back.
    Not cached
        Verdicts: every get checks again (NAR results excepted, see above).

    It does not close ``inner`` or the castore services: whoever built them does.
    """

    def __init__(
        self,
        inner: PathInfoService,
        trusted_keys: Iterable[VerifyingKey],
        verify_nar: bool = False,
        blob_service: BlobService | None = None,
        directory_service: DirectoryService | None = None,
        *,
        nar_calculator: NarCalculation | None = None,
    ) -> None:
        self.inner = inner
        self.policy = TrustPolicy(trusted_keys, verify_nar=verify_nar)
        self.trusted_keys = self.policy.keys
        self.verify_nar = verify_nar
        self._blobs = blob_service
        self._dirs = directory_service
        self._calc: NarCalculation | None = nar_calculator
        if verify_nar and self._calc is None:
            if blob_service is None or directory_service is None:
                raise ValueError("verify_nar needs the blob and directory services")
            self._calc = NarCalculator(blob_service, directory_service)

    @override
    @property
    def supports_list(self) -> bool:
        return self.inner.supports_list

    @override
    @property
    def supports_put(self) -> bool:
        return self.inner.supports_put

    @override
    @property
    def gc_state(self) -> GCState | None:
        return self.inner.gc_state  # the store is the inner one's

    async def check(self, info: PathInfo) -> None:
        """Return if ``info`` is trusted, else raise :class:`UntrustedPathInfoError`.

        Content missing for ``verify_nar`` raises the castore error (a
        :class:`~tvix.castore.errors.StorageError`).
        """
        self.policy.check_signatures(info)
        if self._calc is not None:
            await self.policy.check_content(
                info, self._blobs, self._dirs, nar_calculator=self._calc
            )

    def _check_for(self, digest: bytes) -> Check:
        async def check(info: PathInfo) -> None:
            if info.store_path.digest != digest:
                raise IntegrityError(
                    f"PathInfo {digest.hex()}: inner answered with {info.store_path}"
                )
            await self.check(info)

        return check

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        digest = check_digest(digest)
        return await self.inner.get_checked(digest, self._check_for(digest))

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        return await self.inner.put(info)

    @override
    async def list(self) -> AsyncIterator[PathInfo]:
        async for info in self.inner.list():
            try:
                await self.check(info)
            except UntrustedPathInfoError as e:
                log.warning("trusted: listing: skipping %s", e)
                continue
            yield info


@dataclass(frozen=True)
class TrustedPathInfoServiceConfig(ServiceConfig):
    """Type ``trusted``: ``inner`` (a name), ``trusted_public_keys``, ``verify_nar``.

    ``trusted_public_keys`` is Nix's format (space-separated ``name:base64``,
    at least one); ``verify_nar`` (default false) renders each NAR from the
    composition's default blob and directory services.
    """

    inner: str = setting("ref")
    trusted_public_keys: str = setting("str")
    verify_nar: bool = setting("bool", False)

    def build(self, ctx: BuildContext) -> TrustedPathInfoService:
        """``inner`` (and, with ``verify_nar``, the castore) come from the composition."""
        try:
            keys = parse_public_keys(self.trusted_public_keys)
        except InvalidKeyError as e:
            raise ValidationError(f"trusted_public_keys: {e}") from None
        if not keys:
            raise ValidationError(
                "trusted_public_keys names no key: every PathInfo would be refused"
            )
        inner = ctx.service(self.inner)
        if self.verify_nar:
            return TrustedPathInfoService(
                inner,
                keys.values(),
                verify_nar=True,
                blob_service=ctx.blob_service(),
                directory_service=ctx.directory_service(),
            )
        return TrustedPathInfoService(inner, keys.values())
