"""Store paths and content addresses: parsing, validation, and the path
formulas, against known answers and the real Nix."""

from __future__ import annotations

import base64
import hashlib
import pickle
from pathlib import Path

import pytest

from tests.support.nix import Nix
from tvix.nixcompat import (
    STORE_DIR,
    CAHash,
    CAKind,
    HashAlgo,
    InvalidCAHashError,
    InvalidStorePathError,
    StorePath,
    build_ca_path,
    compress_hash,
    dump_path,
    make_store_path,
    nixbase32,
    validate_name,
)

HELLO_RECURSIVE = "/nix/store/n357yyrs2rsryzh3114frv6qgih1wkr5-regular.txt"
HELLO_FLAT = "/nix/store/ms76lv6rp91bx3wb1jnmyng0sdr6vb70-regular.txt"
HELLO_NAR_SHA256 = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
HELLO_SHA256 = "00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"


def nar_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    for piece in dump_path(path):
        h.update(piece)
    return h.digest()


# -- parsing and the model --


def test_parse_and_properties() -> None:
    p = StorePath.from_absolute_path(HELLO_RECURSIVE)
    assert p.name == "regular.txt"
    assert p.hash_part == "n357yyrs2rsryzh3114frv6qgih1wkr5"
    assert p.digest == nixbase32.decode("n357yyrs2rsryzh3114frv6qgih1wkr5")
    assert p.base_name == "n357yyrs2rsryzh3114frv6qgih1wkr5-regular.txt"
    assert p.absolute_path == str(p) == HELLO_RECURSIVE
    assert StorePath.from_base_name(p.base_name) == p
    assert StorePath.from_base_name(p.base_name.encode()) == p
    assert StorePath(p.digest, p.name) == p
    assert hash(StorePath(p.digest, p.name)) == hash(p)
    assert pickle.loads(pickle.dumps(p)) == p
    assert repr(p) == f"StorePath({HELLO_RECURSIVE!r})"


def test_immutable() -> None:
    p = StorePath.from_absolute_path(HELLO_RECURSIVE)
    with pytest.raises(AttributeError):
        p._name = "other"
    with pytest.raises(AttributeError):
        p.name = "other"  # type: ignore[misc]


def test_orders_by_base_name_not_digest() -> None:
    a = StorePath.from_base_name("0" * 31 + "1-x")  # digest starts with 0x01
    b = StorePath.from_base_name("1" + "0" * 31 + "-x")  # digest ends with 0x08
    assert a.digest > b.digest
    assert sorted([b, a]) == [a, b]
    assert a < b
    assert a != b


def test_from_absolute_path_full() -> None:
    p, sub = StorePath.from_absolute_path_full(HELLO_RECURSIVE + "/bin/hello")
    assert (str(p), sub) == (HELLO_RECURSIVE, "bin/hello")
    p, sub_b = StorePath.from_absolute_path_full(HELLO_RECURSIVE.encode() + b"/a/\xff")
    assert (str(p), sub_b) == (HELLO_RECURSIVE, b"a/\xff")
    assert StorePath.from_absolute_path_full(HELLO_RECURSIVE)[1] == ""
    assert StorePath.from_absolute_path_full(HELLO_RECURSIVE + "/")[1] == ""
    with pytest.raises(InvalidStorePathError, match="below a store path"):
        StorePath.from_absolute_path(HELLO_RECURSIVE + "/bin")


