"""Where a store's garbage collection keeps its lock and its pins.

:class:`GCState` is the interface (:mod:`tvix.store.gcstate.base`);
:class:`~tvix.store.gcstate.sqlite.SQLiteGCState` keeps them in a
directory (``flock`` on ``gc.lock``, pins in ``gc.sqlite``: the embedded
store's data directory); :class:`~tvix.store.gcstate.postgres.PostgresGCState`
in a PostgreSQL database (an advisory lock, a pins table), which a
PostgreSQL PathInfo service offers as its
:attr:`~tvix.store.pathinfoservice.base.PathInfoService.gc_state`, so every
machine sharing the store shares them.
"""

from tvix.store.gcstate.base import GCState
from tvix.store.gcstate.sqlite import SQLiteGCState

__all__ = ["GCState", "SQLiteGCState"]
