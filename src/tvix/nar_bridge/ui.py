r"""The store browser: read-only HTML pages about what the store holds, at ``/`` and ``/ui/``.

=================================== ==========================================================
``GET /``                            the store at a glance: counts, NAR bytes against distinct
                                     blob bytes, the biggest paths and closures, a treemap,
                                     a search box
``GET /ui/search?q=``                store paths whose name or hash contains ``q``
``GET /ui/paths?page=``              every store path, by name
``GET /ui/path/<hash>[/<sub>]``      a store path: its narinfo fields, references and
                                     referrers, closure (with a treemap), its tree (a page of
                                     a directory, or a file: text inline, else a download)
``GET /ui/raw/<hash>/<sub>``         a file's bytes, as a download
``GET /ui/style.css``                the one stylesheet
=================================== ==========================================================

Safe by construction: pages are Jinja2 templates with autoescaping on, so
every name (which may hold anything but ``/`` and NUL: HTML, non-UTF-8
bytes, shown with ``\x`` escapes) is escaped; names travel in URLs
percent-encoded as raw bytes and are decoded from the raw request path.
No page has a script; the Content-Security-Policy allows none and nothing
from elsewhere. A directory is shown :data:`PAGE_SIZE` entries at a time; a
file view reads at most :data:`TEXT_LIMIT` bytes of the blob; downloads are
streamed. Store-wide counts (and how many store paths hold each blob and
Directory) come from the background :class:`~tvix.nar_bridge.overview.StoreOverview`.
"""

from __future__ import annotations

import bisect
import datetime
import hashlib
import itertools
import urllib.parse
from dataclasses import dataclass
from typing import Any

import jinja2
from aiohttp import web

from tvix.castore.digest import B3Digest
from tvix.castore.directory import Directory
from tvix.castore.nodes import DirectoryNode, FileNode, Node, SymlinkNode
from tvix.nar_bridge.errors import BadRequest, NotFound
from tvix.nar_bridge.overview import Snapshot, StoreOverview
from tvix.nar_bridge.server import NarBridge
from tvix.nar_bridge.treemap import Tile, squarify
from tvix.nar_bridge.urls import CASTORE_NAR_PREFIX, encode_castore_nar, parse_hash_part
from tvix.nixcompat import nixbase32
from tvix.store.nar.seekable import LayoutCache, NarLayout
from tvix.store.pathinfo import PathInfo
from tvix.store.stats import closure_sizes

__all__ = ["PAGE_SIZE", "TEXT_LIMIT", "StoreBrowser"]

#: Directory entries (and store paths) per page.
PAGE_SIZE = 1000
#: Bytes of a file read to show it inline.
TEXT_LIMIT = 64 * 1024
_PATHS_PAGE = 200
_SEARCH_LIMIT = 500
_TOP = 15
_TREEMAP_ITEMS = 300
# Seconds a page waits for the store's first count before it says it is counting.
_FIRST_COUNT_WAIT = 5.0

