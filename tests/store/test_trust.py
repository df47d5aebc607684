"""Trusting only signed PathInfos: signatures, NAR verification, racing with trust."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tests.support.daemons import fake_store_path, relocated
from tests.support.trees import make_tree
from tvix.castore.blobservice import MemoryBlobService
from tvix.castore.directoryservice import MemoryDirectoryService
from tvix.castore.errors import IntegrityError
from tvix.nixcompat.signing import SigningKey
from tvix.store.composition import Composition, CompositionError
from tvix.store.importer import import_path
from tvix.store.pathinfo import PathInfo
from tvix.store.pathinfoservice import MemoryPathInfoService
from tvix.store.pathinfoservice.race import RacePathInfoService
from tvix.store.pathinfoservice.trust import TrustedPathInfoService, UntrustedPathInfoError

TRUSTED = SigningKey.generate("trusted.example.org-1")
STRANGER = SigningKey.generate("stranger.example.org-1")


class Store:
    def __init__(self) -> None:
        self.blobs = MemoryBlobService()
        self.dirs = MemoryDirectoryService()
        self.infos = MemoryPathInfoService()


@pytest.fixture
async def content(tmp_path: Path) -> tuple[Store, PathInfo, PathInfo]:
    """A store holding two trees; their PathInfos (unsigned)."""
    store = Store()
    a = await import_path(store.blobs, store.dirs, store.infos, make_tree(tmp_path / "a"))
    single = tmp_path / "b"
    single.write_bytes(b"other contents")
    b = await import_path(store.blobs, store.dirs, store.infos, single)
    return store, a, b


async def test_signatures(content: tuple[Store, PathInfo, PathInfo]) -> None:
    _, a, _ = content
    sp = fake_store_path("signed")
    inner = MemoryPathInfoService()
    trusted = TrustedPathInfoService(inner, [TRUSTED.to_public()])

    await inner.put(relocated(a, sp))
    with pytest.raises(UntrustedPathInfoError, match=r"is not signed by a trusted key \(unsigned"):
        await trusted.get(sp.digest)

    await inner.put(relocated(a, sp).with_signature(STRANGER))
    with pytest.raises(UntrustedPathInfoError, match=r"signed by stranger\.example\.org-1;"):
        await trusted.get(sp.digest)

    # A signature by a trusted key's name, made with another key, does not verify.
    impostor = SigningKey.generate(TRUSTED.name)
    await inner.put(relocated(a, sp).with_signature(impostor))
    with pytest.raises(UntrustedPathInfoError):
        await trusted.get(sp.digest)

    good = relocated(a, sp).with_signature(STRANGER).with_signature(TRUSTED)
    await inner.put(good)
    assert await trusted.get(sp.digest) == good
    assert await trusted.get(fake_store_path("absent").digest) is None
    assert [i async for i in trusted.list()] == [good]

    # The signature covers the references: changing them breaks it.
    await inner.put(
        PathInfo(
            store_path=sp,
            node=good.node,
            nar_size=good.nar_size,
            nar_sha256=good.nar_sha256,
            references=(fake_store_path("smuggled"),),
            signatures=good.signatures,
        )
    )
    with pytest.raises(UntrustedPathInfoError):
        await trusted.get(sp.digest)


async def test_verify_nar_catches_a_swapped_root_node(
    content: tuple[Store, PathInfo, PathInfo],
) -> None:
    store, a, b = content
    sp = fake_store_path("swapped")
    honest = relocated(a, sp).with_signature(TRUSTED)
    # Same signed fingerprint (path, NAR hash and size, references), other contents.
    swapped = PathInfo(
        store_path=sp,
        node=b.node.renamed(sp.base_name.encode()),
        nar_size=honest.nar_size,
        nar_sha256=honest.nar_sha256,
        signatures=honest.signatures,
    )
    keys = [TRUSTED.to_public()]
    inner = MemoryPathInfoService()
    await inner.put(swapped)
    # The signature alone cannot tell.
    assert await TrustedPathInfoService(inner, keys).get(sp.digest) == swapped
    checking = TrustedPathInfoService(
        inner, keys, verify_nar=True, blob_service=store.blobs, directory_service=store.dirs
    )
    with pytest.raises(UntrustedPathInfoError, match="not the signed"):
        await checking.get(sp.digest)
    await inner.put(honest)
    assert await checking.get(sp.digest) == honest


async def test_race_with_trust_prefers_the_signed_answer(
    content: tuple[Store, PathInfo, PathInfo], caplog: pytest.LogCaptureFixture
) -> None:
    """A fast source's unsigned answer disqualifies that source only."""
    _, a, _ = content
    sp = fake_store_path("raced")
    fast_answered = asyncio.Event()
    fast, slow = _Signalling(fast_answered), _Gated(fast_answered)
    await fast.put(relocated(a, sp))
    signed = relocated(a, sp).with_signature(TRUSTED)
    await slow.put(signed)
    race = RacePathInfoService([fast, slow])
    trusted = TrustedPathInfoService(race, [TRUSTED.to_public()])
    with caplog.at_level(logging.WARNING):
        assert await trusted.get(sp.digest) == signed
    assert "is not signed by a trusted key" in caplog.text
    # Without the race knowing the check, the fast unsigned answer would win (and be refused).
    assert await race.get(sp.digest) == relocated(a, sp)
    # When no source has a trusted answer, the refusal is what the caller gets.
    await slow.put(relocated(a, sp).with_signature(STRANGER))
    with pytest.raises(UntrustedPathInfoError, match="no source had it"):
        await trusted.get(sp.digest)