@pytest.mark.parametrize(
    ("base_name", "phrase"),
    [
        ("n357yyrs2rsryzh3114frv6qgih1wkr5", "lacks the '-'"),
        ("", "lacks the '-'"),
        ("n357yyrs2rsryzh3114frv6qgih1wkr-x", "is 31 characters, expected 32"),
        ("n357yyrs2rsryzh3114frv6qgih1wkr55-x", "is 33 characters, expected 32"),
        ("e357yyrs2rsryzh3114frv6qgih1wkr5-x", "invalid nixbase32 character 'e'"),
        ("N357yyrs2rsryzh3114frv6qgih1wkr5-x", "invalid nixbase32 character 'N'"),
        ("n357yyrs2rsryzh3114frv6qgih1wkr5-", "name is empty"),
        ("n357yyrs2rsryzh3114frv6qgih1wkr5-a b", "invalid character ' ' at position 1"),
        ("n357yyrs2rsryzh3114frv6qgih1wkr5-a/b", "invalid character '/'"),
        ("n357yyrs2rsryzh3114frv6qgih1wkr5-é", "invalid character 'é'"),
        ("n357yyrs2rsryzh3114frv6qgih1wkr5-" + "a" * 212, "212 characters, longer than 211"),
    ],
)
def test_invalid_base_names(base_name: str, phrase: str) -> None:
    with pytest.raises(InvalidStorePathError, match=phrase):
        StorePath.from_base_name(base_name)


def test_invalid_inputs() -> None:
    with pytest.raises(InvalidStorePathError, match="not ASCII"):
        StorePath.from_base_name(b"\xff" * 40)
    with pytest.raises(InvalidStorePathError, match="not in the store"):
        StorePath.from_absolute_path("/nix/stor/n357yyrs2rsryzh3114frv6qgih1wkr5-x")
    with pytest.raises(InvalidStorePathError, match="not in the store"):
        StorePath.from_absolute_path_full(b"n357yyrs2rsryzh3114frv6qgih1wkr5-x")
    with pytest.raises(InvalidStorePathError, match="20 bytes"):
        StorePath(bytes(19), "x")
    with pytest.raises(InvalidStorePathError, match="name is empty"):
        StorePath(bytes(20), "")


def test_name_rules() -> None:
    allowed = "AZaz09+-._?="
    assert validate_name(allowed) == allowed
    assert validate_name("a" * 211) == "a" * 211
    # Nix 2.8 accepts leading dots, even "." and ".." (see the module docstring).
    for name in (".", "..", ".foo", ".-x"):
        assert StorePath(bytes(20), name).name == name
    for bad in ("a!", "a b", "ä", "a\n", "a:b", "a@b", "~"):
        with pytest.raises(InvalidStorePathError, match="invalid character"):
            validate_name(bad)


@pytest.mark.nix
def test_name_rules_agree_with_nix(nix: Nix, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x")
    for name in ("ok-name_1.2+3?=", ".", "..", ".hidden", "a" * 211, "a" * 212, "a b", "a@b"):
        try:
            validate_name(name)
            ours = True
        except InvalidStorePathError:
            ours = False
        proc = nix.add_path_dry_run(name, f)
        assert (proc.returncode == 0) == ours, (name, proc.stderr)


# -- content addresses --


@pytest.mark.parametrize(
    ("text", "kind", "algo"),
    [
        (f"fixed:r:sha256:{HELLO_NAR_SHA256}", CAKind.NAR, HashAlgo.SHA256),
        (f"fixed:sha256:{HELLO_SHA256}", CAKind.FLAT, HashAlgo.SHA256),
        ("fixed:sha1:x0a28ji9dlyf2h789a4f3pzwlgf5ly5a", CAKind.FLAT, HashAlgo.SHA1),
        ("fixed:r:sha1:xfzx0ai1pc4p3bdqckwwqjbjqxwd3py2", CAKind.NAR, HashAlgo.SHA1),
        (
            "text:sha256:03r63vckz727w08311ddq9j4mk6rcjmsibw5jx81sihxkf37y23d",
            CAKind.TEXT,
            HashAlgo.SHA256,
        ),
        ("fixed:md5:" + nixbase32.encode(bytes(range(16))), CAKind.FLAT, HashAlgo.MD5),
        ("fixed:r:sha512:" + nixbase32.encode(bytes(range(64))), CAKind.NAR, HashAlgo.SHA512),
    ],
)
def test_ca_hash_round_trip(text: str, kind: CAKind, algo: HashAlgo) -> None:
    ca = CAHash.parse(text)
    assert (ca.kind, ca.algo) == (kind, algo)
    assert str(ca) == text


def test_ca_hash_other_digest_spellings() -> None:
    digest = nixbase32.decode(HELLO_SHA256)
    for spelled in (digest.hex(), base64.b64encode(digest).decode()):
        assert CAHash.parse(f"fixed:sha256:{spelled}").digest == digest


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("sha256:" + HELLO_SHA256, "does not start with"),
        ("fixed:sha256", "lacks '<algo>:<hash>'"),
        ("fixed:sha3:" + HELLO_SHA256, "unknown hash algorithm 'sha3'"),
        ("fixed:sha256:" + HELLO_SHA256[:-1], "wrong length"),
        ("fixed:sha1:" + HELLO_SHA256, "wrong length"),
        ("text:sha1:x0a28ji9dlyf2h789a4f3pzwlgf5ly5a", "text content addresses use sha256"),
        ("fixed:r:sha256:" + "e" * 52, "invalid nixbase32 character"),
    ],
)
def test_ca_hash_rejects(text: str, phrase: str) -> None:
    with pytest.raises(InvalidCAHashError, match=phrase):
        CAHash.parse(text)