_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def human(n: float) -> str:
    """``n`` bytes for people: ``1.5 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def shown(name: bytes) -> str:
    r"""A name for display: UTF-8 where it is, ``\xNN`` for the bytes that are not."""
    return name.decode("utf-8", "backslashreplace")


def _quote(name: bytes) -> str:
    return urllib.parse.quote(name, safe="")


def _hash_part(info: PathInfo) -> str:
    return info.store_path.absolute_path.removeprefix("/nix/store/")[:32]


def _colour(key: str) -> str:
    hue = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=2).digest(), "big") % 360
    return f"hsl({hue}, 45%, 72%)"


@dataclass(frozen=True)
class Entry:
    """A directory entry as a page shows it."""

    name: str
    href: str
    kind: str  # directory, file, executable, symlink
    size: int | None  # file bytes, or a directory's NAR bytes (None: unknown)
    target: str | None
    holders: int  # store paths holding the same blob / Directory (0: unknown)


@dataclass(frozen=True)
class Box:
    """A treemap tile, ready to draw."""

    x: float
    y: float
    w: float
    h: float
    label: str
    title: str
    href: str
    colour: str


def _boxes(tiles: list[Tile[PathInfo]]) -> list[Box]:
    return [
        Box(
            t.x,
            t.y,
            t.w,
            t.h,
            t.item.store_path.name if t.w > 60 and t.h > 14 else "",
            f"{t.item.store_path.absolute_path} ({human(t.size)})",
            f"/ui/path/{_hash_part(t.item)}",
            _colour(t.item.store_path.name),
        )
        for t in tiles
    ]


def _child(directory: Directory, name: bytes) -> Node | None:
    for nodes in (directory.directories, directory.files, directory.symlinks):
        i = bisect.bisect_left(nodes, name, key=lambda n: n.name)
        if i < len(nodes) and nodes[i].name == name:
            return nodes[i]
    return None


class StoreBrowser:
    """The browser's routes over a :class:`NarBridge`'s services and a store overview."""

    def __init__(self, bridge: NarBridge, overview: StoreOverview) -> None:
        self.bridge = bridge
        self.overview = overview
        # Subtree NAR sizes of browsed paths; apart from the NAR server's (fewer held).
        self.layouts = LayoutCache(bridge.directories, max_directories=50_000)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("tvix.nar_bridge", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["bytes"] = human
        self.env.filters["shown"] = shown
        self.env.filters["when"] = _when

    def register(self, app: web.Application) -> None:
        """Add the browser's routes to ``app``."""
        r = app.router
        r.add_get("/", self.index)
        r.add_get("/ui/style.css", self.css)
        r.add_get("/favicon.ico", self.no_icon)
        r.add_get("/ui/search", self.search)
        r.add_get("/ui/paths", self.all_paths)
        r.add_get("/ui/path/{hash}", self.path_page)
        r.add_get("/ui/path/{hash}/{rest:.*}", self.path_page)
        r.add_get("/ui/raw/{hash}/{rest:.*}", self.raw)

    def _page(self, template: str, **context: Any) -> web.Response:
        html = self.env.get_template(template).render(**context)
        return web.Response(
            text=html, content_type="text/html", charset="utf-8", headers=_SECURITY_HEADERS
        )

    async def _snapshot(self) -> Snapshot | None:
        # A huge store's first count takes a while: pages say so rather than hang.
        return await self.overview.get(wait=_FIRST_COUNT_WAIT) if self.overview.supported else None

    # -- store-wide pages --

    async def index(self, request: web.Request) -> web.Response:
        """The store at a glance."""
        snap = await self._snapshot()
        context: dict[str, Any] = {
            "snap": snap,
            "title": "the store",
            "counting": snap is None and self.overview.supported,
        }
        if snap is not None:
            biggest = snap.biggest(_TOP)
            closures = [
                (snap.paths[p], size) for p, size in snap.biggest_closures(_TOP) if p in snap.paths
            ]
            tiles = squarify([(i, i.nar_size) for i in snap.biggest(_TREEMAP_ITEMS)], 960, 360)
            context.update(
                biggest=biggest,
                closures=closures,
                boxes=_boxes(tiles),
                shown_bytes=sum(i.nar_size for i in snap.biggest(_TREEMAP_ITEMS)),
                link=_hash_part,
            )
        return self._page("index.html", **context)

    async def css(self, request: web.Request) -> web.Response:
        """The stylesheet (package data)."""
        assert self.env.loader is not None
        source, _, _ = self.env.loader.get_source(self.env, "style.css")
        return web.Response(
            text=source,
            content_type="text/css",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    async def no_icon(self, request: web.Request) -> web.Response:
        """No icon (browsers ask; a 204 keeps their consoles and the logs quiet)."""
        return web.Response(status=204, headers={"Cache-Control": "public, max-age=86400"})

    async def search(self, request: web.Request) -> web.Response:
        """Store paths whose name contains the query."""
        query = request.query.get("q", "").strip()
        snap = await self._snapshot()
        found = snap.search(query, _SEARCH_LIMIT + 1) if snap is not None and query else []
        return self._page(
            "search.html",
            title=f"search: {query}",
            query=query,
            found=found[:_SEARCH_LIMIT],
            more=len(found) > _SEARCH_LIMIT,
            snap=snap,
            link=_hash_part,
        )

    async def all_paths(self, request: web.Request) -> web.Response:
        """Every store path, a page at a time, by name."""
        snap = await self._snapshot()
        page = _page_number(request)
        infos = sorted(snap.paths.values(), key=lambda i: i.store_path.name) if snap else []
        pages = max(1, -(-len(infos) // _PATHS_PAGE))
        if page > pages:
            raise NotFound(f"page {page}: there are {pages}")
        shown_infos = infos[(page - 1) * _PATHS_PAGE : page * _PATHS_PAGE]
        return self._page(
            "paths.html",
            title="store paths",
            infos=shown_infos,
            page=page,
            pages=pages,
            total=len(infos),
            snap=snap,
            link=_hash_part,
        )

    # -- one store path --

    async def _path_info(self, hash_part: str) -> PathInfo:
        info = await self.bridge.path_infos.get(parse_hash_part(hash_part))
        if info is None:
            raise NotFound(f"no store path with hash {hash_part}")
        return info

    def _sub_path(self, request: web.Request, prefix: str) -> list[bytes]:
        """The names after ``/<prefix>/<hash>/``, from the raw (still percent-encoded) path."""
        raw = request.rel_url.raw_path
        head = f"/ui/{prefix}/{request.match_info['hash']}"
        rest = raw[len(head) :].strip("/")
        if not rest:
            return []
        return [urllib.parse.unquote_to_bytes(part) for part in rest.split("/")]

    async def _resolve(self, info: PathInfo, names: list[bytes]) -> Node:
        node: Node = info.node
        for i, name in enumerate(names):
            if not isinstance(node, DirectoryNode):
                raise NotFound(f"{shown(b'/'.join(names[:i]))} is not a directory")
            directory = await self.bridge.directories.get(node.digest)
            if directory is None:
                raise NotFound(f"Directory {node.digest.hex()} is not stored")
            child = _child(directory, name)
            if child is None:
                raise NotFound(f"no {shown(name)} in {shown(b'/'.join(names[:i])) or '/'}")
            node = child
        return node

    async def path_page(self, request: web.Request) -> web.Response:
        """A store path: its metadata, and the directory or file at the sub-path asked for."""
        hash_part = request.match_info["hash"]
        info = await self._path_info(hash_part)
        names = self._sub_path(request, "path")
        node = await self._resolve(info, names)
        snap = self.overview.latest
        layout = await self.layouts.get(info.node)
        context: dict[str, Any] = {
            "title": info.store_path.name,
            "info": info,
            "hash_part": hash_part,
            "snap": snap,
            "crumbs": self._crumbs(hash_part, names),
            "sub": shown(b"/".join(names)),
            "node": node,
            "kind": _kind(node),
            "holders": _holders(snap, node),
            "link": _hash_part,
        }
        if not names:
            context.update(await self._about(info, snap, layout))
        if isinstance(node, DirectoryNode):
            directory = await self.bridge.directories.get(node.digest)
            if directory is None:
                raise NotFound(f"Directory {node.digest.hex()} is not stored")
            page = _page_number(request)
            pages = max(1, -(-len(directory) // PAGE_SIZE))
            if page > pages:
                raise NotFound(f"page {page}: this directory has {pages}")
            base = f"/ui/path/{hash_part}/" + "".join(_quote(n) + "/" for n in names)
            entries = [
                _entry(child, base, layout, snap)
                for child in itertools.islice(
                    directory.nodes(), (page - 1) * PAGE_SIZE, page * PAGE_SIZE
                )
            ]
            context.update(
                entries=entries,
                page=page,
                pages=pages,
                total=len(directory),
                nar_bytes=layout.node_size(node) if layout is not None else None,
                pager_base=base.rstrip("/"),
            )
        elif isinstance(node, FileNode):
            context.update(await self._file_view(node))
            context["raw"] = f"/ui/raw/{hash_part}/" + "/".join(_quote(n) for n in names)
        return self._page("path.html", **context)

    def _crumbs(self, hash_part: str, names: list[bytes]) -> list[tuple[str, str]]:
        crumbs = []
        href = f"/ui/path/{hash_part}"
        for name in names:
            href += "/" + _quote(name)
            crumbs.append((shown(name), href))
        return crumbs

    async def _about(
        self, info: PathInfo, snap: Snapshot | None, layout: NarLayout | None
    ) -> dict[str, Any]:
        """What the top of a store path's page says: narinfo fields, closure, sharing."""
        path = info.store_path.absolute_path
        closure: list[PathInfo] = []
        referrers: list[PathInfo] = []
        closure_bytes: int | None = None
        complete = False
        if snap is not None and path in snap.paths:
            # One walk of this path's closure, in memory.
            closure, complete = _closure(snap, info)
            referrers = snap.referrers(path)
        if complete:
            closure_bytes = sum(i.nar_size for i in closure)
        else:  # newer than the last count, or referring to paths counted since
            try:
                closure_bytes = (await closure_sizes(self.bridge.path_infos, [info]))[path]
            except LookupError:
                closure_bytes = None
        tiles = squarify([(i, i.nar_size) for i in closure[:_TREEMAP_ITEMS]], 960, 240)
        nar_url = f"/{CASTORE_NAR_PREFIX}{encode_castore_nar(info.node)}?narsize={info.nar_size}"
        return {
            "nar_hash": "sha256:" + nixbase32.encode(info.nar_sha256),
            "closure_bytes": closure_bytes,
            "closure": closure,
            "referrers": referrers,
            "boxes": _boxes(tiles),
            "nar_url": nar_url,
            "sharing": _sharing(info, snap, layout),
            "signatures": [str(s) for s in info.signatures],
            "ca": str(info.ca) if info.ca is not None else None,
        }

    async def _file_view(self, node: FileNode) -> dict[str, Any]:
        """The first :data:`TEXT_LIMIT` bytes of a file, as text if they are text."""
        view: dict[str, Any] = {"text": None, "truncated": False, "missing": False}
        reader = await self.bridge.blobs.open_read(node.digest)
        if reader is None:
            view["missing"] = True
            return view
        head = b""
        async with reader:
            while len(head) < min(TEXT_LIMIT, node.size):
                chunk = await reader.read(min(TEXT_LIMIT, node.size) - len(head))
                if not chunk:
                    break
                head += chunk
        view["truncated"] = node.size > len(head)
        if b"\0" in head:
            return view
        try:
            view["text"] = head.decode()
        except UnicodeDecodeError as e:
            # A character cut at the limit is still text; anything else is binary.
            if not view["truncated"] or e.start < len(head) - 3:
                return view
            view["text"] = head[: e.start].decode()
        return view

    async def raw(self, request: web.Request) -> web.StreamResponse:
        """A file's bytes as a download, streamed."""
        info = await self._path_info(request.match_info["hash"])
        names = self._sub_path(request, "raw")
        node = await self._resolve(info, names)
        if not isinstance(node, FileNode):
            raise BadRequest(f"{shown(b'/'.join(names)) or info.store_path} is not a file")
        reader = await self.bridge.blobs.open_read(node.digest)
        if reader is None:
            raise NotFound(f"blob {node.digest.hex()} is not stored")
        # RFC 6266's filename* is UTF-8: a non-UTF-8 name goes as its \x-escaped display form.
        filename = _quote(shown(names[-1]).encode() if names else info.store_path.name.encode())
        response = web.StreamResponse(
            headers={
                **_SECURITY_HEADERS,
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f"attachment; filename*=UTF-8''{filename}",
            }
        )
        response.content_length = node.size
        await response.prepare(request)
        async with reader:
            while chunk := await reader.read(1 << 20):
                await response.write(chunk)
        await response.write_eof()
        return response


def _page_number(request: web.Request) -> int:
    text = request.query.get("page", "1")
    if not text.isdigit() or int(text) < 1:
        raise BadRequest(f"page={text!r}: expected a number from 1")
    return int(text)


def _kind(node: Node) -> str:
    if isinstance(node, DirectoryNode):
        return "directory"
    if isinstance(node, SymlinkNode):
        return "symlink"
    return "executable" if node.executable else "file"


def _holders(snap: Snapshot | None, node: Node) -> int:
    if snap is None or not snap.sharing_complete:
        return 0
    if isinstance(node, FileNode):
        return snap.blob_holders.get(node.digest, 0)
    if isinstance(node, DirectoryNode):
        return snap.directory_holders.get(node.digest, 0)
    return 0


def _entry(node: Node, base: str, layout: NarLayout | None, snap: Snapshot | None) -> Entry:
    size: int | None = None
    if isinstance(node, FileNode):
        size = node.size
    elif isinstance(node, DirectoryNode) and layout is not None:
        try:
            size = layout.node_size(node)
        except KeyError:
            size = None
    return Entry(
        shown(node.name),
        base + _quote(node.name),
        _kind(node),
        size,
        shown(node.target) if isinstance(node, SymlinkNode) else None,
        _holders(snap, node),
    )


def _closure(snap: Snapshot, info: PathInfo) -> tuple[list[PathInfo], bool]:
    """``info`` and every store path it refers to, directly or not, biggest first.

    And whether the snapshot knew every one of them.
    """
    seen = {info.store_path.absolute_path: info}
    stack = [info]
    complete = True
    while stack:
        for ref in stack.pop().references:
            if ref.absolute_path in seen:
                continue
            other = snap.paths.get(ref.absolute_path)
            if other is None:
                complete = False
                continue
            seen[ref.absolute_path] = other
            stack.append(other)
    return sorted(seen.values(), key=lambda i: -i.nar_size), complete


def _sharing(info: PathInfo, snap: Snapshot | None, layout: NarLayout | None) -> dict[str, int]:
    """This path's distinct file bytes, and how many of them other store paths hold too."""
    if snap is None or not snap.sharing_complete:
        return {}
    blobs: dict[B3Digest, int] = {}
    if isinstance(info.node, FileNode):
        blobs[info.node.digest] = info.node.size
    elif layout is not None:
        for directory in layout.closure.values():
            for f in directory.files:
                blobs[f.digest] = f.size
    shared = {d: s for d, s in blobs.items() if snap.blob_holders.get(d, 0) > 1}
    return {
        "blobs": len(blobs),
        "blob_bytes": sum(blobs.values()),
        "shared_blobs": len(shared),
        "shared_bytes": sum(shared.values()),
    }
