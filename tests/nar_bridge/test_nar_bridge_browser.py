"""The store browser in a real headless Chromium: pages, links, search, numbers, safety.

The store holds a closure Nix built and uploaded (references, a deriver,
a signature, CA and input-addressed paths), a tree and its near twin (so
blobs and Directories are shared), names with HTML and non-UTF-8 bytes, and
a directory too big for one page. Screenshots are kept as test artifacts.
"""

from __future__ import annotations

import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.nar_bridge.nar_bridge_support import Closure, StartBridge
from tests.support.browser import artifacts_dir
from tests.support.nix import Nix
from tests.support.services import Run
from tests.support.trees import make_tree
from tvix.nar_bridge.ui import PAGE_SIZE

pytestmark = [pytest.mark.e2e, pytest.mark.nix]

BIG_DIR = 2 * PAGE_SIZE + 500


def _info(tvix_store: Run) -> dict[str, str]:
    out = tvix_store("info").stdout.decode()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def _number(text: str) -> int:
    return int(text.split()[0].replace(",", ""))


@pytest.fixture
def browsed(
    tvix_store: Run, start_bridge: StartBridge, nix: Nix, closure: Closure, tmp_path: Path
) -> dict[str, Any]:
    tree = make_tree(tmp_path / "tree", big_size=200_000)
    (tree / "<i onclick=x>it&amp;").write_bytes(b"<script>document.title='owned'</script>\n")
    twin = tmp_path / "twin"
    shutil.copytree(tree, twin, symlinks=True)
    (twin / "only-in-twin").write_bytes(b"twin\n")
    big = tmp_path / "bigdir"
    big.mkdir()
    for i in range(BIG_DIR):
        (big / f"f{i:05}").write_bytes(b"")
    paths = {p.name: tvix_store("import", p).stdout.decode().strip() for p in (tree, twin, big)}

    # The closure with a signature, uploaded through nar-bridge as Nix uploads.
    secret, _public = nix.generate_key("browser-test-1")
    key = tmp_path / "sk"
    key.write_text(secret)
    signed = f"local?root={tmp_path / 'signed'}"
    nix.run("nix", "copy", "--no-check-sigs", "--to", signed, closure.built)
    nix.run("nix", "store", "sign", "--store", signed, "--key-file", key, "-r", closure.built)
    uploader = start_bridge("--allow-upload")
    nix.run("nix", "copy", "--no-check-sigs", "--from", signed, "--to", uploader.url, closure.built)
    uploader.stop()
    return {"paths": paths, "bridge": start_bridge(), "closure": closure, "tree": tree}


def _hash(path: str) -> str:
    return path.removeprefix("/nix/store/")[:32]


