"""The embedded default backend: one SQLite file (WAL) holds events, spans and scores, and
control state, each behind its port (:class:`SQLiteBackend`, :class:`SQLiteSpanStore`,
:class:`SQLiteLedger`), with one ordered migration list (:data:`MIGRATIONS`).

Only :mod:`closedloop.store` uses this package; everything else reaches a backend through
the store's ports and its URL registry, never through a file path.
"""

from closedloop.store.sqlite._approvals import SQLiteApprovals
from closedloop.store.sqlite._autonomy import SQLiteLevelStore
from closedloop.store.sqlite._backend import (
    MIGRATIONS,
    SCHEMA_VERSION,
    SQLiteBackend,
    SQLiteReader,
    connect_read_only,
    disk_full,
)
from closedloop.store.sqlite._ledger import SQLiteLedger
from closedloop.store.sqlite._spans import SQLiteSpanStore

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "SQLiteApprovals",
    "SQLiteBackend",
    "SQLiteLedger",
    "SQLiteLevelStore",
    "SQLiteReader",
    "SQLiteSpanStore",
    "connect_read_only",
    "disk_full",
]
