"""The scale-out backend: a PostgreSQL schema (psycopg 3, a connection pool, binary COPY)
holds events and spans in day partitions, scores, and control state, each behind its port
(:class:`PostgresBackend`, its ``span_store()`` and ``control_ledger()``), with one ordered,
advisory-locked migration list (:data:`MIGRATIONS`).

psycopg is imported when a ``postgresql://`` store is opened, not when this package is:
without the ``postgres`` extra, importing it costs nothing and opening a store says what to
install.
"""

from closedloop.store.postgres._autonomy import PostgresLevelStore
from closedloop.store.postgres._backend import (
    DEFAULT_SCHEMA,
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresBackend,
    PostgresLedger,
    open_backend,
    parse_url,
    partition_name,
)

__all__ = [
    "DEFAULT_SCHEMA",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "PostgresBackend",
    "PostgresLedger",
    "PostgresLevelStore",
    "open_backend",
    "parse_url",
    "partition_name",
]
