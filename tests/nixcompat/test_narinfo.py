"""narinfo: parsing what Nix accepts, rendering byte-exactly what Nix writes,
fingerprints, and signatures checked both ways against the real Nix."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.support.nix import Nix
from tvix.nixcompat import (
    CAHash,
    NarInfo,
    NarInfoError,
    Signature,
    SigningKey,
    StorePath,
    VerifyingKey,
    fingerprint,
    nixbase32,
)

# Written by nix copy --to file://… (nix-oracle.md, fixture "built", two keys).
NIX_EXAMPLE = """\
StorePath: /nix/store/8qzdpgyc3rxyr57nsh36v05q46517q88-fixture-built
URL: nar/0sykdbgyryi1a895x5yxq7br6l37kaggnjcinxwn0krs93fcynl3.nar
Compression: none
FileHash: sha256:0sykdbgyryi1a895x5yxq7br6l37kaggnjcinxwn0krs93fcynl3
FileSize: 1264
NarHash: sha256:0sykdbgyryi1a895x5yxq7br6l37kaggnjcinxwn0krs93fcynl3
NarSize: 1264
References: 8hwc2v5cv91b0cr3l7pk4hw9vcl7yrkp-fixture-tree 8qzdpgyc3rxyr57nsh36v05q46517q88-fixture-built agra7l78drrpyhxrx16l9xv3lnxy2ri3-fixture-text-with-ref
Deriver: 97vihdzqjalj0s9nrigad88ccx3hgwfh-fixture-built.drv
Sig: legacy-key-1:hUj06LKTLYgIrrco1Hn7VtR/FhsHSKZ6AfvJ/8mZVVJME3QEM+gDMe1i8tRqIiFLI7b7JE6xpS2NiSSbEl0lAg==
Sig: test-key-1:fArS2dx3VTeXaHvzDfFNJ3WljUSdCPXJ0XweXdgIvF3oMYQ8t2w0bV4IYH4EMJL8/qKSeLxT+bOvjm9ySWj+DQ==
"""  # noqa: E501

HELLO = "/nix/store/n357yyrs2rsryzh3114frv6qgih1wkr5-regular.txt"
HELLO_NAR = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw"
MINIMAL = f"StorePath: {HELLO}\nURL: nar/x.nar\nNarHash: sha256:{HELLO_NAR}\nNarSize: 120\n"


def test_parse_and_render_nix_example() -> None:
    info = NarInfo.parse(NIX_EXAMPLE)
    assert info.store_path.name == "fixture-built"
    assert info.compression == "none"
    assert info.nar_size == info.file_size == 1264
    assert info.nar_hash == info.file_hash
    assert len(info.references) == 3
    assert info.deriver is not None
    assert info.deriver.base_name == "97vihdzqjalj0s9nrigad88ccx3hgwfh-fixture-built.drv"
    assert [s.name for s in info.signatures] == ["legacy-key-1", "test-key-1"]
    assert info.ca is None
    assert info.render() == str(info) == NIX_EXAMPLE
    assert NarInfo.parse(NIX_EXAMPLE.encode()) == info


def test_render_sorts_references_and_signatures() -> None:
    info = NarInfo.parse(NIX_EXAMPLE)
    shuffled = dataclasses.replace(
        info,
        references=tuple(reversed(info.references)),
        signatures=(*reversed(info.signatures), info.signatures[0]),
    )
    assert shuffled.render() == NIX_EXAMPLE


def test_fingerprint_known_answer() -> None:
    tree = "/nix/store/40iqlqp9rvsif3dfxv2jwfy9gz26vg1c-tree"
    nar = nixbase32.decode("09w8ki63fl5rg6zfrh61cwwb1clz7gr08x6yfr8c0hi5iva5nqai")
    assert fingerprint(tree, nar, 2200, []) == (
        f"1;{tree};sha256:09w8ki63fl5rg6zfrh61cwwb1clz7gr08x6yfr8c0hi5iva5nqai;2200;"
    )
    info = NarInfo.parse(NIX_EXAMPLE)
    refs = sorted(r.absolute_path for r in info.references)
    assert info.fingerprint() == (
        f"1;{info.store_path};sha256:0sykdbgyryi1a895x5yxq7br6l37kaggnjcinxwn0krs93fcynl3;"
        f"1264;{','.join(refs)}"
    )
    # Base names, absolute paths and StorePath objects are interchangeable.
    assert fingerprint(info.store_path.base_name, info.nar_hash, 1264, reversed(refs)) == (
        info.fingerprint()
    )


def test_minimal_narinfo_and_defaults() -> None:
    info = NarInfo.parse(MINIMAL)
    assert info.compression == "bzip2"  # what a missing Compression means to Nix
    assert info.file_hash is None
    assert info.file_size is None
    assert info.references == ()
    assert info.render() == (
        f"StorePath: {HELLO}\nURL: nar/x.nar\nCompression: bzip2\n"
        f"NarHash: sha256:{HELLO_NAR}\nNarSize: 120\nReferences: \n"
    )


def test_hash_spellings_nix_accepts() -> None:
    digest = nixbase32.decode(HELLO_NAR)
    for spelled in (
        f"sha256:{digest.hex()}",
        f"sha256:{base64.b64encode(digest).decode()}",
        f"sha256-{base64.b64encode(digest).decode()}",
    ):
        info = NarInfo.parse(MINIMAL.replace(f"sha256:{HELLO_NAR}", spelled))
        assert info.nar_hash == digest
        assert f"NarHash: sha256:{HELLO_NAR}\n" in info.render()


def test_tolerated_lines() -> None:
    extra = MINIMAL + "Unknown: whatever\nDeriver: unknown-deriver\nSystem: x86_64-linux\n"
    extra += "References: \nReferences: " + HELLO.removeprefix("/nix/store/") + "\n"
    info = NarInfo.parse(extra)
    assert info.deriver is None
    assert info.system == "x86_64-linux"
    assert [str(r) for r in info.references] == [HELLO]
    assert "Deriver" not in info.render()
    assert "System: x86_64-linux\n" in info.render()


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (MINIMAL.replace("\n", "\r\n"), "carriage return"),
        (MINIMAL[:-1], "does not end with a newline"),
        (MINIMAL + "\n", "line 5 is not 'Key: value'"),
        (MINIMAL.replace("URL: ", "URL:"), "line 2 is not 'Key: value'"),
        (MINIMAL.replace(f"StorePath: {HELLO}\n", ""), "lacks StorePath"),
        (MINIMAL.replace("URL: nar/x.nar\n", ""), "lacks URL"),
        (MINIMAL.replace("URL: nar/x.nar\n", "URL: \n"), "lacks URL"),
        (MINIMAL.replace(f"NarHash: sha256:{HELLO_NAR}\n", ""), "lacks NarHash"),
        (MINIMAL.replace("NarSize: 120\n", ""), "lacks NarSize"),
        (MINIMAL.replace("NarSize: 120\n", "NarSize: 0\n"), "lacks NarSize"),
        (MINIMAL.replace("NarSize: 120", "NarSize: -1"), r"line 4 \(NarSize\).*not a non-negative"),
        (MINIMAL.replace("NarSize: 120", "NarSize: 12x"), "not a non-negative integer"),
        (MINIMAL.replace("sha256:", "sha1:"), "wrong length"),
        (MINIMAL.replace("sha256:", "md6:"), "unknown hash algorithm"),
        (MINIMAL.replace("sha256:", ""), "lacks an '<algo>:'"),
        (MINIMAL.replace("/nix/store/n357", "/nix/store/e357"), r"line 1 \(StorePath\)"),
        (MINIMAL + "References: a-b\n", r"\(References\).*lacks the '-'|hash part"),
        (MINIMAL + f"References: {HELLO[11:]}\nReferences: {HELLO[11:]}\n", "given twice"),
        (MINIMAL + "Deriver: x\n", r"\(Deriver\)"),
        (MINIMAL + "Sig: nocolon\n", r"\(Sig\).*name:base64"),
        (MINIMAL + "Sig: k:AAAA\n", "3 bytes, expected 64"),
        (MINIMAL + "CA: fixed:bogus\n", r"\(CA\)"),
        (MINIMAL + f"CA: fixed:r:sha256:{HELLO_NAR}\n" * 2, "CA given twice"),
        (b"StorePath: \xff\n", "not UTF-8"),
    ],
)
def test_rejects(text: str | bytes, phrase: str) -> None:
    with pytest.raises(NarInfoError, match=phrase):
        NarInfo.parse(text)


def test_model_validation() -> None:
    path = StorePath.from_absolute_path(HELLO)
    with pytest.raises(NarInfoError, match="32-byte sha256"):
        NarInfo(path, "nar/x.nar", bytes(20), 1)
    with pytest.raises(NarInfoError, match="URL must not be empty"):
        NarInfo(path, "", bytes(32), 1)
    with pytest.raises(NarInfoError, match="line breaks"):
        NarInfo(path, "a\nb", bytes(32), 1)
    with pytest.raises(NarInfoError, match="NarSize must be positive"):
        NarInfo(path, "nar/x", bytes(32), 0)


def test_sign_and_verify() -> None:
    key = SigningKey.generate("test-1")
    info = NarInfo.parse(MINIMAL)
    assert not info.verify([key.to_public()])
    signed = info.sign(key)
    assert signed.sign(key) is signed
    assert signed.verify([key.to_public()])
    assert signed.verify({"test-1": key.to_public()})
    assert not signed.verify([SigningKey.generate("test-1").to_public()])
    assert not dataclasses.replace(signed, nar_size=121).verify([key.to_public()])
    assert NarInfo.parse(signed.render()) == signed


# -- against the real Nix --


class Fixture(NamedTuple):
    nix: Nix
    paths: dict[str, str]  # kind -> store path
    plain_cache: Path
    signed_cache: Path
    secret: str
    public: str


@pytest.fixture(scope="module")
def fixture(nix: Nix, tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    work = tmp_path_factory.mktemp("narinfo")
    f = work / "regular.txt"
    f.write_bytes(b"hello\n")
    tree = work / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "file").write_bytes(b"content")
    paths = {"flat": nix.add_fixed(f), "recursive": nix.add(f), "tree": nix.add(tree)}
    paths["text"] = nix.add_text("text-with-refs", "refs:", [paths["tree"], paths["recursive"]])
    paths["built"] = nix.build("built", [paths["tree"], paths["text"]], self_reference=True)
    secret, public = nix.generate_key("nix-key-1")
    (work / "sk").write_text(secret)
    plain, signed = work / "plain-cache", work / "signed-cache"
    for path in paths.values():
        nix.copy_to_file_cache(path, plain)
        nix.copy_to_file_cache(path, signed, secret_key_file=work / "sk")
    return Fixture(nix, paths, plain, signed, secret, public)


KINDS = ["flat", "recursive", "tree", "text", "built"]


@pytest.mark.nix
@pytest.mark.parametrize("kind", KINDS)
def test_render_equals_nix_output(fixture: Fixture, kind: str) -> None:
    path = fixture.paths[kind]
    for cache in (fixture.plain_cache, fixture.signed_cache):
        raw = fixture.nix.narinfo_from_file_cache(cache, path)
        info = NarInfo.parse(raw)
        assert info.render().encode() == raw
        assert str(info.store_path) == path
    # Build it from scratch, from what nix path-info says.
    meta = fixture.nix.path_info_json(path)
    nar_hash = base64.b64decode(meta["narHash"].removeprefix("sha256-"))
    built = NarInfo(
        store_path=StorePath.from_absolute_path(path),
        url=f"nar/{nixbase32.encode(nar_hash)}.nar",
        compression="none",
        file_hash=nar_hash,
        file_size=meta["narSize"],
        nar_hash=nar_hash,
        nar_size=meta["narSize"],
        references=tuple(StorePath.from_absolute_path(r) for r in meta["references"]),
        deriver=StorePath.from_absolute_path(meta["deriver"]) if "deriver" in meta else None,
        ca=CAHash.parse(meta["ca"]) if "ca" in meta else None,
    )
    assert built.render().encode() == fixture.nix.narinfo_from_file_cache(fixture.plain_cache, path)
    # Signing it ourselves with Nix's key gives Nix's signature (ed25519 is deterministic).
    ours = built.sign(SigningKey.parse(fixture.secret))
    assert ours.render().encode() == fixture.nix.narinfo_from_file_cache(fixture.signed_cache, path)
    nar = (fixture.plain_cache / built.url).read_bytes()
    assert hashlib.sha256(nar).digest() == built.nar_hash


@pytest.mark.nix
def test_nix_signatures_verify_with_our_keys(fixture: Fixture) -> None:
    key = VerifyingKey.parse(fixture.public)
    for kind in KINDS:
        raw = fixture.nix.narinfo_from_file_cache(fixture.signed_cache, fixture.paths[kind])
        info = NarInfo.parse(raw)
        assert [s.name for s in info.signatures] == ["nix-key-1"]
        assert info.verify([key])
        assert key.verify(info.fingerprint(), info.signatures[0])
        assert not dataclasses.replace(info, nar_size=info.nar_size + 1).verify([key])


@pytest.mark.nix
def test_nix_verifies_our_signatures(fixture: Fixture, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(fixture.plain_cache, cache)
    key = SigningKey.generate("our-key-1")
    path = fixture.paths["built"]  # input-addressed: Nix insists on a signature
    info_file = cache / f"{path[11:43]}.narinfo"
    info = NarInfo.parse(info_file.read_bytes())
    nix = fixture.nix
    assert nix.verify_in_cache(cache, path, str(key.to_public())).returncode == 2  # untrusted
    info_file.write_text(info.sign(key).render())
    ok = nix.verify_in_cache(cache, path, str(key.to_public()))
    assert ok.returncode == 0, ok.stderr
    other = SigningKey.generate("our-key-1").to_public()
    assert nix.verify_in_cache(cache, path, str(other)).returncode == 2
    # A broken signature under the right name is untrusted too.
    bad = Signature("our-key-1", bytes(64))
    info_file.write_text(dataclasses.replace(info, signatures=(bad,)).render())
    assert nix.verify_in_cache(cache, path, str(key.to_public())).returncode == 2


@pytest.mark.nix
def test_nix_reads_our_rendering(fixture: Fixture, tmp_path: Path) -> None:
    """Nix parses what we render, including hash spellings we only read."""
    cache = tmp_path / "cache"
    shutil.copytree(fixture.plain_cache, cache)
    path = fixture.paths["text"]
    info_file = cache / f"{path[11:43]}.narinfo"
    info = NarInfo.parse(info_file.read_bytes())
    # Unknown FileHash/FileSize: we leave the lines out; Nix accepts that.
    info_file.write_text(dataclasses.replace(info, file_hash=None, file_size=None).render())
    meta = fixture.nix.path_info_json(path, store=f"file://{cache}")
    assert meta["narHash"] == "sha256-" + base64.b64encode(info.nar_hash).decode()
    assert meta["references"] == sorted(r.absolute_path for r in info.references)
    assert meta["ca"] == str(info.ca)
