"""A PathInfo service that signs every PathInfo put through it.

Composition only (it wraps another service and reads a key file): name it
``type = "signing"`` in a composition file, or build it directly.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from typing_extensions import override

from tvix.castore.composition import BuildContext, ServiceConfig, setting
from tvix.castore.errors import ValidationError
from tvix.nixcompat.signing import SigningKey
from tvix.store.gcstate.base import GCState
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice.base import PathInfoService

__all__ = ["SigningPathInfoService", "SigningPathInfoServiceConfig"]


class SigningPathInfoService(PathInfoService):
    """Adds ``key``'s ed25519 signature to each PathInfo put, then stores it in ``inner``.

    Reads
        :meth:`get` and :meth:`list` go to ``inner`` unchanged (PathInfos
        stored there earlier, or by others, may be unsigned);
        :attr:`supports_list` and :attr:`supports_put` are ``inner``'s.
    Writes
        :meth:`put` signs the PathInfo's fingerprint with ``key`` (replacing
        an earlier signature by a key of the same name, keeping the others),
        stores that in ``inner``, and returns what ``inner`` returned.

    It does not close ``inner``: whoever built it does.
    """

    def __init__(self, inner: PathInfoService, key: SigningKey) -> None:
        self.inner = inner
        self.key = key

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

    @override
    async def get(self, digest: bytes) -> PathInfo | None:
        return await self.inner.get(digest)

    @override
    async def put(self, info: PathInfo) -> PathInfo:
        return await self.inner.put(info.with_signature(self.key))

    @override
    def list(self) -> AsyncIterator[PathInfo]:
        return self.inner.list()


@dataclass(frozen=True)
class SigningPathInfoServiceConfig(ServiceConfig):
    """Type ``signing``: ``inner`` (a name) and ``key_file`` (a Nix secret key file)."""

    inner: str = setting("ref")
    key_file: str = setting("path")

    def build(self, ctx: BuildContext) -> SigningPathInfoService:
        """Reads the key file; ``inner`` comes from the composition."""
        try:
            key = SigningKey.from_file(self.key_file)
        except (OSError, ValueError) as e:
            # ValueError: nixcompat's InvalidKeyError; its message does not name the file.
            raise ValidationError(f"cannot use key_file {self.key_file}: {e}") from None
        return SigningPathInfoService(ctx.service(self.inner), key)
