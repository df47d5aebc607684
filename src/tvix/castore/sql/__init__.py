"""SQL plumbing shared by the SQL backends of castore and store.

:mod:`tvix.castore.sql.sqlite`
    :class:`~tvix.castore.sql.sqlite.SQLiteDatabase` (one connection in a
    worker thread, versioned schemas per component) and ``IN (...)`` batching.
:mod:`tvix.castore.sql.postgres`
    :class:`~tvix.castore.sql.postgres.PostgresDatabase` (a lazily created
    pool, the URL options, versioned schemas, the one place asyncpg's errors
    become :class:`~tvix.castore.errors.StorageError`).
:mod:`tvix.castore.sql.schema`
    versioned schemas per component, the same for both engines.
:mod:`tvix.castore.sql.records`
    decoding stored castore records, damage raising
    :class:`~tvix.castore.errors.IntegrityError`.

The modules are imported on their own, so using SQLite does not import asyncpg.
"""