async def test_wrong_store_path_refused(content: tuple[Store, PathInfo, PathInfo]) -> None:
    _, a, _ = content

    class Liar(MemoryPathInfoService):
        async def get(self, digest: bytes) -> PathInfo | None:
            return relocated(a, fake_store_path("other")).with_signature(TRUSTED)

    with pytest.raises(IntegrityError, match="inner answered with"):
        await TrustedPathInfoService(Liar(), [TRUSTED.to_public()]).get(
            fake_store_path("asked").digest
        )


class _Signalling(MemoryPathInfoService):
    """Sets ``answered`` each time it has answered a get."""

    def __init__(self, answered: asyncio.Event) -> None:
        super().__init__()
        self.answered = answered

    async def get(self, digest: bytes) -> PathInfo | None:
        try:
            return await super().get(digest)
        finally:
            self.answered.set()


class _Gated(MemoryPathInfoService):
    """Answers a get only once ``gate`` is set, and clears it: each get waits for a new
    answer of the source that sets it (so which source answers first is not left to
    timing)."""

    def __init__(self, gate: asyncio.Event) -> None:
        super().__init__()
        self.gate = gate

    async def get(self, digest: bytes) -> PathInfo | None:
        await self.gate.wait()
        self.gate.clear()
        return await super().get(digest)


async def test_composition(tmp_path: Path) -> None:
    text = f"""
    [pathinfoservices.default]
    type = "trusted"
    inner = "db"
    trusted_public_keys = "{TRUSTED.to_public()} {STRANGER.to_public()}"
    verify_nar = true
    [pathinfoservices.db]
    type = "memory"
    [blobservices.default]
    type = "memory"
    [directoryservices.default]
    type = "memory"
    """
    async with Composition.from_toml(text, base_dir=tmp_path) as comp:
        svc = comp.path_info_service()
        assert isinstance(svc, TrustedPathInfoService)
        assert sorted(svc.trusted_keys) == sorted([TRUSTED.name, STRANGER.name])
        assert svc.verify_nar
    bad = '[pathinfoservices.default]\ntype = "trusted"\ninner = "d"\n'
    bad += '[pathinfoservices.d]\ntype = "memory"\n'
    with pytest.raises(CompositionError, match="missing key 'trusted_public_keys'"):
        Composition.from_toml(bad).path_info_service()
    with pytest.raises(CompositionError, match="names no key"):
        Composition.from_toml(
            bad.replace('inner = "d"\n', 'inner = "d"\ntrusted_public_keys = " "\n')
        ).path_info_service()
    with pytest.raises(CompositionError, match="trusted_public_keys: public key"):
        Composition.from_toml(
            bad.replace('inner = "d"\n', 'inner = "d"\ntrusted_public_keys = "x:abc"\n')
        ).path_info_service()
