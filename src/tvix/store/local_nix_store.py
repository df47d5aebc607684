"""A local Nix store as a source: its database says what each path is, the disk has it.

``nix-store``'s own database (``<root>/nix/var/nix/db/db.sqlite``) lists
every valid path with its NAR hash and size, references, deriver,
signatures and content address. :func:`read_closure` turns the closure of
some store paths into the entries :func:`~tvix.store.reference_graph.import_reference_graph`
ingests from ``<root>/nix/store`` (checking each NAR against the hash the
database gives). The database is opened read-only; Nix may keep running.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from tvix.nixcompat.cahash import CAHash
from tvix.nixcompat.errors import NixCompatError
from tvix.nixcompat.hashes import HashAlgo, parse_hash
from tvix.nixcompat.signing import Signature
from tvix.nixcompat.storepath import StorePath
from tvix.store.errors import NotFoundError, StoreError
from tvix.store.reference_graph import GraphEntry

__all__ = ["database_of", "read_closure", "store_root_of"]


def store_root_of(spec: str) -> Path | None:
    """The root directory a ``--from`` names as a local Nix store, or ``None`` if it names none.

    ``local`` and ``/nix/store`` are the system's store (root ``/``);
    ``local?root=DIR`` a chroot store, as Nix writes it.
    """
    if spec in ("local", "/nix/store", "/nix/store/"):
        return Path("/")
    if spec.startswith("local?"):
        for part in spec.removeprefix("local?").split("&"):
            key, _, value = part.partition("=")
            if key == "root" and value:
                return Path(value)
        raise StoreError(f"{spec}: expected local?root=DIR")
    return None


def database_of(root: Path) -> Path:
    """Where Nix keeps the database of the store under ``root``."""
    return root / "nix" / "var" / "nix" / "db" / "db.sqlite"


def read_closure(root: Path, store_paths: Iterable[StorePath]) -> list[GraphEntry]:
    """The closure of ``store_paths`` as the local store's database describes it.

    Raises :class:`NotFoundError` naming a path the store does not have, and
    :class:`StoreError` when the database cannot be read.
    """
    db = database_of(root)
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open the Nix database {db}: {e}") from None
    try:
        wanted = [sp.absolute_path for sp in store_paths]
        found: dict[str, GraphEntry] = {}
        queue = list(wanted)
        while queue:
            path = queue.pop()
            if path in found:
                continue
            row = conn.execute(
                "SELECT id, hash, narSize, deriver, sigs, ca FROM ValidPaths WHERE path = ?",
                (path,),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"{path} is not in the Nix store at {root}")
            refs = [
                r[0]
                for r in conn.execute(
                    "SELECT v.path FROM Refs r JOIN ValidPaths v ON v.id = r.reference "
                    "WHERE r.referrer = ?",
                    (row[0],),
                )
            ]
            found[path] = _entry(path, row, refs)
            queue.extend(r for r in refs if r not in found)
        return list(found.values())
    except sqlite3.Error as e:
        raise StoreError(f"cannot read the Nix database {db}: {e}") from None
    except NixCompatError as e:
        raise StoreError(f"the Nix database {db} holds something unexpected: {e}") from None
    finally:
        conn.close()


def _entry(path: str, row: tuple[object, ...], refs: list[str]) -> GraphEntry:
    _id, hash_text, nar_size, deriver, sigs, ca = row
    algo, digest = parse_hash(str(hash_text))
    if algo is not HashAlgo.SHA256:
        raise StoreError(f"{path}: the Nix database gives a {algo} NAR hash, not sha256")
    return GraphEntry(
        path=StorePath.from_absolute_path(path),
        nar_sha256=digest,
        nar_size=int(str(nar_size)),
        references=tuple(StorePath.from_absolute_path(r) for r in refs),
        ca=CAHash.parse(str(ca)) if ca else None,
        deriver=StorePath.from_absolute_path(str(deriver)) if deriver else None,
        signatures=tuple(Signature.parse(s) for s in str(sigs).split()) if sigs else (),
    )
