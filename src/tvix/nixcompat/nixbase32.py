"""Nix's base-32 encoding ("nixbase32").

The alphabet is ``0123456789abcdfghijklmnpqrsvwxyz`` (no ``e``, ``o``, ``u``,
``t``). A digest of *n* bytes encodes to ``ceil(n * 8 / 5)`` characters;
character *i* (from the left) holds the 5 bits starting at bit
``(len - 1 - i) * 5`` of the digest read as a little-endian bit string. In
other words: read the digest as a little-endian integer and write it in base
32, most significant digit first, zero-padded to the encoded length.

This runs once per store path, so instead of a Python loop per character the
5-bit groups are spread to one byte each (or gathered back) with a handful of
precomputed mask-and-shift steps on one big integer, and mapped to characters
with a single ``bytes.translate``.
"""

from __future__ import annotations

from tvix.nixcompat.errors import Nixbase32Error

__all__ = ["ALPHABET", "decode", "encode", "encoded_len", "is_valid"]

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"

_TO_CHAR = bytes.maketrans(bytes(range(32)), ALPHABET.encode())
_INVALID = 0xFF
# Every byte outside the alphabet maps to 0xFF, so a bad character can never
# alias a valid one (e.g. "A" or "e").
_FROM_CHAR = bytes(ALPHABET.index(chr(c)) if chr(c) in ALPHABET else _INVALID for c in range(256))

# Spreading steps for a given number of characters: (slots, steps) where
# slots is the group count rounded up to a power of two and each step is
# (low mask, high mask, shift, high mask << shift). Applying the steps moves group i from bit 5*i
# to bit 8*i: at each level the upper half of every block moves up by
# 3 * (half size) bits, so group i ends at 5*i + 3*i.
_Steps = tuple[int, tuple[tuple[int, int, int, int], ...]]
_STEPS: dict[int, _Steps] = {}


def _steps_for(n_chars: int) -> _Steps:
    cached = _STEPS.get(n_chars)
    if cached is not None:
        return cached
    slots = 1
    while slots < n_chars:
        slots *= 2
    steps: list[tuple[int, int, int, int]] = []
    half = slots // 2
    while half >= 1:
        low = high = 0
        for i in range(slots):
            in_block = i % (2 * half)
            mask = 31 << (5 * i + 3 * (i - in_block))
            if in_block >= half:
                high |= mask
            else:
                low |= mask
        steps.append((low, high, 3 * half, high << (3 * half)))
        half //= 2
    result = (slots, tuple(steps))
    _STEPS[n_chars] = result
    return result


def encoded_len(n: int) -> int:
    """Return the length of the nixbase32 encoding of *n* bytes: ``ceil(n * 8 / 5)``."""
    return (n * 8 + 4) // 5


def encode(data: bytes) -> str:
    """Encode *data* as nixbase32.

    Returns a string of ``encoded_len(len(data))`` characters (the empty
    string for empty input).
    """
    n_chars = (len(data) * 8 + 4) // 5
    if n_chars == 0:
        return ""
    slots, steps = _steps_for(n_chars)
    value = int.from_bytes(data, "little")
    for low, high, shift, _ in steps:
        value = (value & low) | ((value & high) << shift)
    groups = value.to_bytes(slots, "little")[n_chars - 1 :: -1]
    return groups.translate(_TO_CHAR).decode("ascii")


def decode(s: str | bytes) -> bytes:
    """Decode the nixbase32 string *s*.

    Returns the decoded bytes (``len(s) * 5 // 8`` of them).

    Raises:
        Nixbase32Error: *s* has a character outside the alphabet, a length
            that no byte string encodes to, or non-zero bits beyond the
            decoded length (Nix rejects those too, so each digest has exactly
            one spelling).
    """
    raw = s.encode("latin-1", "replace") if isinstance(s, str) else bytes(s)
    n_chars = len(raw)
    n_bytes = n_chars * 5 // 8
    if encoded_len(n_bytes) != n_chars:
        raise Nixbase32Error(f"invalid nixbase32 length {n_chars}: {s!r}")
    if n_chars == 0:
        return b""
    groups = raw.translate(_FROM_CHAR)
    if _INVALID in groups:
        # The latin-1 encoding above maps characters one to one.
        index = groups.index(_INVALID)
        bad = s[index] if isinstance(s, str) else chr(raw[index])
        raise Nixbase32Error(f"invalid nixbase32 character {bad!r} in {s!r}")
    _, steps = _steps_for(n_chars)
    value = int.from_bytes(groups, "big")
    for low, _, shift, high_moved in reversed(steps):
        value = (value & low) | ((value & high_moved) >> shift)
    if value >> (n_bytes * 8):
        raise Nixbase32Error(f"invalid nixbase32 {s!r}: non-zero bits beyond {n_bytes} bytes")
    return value.to_bytes(n_bytes, "little")


def is_valid(s: str | bytes, n_bytes: int | None = None) -> bool:
    """Return whether *s* is nixbase32 (of exactly *n_bytes* bytes, if given)."""
    try:
        decoded = decode(s)
    except Nixbase32Error:
        return False
    return n_bytes is None or len(decoded) == n_bytes
