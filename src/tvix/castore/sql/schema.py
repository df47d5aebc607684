"""Versioned schemas, as both SQL engines keep them.

Each component (``castore.directories``, ``store.pathinfos``, ...) has a
row in the ``tvix_schema`` table with the number of its migrations applied;
the i-th migration (SQL statements separated by ``;``) brings it from
version i to i+1.
"""

from __future__ import annotations

from collections.abc import Sequence

from tvix.castore.errors import StorageError

__all__ = ["CREATE_SCHEMA_TABLE", "migration_statements"]

CREATE_SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS tvix_schema (component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
)


def migration_statements(
    migrations: Sequence[str], have: int, component: str, where: str
) -> list[str]:
    """The statements bringing ``component`` from version ``have`` to ``len(migrations)``.

    Raises :class:`StorageError` when ``have`` is newer than this code knows
    (``where`` names the database in the message).
    """
    want = len(migrations)
    if have > want:
        raise StorageError(
            f"{where} has schema version {have} for {component}, "
            f"newer than the {want} this version of tvix knows; use a newer tvix"
        )
    # Statement by statement: sqlite's executescript would commit the transaction.
    return [s for script in migrations[have:] for s in script.split(";") if s.strip()]
