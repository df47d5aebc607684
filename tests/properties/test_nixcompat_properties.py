"""Property tests of the Nix format parsers that face the network.

Generated inputs, and mutations of valid ones, either parse or raise the
package's own :class:`~tvix.nixcompat.errors.NixCompatError`: nothing else
escapes, and valid inputs round-trip.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvix.nixcompat import nixbase32
from tvix.nixcompat.errors import NARError, NarInfoError, NixCompatError
from tvix.nixcompat.nar.reader import read_nar_chunks
from tvix.nixcompat.narinfo import NarInfo
from tvix.nixcompat.storepath import StorePath

from .strategies import mutated, nar_of, nix_hashes, store_names, trees

pytestmark = pytest.mark.property


@given(st.binary(max_size=64))
def test_nixbase32_round_trip(data: bytes) -> None:
    assert nixbase32.decode(nixbase32.encode(data)) == data


@given(st.one_of(st.text(max_size=80), st.binary(max_size=80)))
def test_nixbase32_decode_never_crashes(text: str | bytes) -> None:
    with contextlib.suppress(NixCompatError):
        nixbase32.decode(text)


@given(nix_hashes, store_names)
def test_store_path_round_trip(hash_part: str, name: str) -> None:
    path = StorePath.from_base_name(f"{hash_part}-{name}")
    assert StorePath.from_absolute_path(path.absolute_path) == path
    assert path.name == name


@given(
    st.one_of(
        st.text(max_size=120),
        st.builds(lambda h, n: f"/nix/store/{h}-{n}", nix_hashes, st.text(max_size=60)),
        mutated(
            st.builds(lambda h, n: f"/nix/store/{h}-{n}".encode(), nix_hashes, store_names)
        ).map(lambda b: b.decode("latin-1")),
    )
)
def test_store_path_parsing_never_crashes(text: str) -> None:
    with contextlib.suppress(NixCompatError):
        StorePath.from_absolute_path(text)
    with contextlib.suppress(NixCompatError):
        StorePath.from_base_name(text)


def _narinfo_text(hash_part: str, name: str, refs: list[str], size: int) -> bytes:
    path = f"/nix/store/{hash_part}-{name}"
    digest = nixbase32.encode(bytes(32))
    lines = [
        f"StorePath: {path}",
        f"URL: nar/{digest}.nar",
        "Compression: none",
        f"FileHash: sha256:{digest}",
        f"FileSize: {size}",
        f"NarHash: sha256:{digest}",
        f"NarSize: {size}",
        f"References: {' '.join(refs)}",
        "Sig: cache.example.org-1:" + "A" * 86 + "==",
    ]
    return ("\n".join(lines) + "\n").encode()


narinfos = st.builds(
    _narinfo_text,
    nix_hashes,
    store_names,
    # Unique: Nix's references are a set (render and the fingerprint dedupe them).
    st.lists(st.builds(lambda h, n: f"{h}-{n}", nix_hashes, store_names), max_size=3, unique=True),
    st.integers(1, 2**63),
)


@given(narinfos)
def test_narinfo_round_trip(text: bytes) -> None:
    info = NarInfo.parse(text)
    again = NarInfo.parse(info.render())
    assert again.render() == info.render()
    assert set(again.references) == set(info.references)  # rendered sorted, as Nix does
    assert again.fingerprint() == info.fingerprint()


@given(st.one_of(mutated(narinfos), st.binary(max_size=300), st.text(max_size=300)))
def test_narinfo_parsing_never_crashes(text: bytes | str) -> None:
    with contextlib.suppress(NarInfoError):
        NarInfo.parse(text)


def _events(nar: bytes, step: int) -> list[Any]:
    chunks = [nar[i : i + step] for i in range(0, len(nar), step)] or [b""]
    return [_plain(e) for e in read_nar_chunks(chunks)]


def _plain(event: Any) -> Any:
    # Contents events are slices of the chunks: compare their bytes.
    return bytes(event.data) if hasattr(event, "data") else event


@given(trees, st.integers(1, 64))
def test_nar_round_trip_whatever_the_chunking(tree: Any, step: int) -> None:
    nar = nar_of(tree)
    contents = b"".join(e for e in _events(nar, step) if isinstance(e, bytes))
    assert contents == b"".join(e for e in _events(nar, len(nar)) if isinstance(e, bytes))


@given(mutated(trees.map(nar_of)), st.integers(1, 64))
def test_nar_reader_never_crashes(nar: bytes, step: int) -> None:
    with contextlib.suppress(NARError):
        _events(nar, step)
