"""The SQLite PathInfo service: persistence, listing (its conformance runs are in
test_pathinfoservice_conformance.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvix.store.pathinfoservice.sqlite import SQLitePathInfoService
from tvix.store.testing.fixtures import path_info


async def test_persists_across_instances(tmp_path: Path) -> None:
    db = str(tmp_path / "p.sqlite")
    first = SQLitePathInfoService(db)
    info = path_info(1, "directory", refs=(2,))
    await first.put(info)
    await first.close()
    second = SQLitePathInfoService(db)
    assert await second.get(info.store_path.digest) == info
    await second.close()


async def test_list_pages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tvix.store.pathinfoservice.sqlite.LIST_PAGE", 7)
    svc = SQLitePathInfoService(str(tmp_path / "p.sqlite"))
    infos = [path_info(n) for n in range(30)]
    for info in infos:
        await svc.put(info)
    listed = [i async for i in svc.list()]
    assert sorted(i.store_path.digest for i in listed) == sorted(i.store_path.digest for i in infos)
    await svc.close()


async def test_damaged_row_is_an_integrity_error(tmp_path: Path) -> None:
    import sqlite3

    from tvix.castore.errors import IntegrityError

    db = tmp_path / "p.sqlite"
    svc = SQLitePathInfoService(str(db))
    info = path_info(1)
    await svc.put(info)
    await svc.close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE pathinfos SET data = x'0aff'")
    conn.commit()
    conn.close()
    svc = SQLitePathInfoService(str(db))
    with pytest.raises(IntegrityError, match="is damaged"):
        await svc.get(info.store_path.digest)
    await svc.close()
