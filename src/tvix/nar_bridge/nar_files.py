"""The NAR file URLs uploads were accepted under, kept across restarts.

``nix copy --to http://…`` uploads ``nar/<file hash>.nar.xz`` and a narinfo
whose ``URL`` names it, and Nix keeps that narinfo in its own cache
(``~/.cache/nix/binary-cache-v6.sqlite``): a later ``nix copy --from`` of
the same path asks for that URL, not for the narinfo nar-bridge renders.
So when a narinfo is registered, the file it names is recorded here with
the store path and NAR hash; the file itself is not kept, only its
contents (in castore), and it is served by compressing the store path's NAR
again with the narinfo's ``Compression`` (different bytes, hence a
different file hash, which Nix does not check; it checks the NAR hash after
decompressing).

A record names a store path, not content: once that path is deleted (or
its NAR hash changes) the URL answers 404. Kept in one SQLite file,
:data:`FILE_NAME`, which the command line puts in the data directory or a
state directory (see :mod:`tvix.cli.nar_bridge`).
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass

from tvix.castore.sql.sqlite import SQLiteDatabase
from tvix.nar_bridge.urls import NarFileName
from tvix.nixcompat.storepath import StorePath

__all__ = ["FILE_NAME", "NarFileRecord", "NarFiles"]

#: The database's file name, in whatever directory keeps it.
FILE_NAME = "nar-bridge-uploads.sqlite"

_MIGRATIONS = [
    """
    CREATE TABLE nar_files (
        file_hash BLOB NOT NULL,
        extension TEXT NOT NULL,
        compression TEXT NOT NULL,
        store_path TEXT NOT NULL,
        nar_sha256 BLOB NOT NULL,
        PRIMARY KEY (file_hash, store_path)
    ) WITHOUT ROWID;
    """
]


@dataclass(frozen=True, slots=True)
class NarFileRecord:
    """An uploaded NAR file: its name, the compression it was in, and the path it holds."""

    file: NarFileName
    compression: str
    store_path: StorePath
    nar_sha256: bytes


class NarFiles:
    """The uploaded NAR files, by file hash, in the SQLite file at ``path``.

    The file (and its directory) is made by the first :meth:`add`; until
    then lookups find nothing, so a bridge that never accepts an upload
    writes nothing. One file name may hold several store paths (the same
    NAR uploaded for two paths): each is recorded.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = SQLiteDatabase(path, "nar_bridge.nar_files", _MIGRATIONS)
        self._opened = False

    async def add(self, record: NarFileRecord) -> None:
        """Record ``record`` (replacing what was recorded for its file and store path)."""
        if not self._opened:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._opened = True
        row = (
            record.file.file_hash,
            record.file.extension,
            record.compression,
            record.store_path.absolute_path,
            record.nar_sha256,
        )

        def add(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO nar_files VALUES (?, ?, ?, ?, ?)", row)

        await self._db.run(lambda c: SQLiteDatabase.transaction(c, add))

    async def get(self, file_hash: bytes) -> list[NarFileRecord]:
        """Every record of the file with sha256 ``file_hash`` (none if it was not uploaded)."""
        if not self._opened:
            if not os.path.exists(self.path):
                return []
            self._opened = True
        rows = await self._db.run(
            lambda c: c.execute(
                "SELECT extension, compression, store_path, nar_sha256 FROM nar_files "
                "WHERE file_hash = ? ORDER BY store_path",
                (file_hash,),
            ).fetchall()
        )
        return [
            NarFileRecord(
                NarFileName(file_hash, extension),
                compression,
                StorePath.from_absolute_path(store_path),
                nar_sha256,
            )
            for extension, compression, store_path, nar_sha256 in rows
        ]

    async def close(self) -> None:
        """Release the database."""
        await self._db.close()