def test_browse_the_store(browser: Any, browsed: dict[str, Any], tvix_store: Run) -> None:
    bridge, paths, closure = browsed["bridge"], browsed["paths"], browsed["closure"]
    shots = artifacts_dir()
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))

    # The front page's numbers are tvix-store info's.
    page.goto(bridge.url + "/")
    page.screenshot(path=shots / "index.png", full_page=True)
    info = _info(tvix_store)
    assert page.text_content("#store-paths") == info["store paths"]
    assert _number(page.text_content("#nar-bytes")) == _number(info["NAR bytes"])
    assert _number(page.text_content("#blobs")) == _number(info["distinct blobs"])
    assert _number(page.text_content("#directories")) == _number(info["directories"])
    assert page.text_content("#dedup") == info["deduplication"].split()[0]
    assert _number(page.text_content("#store-paths")) == 6
    assert page.locator("svg.treemap rect").count() == 6
    assert "bigdir" in page.text_content("#biggest")

    # Search, then follow links: the built path, its reference, into its tree.
    page.fill("input[name=q]", "nb-built")
    page.click("header button")
    page.wait_for_url(re.compile(r"/ui/search\?q=nb-built"))
    assert page.locator("#results li").count() == 1
    page.click("#results a")
    page.wait_for_url(re.compile("/ui/path/" + _hash(closure.built)))
    page.screenshot(path=shots / "path-built.png", full_page=True)
    narinfo = page.text_content("#narinfo")
    assert "browser-test-1:" in narinfo
    assert ".drv" in narinfo  # the deriver
    assert page.locator("#references a").count() == 3
    assert "(itself)" in page.text_content("#references")
    closure_text = page.text_content("#closure-size")
    assert "3 store paths" in closure_text
    page.click(f"#references a[href='/ui/path/{_hash(closure.text)}']")
    page.wait_for_url(re.compile("/ui/path/" + _hash(closure.text)))
    assert "text:sha256:" in page.text_content("#narinfo")
    assert "nb-built" in page.text_content("#referrers")
    assert "refers to the tree" in page.text_content("#file-text")

    # The imported tree: sizes, exec bits, symlinks, sharing, escaping, files.
    tree = paths["tree"]
    page.goto(f"{bridge.url}/ui/path/{_hash(tree)}")
    page.screenshot(path=shots / "path-tree.png", full_page=True)
    rows = {
        page.locator("#entries tr").nth(i).locator("td").first.inner_text(): page.locator(
            "#entries tr"
        )
        .nth(i)
        .inner_text()
        for i in range(1, page.locator("#entries tr").count())
    }
    assert "executable" in rows["exec.sh"]
    assert "regular.txt" in rows["link → regular.txt"]
    # The twin (and the closure's tree, made alike) hold the same blob and Directory.
    assert re.search(r"\t3 paths$", rows["regular.txt"])
    assert re.search(r"\t3 paths$", rows["nested/"])
    assert "\\xff\\xfe-latin1-\\xe9/" in rows
    assert "<i onclick=x>it&amp;" in rows  # shown as text, not markup
    assert page.title() != "owned"
    assert "held by other store paths too" in page.text_content("#sharing")

    page.click("#entries a:text('nested/')")
    page.click("#entries a:text('a')")
    assert page.text_content("#file-text") == "lower"
    page.goto(f"{bridge.url}/ui/path/{_hash(tree)}")
    page.click("#entries a:text-is('big.bin')")
    assert page.locator("#binary").count() == 1
    href = page.get_attribute("#file-download", "href")
    with urllib.request.urlopen(bridge.url + href) as r:
        assert r.headers["Content-Disposition"].startswith("attachment")
        assert r.read() == (browsed["tree"] / "big.bin").read_bytes()
    page.goto(f"{bridge.url}/ui/path/{_hash(tree)}")
    page.click("#entries a:text-is('\\\\xff\\\\xfe-latin1-\\\\xe9/')")
    page.click("#entries a:text-is('f\\\\xe9')")
    assert page.text_content("#file-text") == "non-utf8 names"
    page.goto(f"{bridge.url}/ui/path/{_hash(tree)}")
    page.click("#entries a:text-is('<i onclick=x>it&amp;')")
    assert "<script>" in page.text_content("#file-text")
    assert page.title() != "owned"

    # The NAR download is the NAR.
    page.goto(f"{bridge.url}/ui/path/{_hash(tree)}")
    nar_href = page.get_attribute("#nar-download", "href")
    with urllib.request.urlopen(bridge.url + nar_href) as r:
        assert len(r.read()) == _number(page.text_content("#nar-size"))

    # A big directory comes a page at a time.
    page.goto(f"{bridge.url}/ui/path/{_hash(paths['bigdir'])}")
    assert page.locator("#entries tbody tr, #entries > tr").count() >= PAGE_SIZE
    assert page.locator("#entries a.name").count() == PAGE_SIZE
    page.click("a[rel=next]")
    page.click("a[rel=next]")
    assert page.locator("#entries a.name").count() == BIG_DIR - 2 * PAGE_SIZE
    assert page.locator("#entries a.name").first.inner_text() == f"f{2 * PAGE_SIZE:05}"
    assert page.locator("a[rel=next]").count() == 0

    assert problems == []
    page.close()


def test_no_ui(start_bridge: StartBridge, tvix_store: Run, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir(exist_ok=True)
    bridge = start_bridge("--no-ui")
    for path in ("/", "/ui/paths"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(bridge.url + path)
        assert e.value.code == 404
    with urllib.request.urlopen(bridge.url + "/nix-cache-info") as r:
        assert r.status == 200
