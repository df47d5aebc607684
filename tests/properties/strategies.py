"""Generators of valid inputs, and of mutations of them (what a hostile peer sends)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tvix.nixcompat import nixbase32
from tvix.nixcompat.nar.writer import NarWriter

names = st.binary(min_size=1, max_size=12).filter(
    lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b"..")
)

# A tree: ("file", executable, contents) | ("symlink", target) | ("dir", {name: tree}).
trees: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.tuples(st.just("file"), st.booleans(), st.binary(max_size=64)),
        st.tuples(
            st.just("symlink"), st.binary(min_size=1, max_size=20).filter(lambda t: b"\0" not in t)
        ),
    ),
    lambda children: st.tuples(st.just("dir"), st.dictionaries(names, children, max_size=4)),
    max_leaves=12,
)


def nar_of(tree: Any) -> bytes:
    """The NAR of a generated tree, written by the project's NAR writer."""
    writer = NarWriter()
    out: list[bytes] = []

    def node(t: Any) -> None:
        if t[0] == "file":
            out.append(writer.regular_inline(t[1], t[2]))
        elif t[0] == "symlink":
            out.append(writer.symlink(t[1]))
        else:
            out.append(writer.begin_directory())
            for name in sorted(t[1]):
                out.append(writer.entry(name))
                node(t[1][name])
                out.append(writer.end_entry())
            out.append(writer.end_directory())

    node(tree)
    writer.finish()
    return b"".join(out)


@st.composite
def mutations(draw: st.DrawFn, valid: bytes) -> bytes:
    """``valid`` with a few bytes flipped, removed, inserted or the end cut off."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "duplicate"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= draw(st.integers(1, 255))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 16))]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "truncate":
            del data[i:]
        else:
            data[i:i] = data[i : i + draw(st.integers(1, 32))]
    return bytes(data)


def mutated(valid: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Mutations of values drawn from ``valid``."""
    return valid.flatmap(mutations)


nix_hashes = st.binary(min_size=20, max_size=20).map(nixbase32.encode)
store_names = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-._?=",
    min_size=1,
    max_size=40,
).filter(lambda n: not n.startswith("."))
