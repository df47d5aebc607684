"""nixbase32: known answers, a bit-by-bit reference, the real nix-hash, and rejections."""

from __future__ import annotations

import hashlib
import random

import pytest

from tests.support.nix import Nix
from tvix.nixcompat import Nixbase32Error, nixbase32

EMPTY_SHA256_NIX32 = "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


def reference_encode(data: bytes) -> str:
    """The definition, one 5-bit group at a time (as Nix's printHash32 does)."""
    out = []
    for n in range(nixbase32.encoded_len(len(data)) - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(nixbase32.ALPHABET[c & 0x1F])
    return "".join(out)


def test_known_answer_sha256_of_empty() -> None:
    digest = hashlib.sha256(b"").digest()
    assert nixbase32.encode(digest) == EMPTY_SHA256_NIX32
    assert nixbase32.decode(EMPTY_SHA256_NIX32) == digest
    assert nixbase32.decode(EMPTY_SHA256_NIX32.encode()) == digest


@pytest.mark.parametrize(("n", "chars"), [(0, 0), (1, 2), (16, 26), (20, 32), (32, 52), (64, 103)])
def test_encoded_len(n: int, chars: int) -> None:
    assert nixbase32.encoded_len(n) == chars
    assert len(nixbase32.encode(bytes(n))) == chars


def test_matches_reference_and_round_trips() -> None:
    rng = random.Random(1)
    for n in range(70):
        for _ in range(10):
            data = rng.randbytes(n)
            encoded = nixbase32.encode(data)
            assert encoded == reference_encode(data)
            assert nixbase32.decode(encoded) == data
    assert nixbase32.encode(b"\xff" * 20) == "z" * 32


@pytest.mark.nix
def test_agrees_with_nix_hash(nix: Nix) -> None:
    rng = random.Random(2)
    for algo, size in (("md5", 16), ("sha1", 20), ("sha256", 32), ("sha512", 64)):
        digests = [rng.randbytes(size) for _ in range(8)]
        ours = [nixbase32.encode(d) for d in digests]
        assert nix.to_base32(algo, *(d.hex() for d in digests)) == ours
        assert nix.to_base16(algo, *ours) == [d.hex() for d in digests]


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("e" * 32, "invalid nixbase32 character 'e'"),
        ("0" * 31 + "o", "character 'o'"),
        ("0" * 31 + "u", "character 'u'"),
        ("0" * 31 + "t", "character 't'"),
        ("0" * 31 + "A", "character 'A'"),
        ("0" * 31 + "é", "character 'é'"),
        ("0" * 31 + "-", "character '-'"),
        (b"0" * 31 + b"\xff", "character"),
        ("1", "invalid nixbase32 length 1"),
        ("0" * 33, "length 33"),
        ("0" * 51, "length 51"),
        ("z" * 52, "non-zero bits"),
        ("z" * 2, "non-zero bits"),
    ],
)
def test_rejects(text: str | bytes, phrase: str) -> None:
    with pytest.raises(Nixbase32Error, match=phrase):
        nixbase32.decode(text)
    assert not nixbase32.is_valid(text)


def test_is_valid_with_length() -> None:
    assert nixbase32.is_valid("0" * 32, 20)
    assert not nixbase32.is_valid("0" * 32, 32)
    assert nixbase32.is_valid(EMPTY_SHA256_NIX32)