def test_ca_hash_rejects_wrong_digest_length() -> None:
    with pytest.raises(InvalidCAHashError, match="32 bytes"):
        CAHash(CAKind.NAR, HashAlgo.SHA256, bytes(20))


# -- path formulas --


def test_compress_hash() -> None:
    digest = bytes(range(32))
    expected = bytearray(range(20))
    for i in range(20, 32):
        expected[i - 20] ^= i
    assert compress_hash(digest) == bytes(expected)
    assert compress_hash(bytes(20)) == bytes(20)


def test_make_store_path_is_the_documented_formula() -> None:
    inner = hashlib.sha256(b"x").digest()
    fp = f"source:sha256:{inner.hex()}:/nix/store:foo".encode()
    expected = compress_hash(hashlib.sha256(fp).digest())
    assert make_store_path("source", inner, "foo") == StorePath(expected, "foo")
    assert STORE_DIR == "/nix/store"


def test_known_answers_from_nix() -> None:
    nar = CAHash(CAKind.NAR, HashAlgo.SHA256, nixbase32.decode(HELLO_NAR_SHA256))
    assert str(build_ca_path("regular.txt", nar)) == HELLO_RECURSIVE
    flat = CAHash(CAKind.FLAT, HashAlgo.SHA256, hashlib.sha256(b"hello\n").digest())
    assert str(build_ca_path("regular.txt", flat)) == HELLO_FLAT
    # Values printed by nix-store --add-fixed [--recursive] sha1 and builtins.toFile.
    sha1_flat = CAHash.parse("fixed:sha1:x0a28ji9dlyf2h789a4f3pzwlgf5ly5a")
    assert str(build_ca_path("t.txt", sha1_flat)).endswith(
        "/1d1h2r0n6cscgjh5v38wwshkini7837z-t.txt"
    )
    sha1_nar = CAHash.parse("fixed:r:sha1:xfzx0ai1pc4p3bdqckwwqjbjqxwd3py2")
    assert str(build_ca_path("t.txt", sha1_nar)).endswith("/f8y6dljq23lsww0qb8a1cr6xd0p9gv12-t.txt")
    text = CAHash.parse("text:sha256:03r63vckz727w08311ddq9j4mk6rcjmsibw5jx81sihxkf37y23d")
    refs = [
        "/nix/store/n357yyrs2rsryzh3114frv6qgih1wkr5-regular.txt",  # order must not matter
        "d66js2dxbrjn8irvbb3j4cwlkglwnyw3-y",
    ]
    path = build_ca_path("z", text, refs)
    assert str(path) == "/nix/store/x72mmb5v1d724a60zmvdjidp9gkbi6fw-z"
    assert (
        build_ca_path("z", text, [StorePath.from_base_name(r.split("/")[-1]) for r in refs]) == path
    )


def test_source_with_references_and_self() -> None:
    nar = CAHash(CAKind.NAR, HashAlgo.SHA256, hashlib.sha256(b"nar").digest())
    refs = ["/nix/store/x72mmb5v1d724a60zmvdjidp9gkbi6fw-z", HELLO_RECURSIVE]
    inner = nar.digest.hex()
    expected_fp = f"source:{HELLO_RECURSIVE}:{refs[0]}:self:sha256:{inner}:/nix/store:src"
    expected = StorePath(compress_hash(hashlib.sha256(expected_fp.encode()).digest()), "src")
    assert build_ca_path("src", nar, refs, self_reference=True) == expected
    assert build_ca_path("src", nar, refs) != expected


def test_references_rejected_where_nix_allows_none() -> None:
    flat = CAHash(CAKind.FLAT, HashAlgo.SHA256, bytes(32))
    with pytest.raises(InvalidCAHashError, match="cannot have references"):
        build_ca_path("x", flat, [HELLO_RECURSIVE])
    with pytest.raises(InvalidCAHashError, match="cannot have references"):
        build_ca_path("x", CAHash(CAKind.NAR, HashAlgo.SHA1, bytes(20)), (), self_reference=True)
    with pytest.raises(InvalidCAHashError, match="cannot refer to itself"):
        build_ca_path("x", CAHash(CAKind.TEXT, HashAlgo.SHA256, bytes(32)), (), True)
    with pytest.raises(InvalidStorePathError):
        build_ca_path("x", CAHash(CAKind.TEXT, HashAlgo.SHA256, bytes(32)), ["/tmp/x"])


@pytest.mark.nix
def test_paths_agree_with_nix_store_add(nix: Nix, tree: Path) -> None:
    targets = [
        tree,
        tree / "regular.txt",
        tree / "exec.sh",
        tree / "link",
        tree / "emptydir",
        tree / "big.bin",
    ]
    for target in targets:
        digest = nar_sha256(target)
        ca = CAHash(CAKind.NAR, HashAlgo.SHA256, digest)
        ours = str(build_ca_path(target.name, ca))
        assert ours == nix.add(target), target
        info = nix.path_info_json(ours)
        assert info["ca"] == str(ca)


@pytest.mark.nix
@pytest.mark.parametrize("algo", [HashAlgo.SHA256, HashAlgo.SHA1, HashAlgo.MD5, HashAlgo.SHA512])
def test_fixed_paths_agree_with_nix(nix: Nix, tmp_path: Path, algo: HashAlgo) -> None:
    f = tmp_path / f"file-{algo}.bin"
    f.write_bytes(b"fixed output " + algo.encode())
    flat = CAHash(CAKind.FLAT, algo, hashlib.new(algo.value, f.read_bytes()).digest())
    ours = str(build_ca_path(f.name, flat))
    assert ours == nix.add_fixed(f, algo=algo.value)
    assert nix.path_info_json(ours)["ca"] == str(flat)
    nar = CAHash(CAKind.NAR, algo, _nar_hash(f, algo))
    ours = str(build_ca_path(f.name, nar))
    assert ours == nix.add_fixed(f, recursive=True, algo=algo.value)
    assert nix.path_info_json(ours)["ca"] == str(nar)


def _nar_hash(path: Path, algo: HashAlgo) -> bytes:
    h = hashlib.new(algo.value)
    for piece in dump_path(path):
        h.update(piece)
    return h.digest()


@pytest.mark.nix
def test_text_paths_agree_with_nix(nix: Nix, tmp_path: Path) -> None:
    f = tmp_path / "dep"
    f.write_bytes(b"dep")
    dep = nix.add(f)
    plain = nix.add_text("plain", "no references")
    with_ref = nix.add_text("with-ref", "see", [dep])
    with_refs = nix.add_text("with-refs", "see", [dep, with_ref])
    for path in (plain, with_ref, with_refs):
        info = nix.path_info_json(path)
        content = nix.store_file(path).read_bytes()
        text = CAHash(CAKind.TEXT, HashAlgo.SHA256, hashlib.sha256(content).digest())
        assert info["ca"] == str(text)
        name = path.split("-", 1)[1]
        assert str(build_ca_path(name, text, info["references"])) == path
