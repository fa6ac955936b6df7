"""The PostgreSQL backend: events in a server shared by many processes and machines.

``postgresql://USER[:PASSWORD]@HOST[:PORT]/DB?schema=NAME`` (``postgres://`` too; any other
query parameter is a libpq one, e.g. ``sslmode``). Every table lives in the schema ``NAME``
(default ``closedloop``), so several stores can share one database.

- **Migrations**: :data:`MIGRATIONS` is one ordered list; opening a store applies the missing
  ones in a single transaction holding a transaction-level advisory lock keyed on the schema,
  so processes that start together wait for one another instead of racing. The version is a
  row per applied migration in ``NAME.schema_version``.
- **Partitions**: ``events`` is range-partitioned by ``ts`` (Unix seconds), one partition per
  UTC day, named ``events_YYYYMMDD``, created on demand before a batch that needs it (under
  the same kind of lock), so retention can drop whole days. Events with a timestamp that is
  not a finite number land in ``events_default``. Each process remembers the partitions it
  has made: retention (a later step) must only drop days no writer still writes, or their
  late events would land in ``events_default``.
- **Ingest**: a batch is one ``COPY`` in one transaction (all or nothing). PostgreSQL text
  cannot hold NUL characters or lone surrogates; a batch refused for that is written again
  with those characters replaced by U+FFFD instead of being refused as a whole.
- **Connections**: a :class:`psycopg_pool.ConnectionPool` per process (a forked child opens
  its own and never touches the parent's connections). A store opened read-only (``closedloop
  report``, ``traces``: one-shot commands) uses plain connections instead
  (:class:`_Connections`): no pool thread, no ``psycopg_pool`` import, and the connection
  that checked the schema version serves the queries.
- **Control state**: pauses and halts live in ``control_stops`` / ``control_history`` of the
  same schema (migration 2), read and written by :class:`PostgresLedger`, the backend's
  :meth:`~PostgresBackend.control_ledger` (the control-state port of
  :class:`~closedloop.store.ControlStateBackend`); it fails closed.

psycopg is imported only when a ``postgresql://`` URL is opened; without the ``postgres``
extra that is one :class:`~closedloop.ConfigError` line. Passwords never appear in ``url``,
errors or logs.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import math
import os
import re
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from closedloop._control_state import Stop, _iso, _merge, history_entry, redacted
from closedloop._control_state import stop_from_row as _ledger_stop
from closedloop._errors import ConfigError, ControlUnavailable, StoreError
from closedloop._events import EVENT_FIELDS, StepEvent, dumps
from closedloop._figures import message_group
from closedloop._redact import redact_text
from closedloop.store._base import EventQuery
from closedloop.store._learn import (
    Dimension,
    ExampleKey,
    FactorCell,
    FactorMargins,
    FailureCell,
    SeriesCell,
)
from closedloop.store._query import EventSummary, StepFilter, StepPage
from closedloop.store._registry import redact_url
from closedloop.store._retention import (
    CONTROL_PRUNE,
    RECORD_TABLES,
    EventsPruned,
    StoreInfo,
    record_clauses,
)
from closedloop.store.postgres._evidence import MIGRATION as EVIDENCE_MIGRATION
from closedloop.store.postgres._evidence import pruned as evidence_pruned
from closedloop.store.postgres._rollup import MIGRATION as ROLLUP_MIGRATION
from closedloop.store.postgres._rollup import pruned as rollup_pruned

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql
    from psycopg_pool import ConnectionPool

    from closedloop.store.postgres._approvals import PostgresApprovals
    from closedloop.store.postgres._autonomy import PostgresLevelStore
    from closedloop.store.postgres._runs import PostgresRunStore
    from closedloop.store.postgres._spans import PostgresSpanStore

DEFAULT_SCHEMA = "closedloop"
DAY_S = 86_400
_DAY_F = float(DAY_S)

LATENCY_BUCKET = (
    "(CASE WHEN latency_ms > 0 AND latency_ms < 1e300 THEN floor(ln(latency_ms) * 8)::int"
    " + 10000 WHEN latency_ms > 0 THEN 20000 ELSE 0 END)")
"""A latency's bucket, non-decreasing in the latency (PostgreSQL orders NaN above every
number): eight per factor e (0 for zero and below). Indexed by ``events_latency``; never
change it."""

# Each entry upgrades the schema from version N to N+1; never edit a released entry.
# ``{schema}`` is replaced by the quoted schema name.
MIGRATIONS: tuple[str, ...] = (
    # 1: the step events table (same columns as SQLite's), partitioned by day on ts
    """
    CREATE TABLE {schema}.events (
        ts DOUBLE PRECISION NOT NULL,
        trace_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        task_type TEXT NOT NULL,
        autonomy TEXT NOT NULL,
        outcome TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        validation_passed BOOLEAN,
        verification_passed BOOLEAN,
        error_type TEXT,
        error_message TEXT,
        propose_ms DOUBLE PRECISION NOT NULL,
        validate_ms DOUBLE PRECISION NOT NULL,
        act_ms DOUBLE PRECISION NOT NULL,
        verify_ms DOUBLE PRECISION NOT NULL,
        detail JSONB
    ) PARTITION BY RANGE (ts);
    CREATE TABLE {schema}.events_default PARTITION OF {schema}.events DEFAULT;
    CREATE INDEX events_ts ON {schema}.events (ts);
    CREATE INDEX events_task_type_ts ON {schema}.events (task_type, ts);
    CREATE INDEX events_trace_id ON {schema}.events (trace_id);
    """,
    # 2: control state (pauses, halts, their history, published per-key limits), the same
    # tables as the SQLite store's (closedloop.control.SQLiteLedger); evidence is JSON text
    """
    CREATE TABLE {schema}.control_stops (
        task_type TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL,
        by TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        until DOUBLE PRECISION,
        evidence TEXT NOT NULL
    );
    CREATE TABLE {schema}.control_history (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        event TEXT NOT NULL,
        task_type TEXT NOT NULL,
        reason TEXT NOT NULL,
        by TEXT NOT NULL,
        evidence TEXT
    );
    CREATE INDEX control_history_at ON {schema}.control_history (at);
    CREATE TABLE {schema}.control_keys (
        source TEXT NOT NULL,
        key TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        snapshot TEXT NOT NULL,
        PRIMARY KEY (source, key)
    );
    """,
    # 3: spans and scores (closedloop.store.postgres._spans): spans range-partitioned by day on
    # start_ns (ns since the epoch), ``seq`` numbering them in commit order (writers take an
    # advisory lock) for readers that tail them; one summary row per trace for listings
    """
    CREATE TABLE {schema}.spans (
        seq BIGSERIAL NOT NULL,
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        parent_id TEXT,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL,
        start_ns BIGINT NOT NULL,
        end_ns BIGINT NOT NULL,
        status INTEGER NOT NULL,
        status_message TEXT,
        attributes TEXT NOT NULL,
        events TEXT,
        content TEXT
    ) PARTITION BY RANGE (start_ns);
    CREATE INDEX spans_trace ON {schema}.spans (trace_id, start_ns);
    CREATE INDEX spans_seq ON {schema}.spans (seq);
    CREATE TABLE {schema}.traces (
        trace_id TEXT PRIMARY KEY,
        start_ns BIGINT NOT NULL,
        end_ns BIGINT NOT NULL,
        spans BIGINT NOT NULL,
        label_ns BIGINT,
        task_type TEXT,
        outcome TEXT
    );
    CREATE INDEX traces_start ON {schema}.traces (start_ns, trace_id);
    CREATE INDEX traces_task_start ON {schema}.traces (task_type, start_ns, trace_id);
    CREATE TABLE {schema}.scores (
        id BIGSERIAL PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        trace_id TEXT NOT NULL,
        span_id TEXT,
        name TEXT NOT NULL,
        value DOUBLE PRECISION,
        label TEXT,
        comment TEXT,
        source TEXT NOT NULL
    );
    CREATE INDEX scores_trace ON {schema}.scores (trace_id);
    CREATE INDEX scores_name_ts ON {schema}.scores (name, ts);
    CREATE INDEX scores_ts ON {schema}.scores (ts);
    """,
    # event schema v3: a step is data (ids, model, versions, labels, cost, the proposal);
    # nullable columns without a default change only the catalog (the partitions follow, no
    # row is rewritten), and the rows of older versions read as NULL; IF NOT EXISTS: a schema
    # put back to an older version by hand keeps the columns, and migrates again
    """
    ALTER TABLE {schema}.events
        ADD COLUMN IF NOT EXISTS step_id TEXT,
        ADD COLUMN IF NOT EXISTS parent_step_id TEXT,
        ADD COLUMN IF NOT EXISTS run_id TEXT,
        ADD COLUMN IF NOT EXISTS model TEXT,
        ADD COLUMN IF NOT EXISTS provider TEXT,
        ADD COLUMN IF NOT EXISTS agent_version TEXT,
        ADD COLUMN IF NOT EXISTS prompt_version TEXT,
        ADD COLUMN IF NOT EXISTS labels JSONB,
        ADD COLUMN IF NOT EXISTS cached_input_tokens BIGINT,
        ADD COLUMN IF NOT EXISTS cost_usd DOUBLE PRECISION,
        ADD COLUMN IF NOT EXISTS proposal TEXT,
        ADD COLUMN IF NOT EXISTS proposal_digest TEXT;
    """,
    # 5: what `closedloop report` and `closedloop steps` ask (closedloop.store.postgres._query):
    # each failure message's group, filled by the writer (rows stored before stay NULL and
    # are grouped when read, through events_ungrouped, which new rows never enter), the
    # latency histogram's index and the message groups' index (each statement a no-op where
    # it was applied before, as in a schema whose version was set back by hand)
    f"""
    ALTER TABLE {{schema}}.events ADD COLUMN IF NOT EXISTS error_group TEXT;
    CREATE INDEX IF NOT EXISTS events_latency ON {{schema}}.events (task_type,
        {LATENCY_BUCKET}) INCLUDE (ts, latency_ms);
    CREATE INDEX IF NOT EXISTS events_groups ON {{schema}}.events (task_type, error_type,
        error_group, ts) WHERE error_group IS NOT NULL;
    CREATE INDEX IF NOT EXISTS events_ungrouped ON {{schema}}.events (ts)
        WHERE error_group IS NULL AND error_message <> '';
    """,
    # the summary's counts and sums read from an index of their own (an index-only scan,
    # each day in the index's order) rather than from every whole row: 40 % less time
    """
    CREATE INDEX IF NOT EXISTS events_report ON {schema}.events (task_type, outcome,
        error_type, validation_passed, verification_passed, attempts)
        INCLUDE (ts, input_tokens, output_tokens, latency_ms);
    """,
    # a step by its id (approvals, replay, a multi-step run's parent) and a run's steps in
    # order; only steps that belong to a run enter the second
    """
    CREATE INDEX IF NOT EXISTS events_step ON {schema}.events (step_id)
        WHERE step_id IS NOT NULL;
    CREATE INDEX IF NOT EXISTS events_run ON {schema}.events (run_id, ts)
        WHERE run_id IS NOT NULL;
    """,
    # the report's cost and prompt-cache figures read from events_report too (index-only):
    # the index again with the two columns included
    """
    DROP INDEX IF EXISTS {schema}.events_report;
    CREATE INDEX events_report ON {schema}.events (task_type, outcome,
        error_type, validation_passed, verification_passed, attempts)
        INCLUDE (ts, input_tokens, output_tokens, latency_ms, cached_input_tokens, cost_usd);
    """,
    # runs (closedloop.Run, closedloop.store.postgres._runs): one record per run, listed
    # newest first through runs_started; the steps of one run through events_run (above), a
    # partial index that steps outside any run never enter
    """
    CREATE TABLE IF NOT EXISTS {schema}.runs (
        run_id TEXT PRIMARY KEY,
        name TEXT,
        started DOUBLE PRECISION NOT NULL,
        ended DOUBLE PRECISION,
        outcome TEXT NOT NULL,
        error_type TEXT,
        message TEXT,
        steps BIGINT NOT NULL,
        refused BIGINT NOT NULL,
        failed BIGINT NOT NULL,
        compensated BIGINT NOT NULL,
        input_tokens BIGINT NOT NULL,
        output_tokens BIGINT NOT NULL,
        cost_usd DOUBLE PRECISION,
        budgets JSONB,
        parent_run_id TEXT,
        labels JSONB
    );
    CREATE INDEX IF NOT EXISTS runs_started ON {schema}.runs (started, run_id);
    """,
    # progressive autonomy (closedloop.store.postgres._autonomy): the same tables as the
    # SQLite store's, the level per (task type, agent, action class; '' for none), its audit
    # trail, humans' feedback on suggestions, and the saved state of change detectors
    """
    CREATE TABLE IF NOT EXISTS {schema}.autonomy_levels (
        task_type TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        action_class TEXT NOT NULL,
        level TEXT NOT NULL,
        ceiling TEXT,
        by TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        reason TEXT NOT NULL,
        evidence TEXT NOT NULL,
        PRIMARY KEY (task_type, agent_id, action_class)
    );
    CREATE TABLE IF NOT EXISTS {schema}.autonomy_history (
        id BIGSERIAL PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        agent_id TEXT NOT NULL,
        task_type TEXT NOT NULL,
        action_class TEXT NOT NULL,
        old_level TEXT,
        new_level TEXT NOT NULL,
        kind TEXT NOT NULL,
        by TEXT NOT NULL,
        reason TEXT NOT NULL,
        evidence TEXT
    );
    CREATE INDEX IF NOT EXISTS autonomy_history_at ON {schema}.autonomy_history (at);
    CREATE INDEX IF NOT EXISTS autonomy_history_task_at ON {schema}.autonomy_history
        (task_type, at);
    CREATE TABLE IF NOT EXISTS {schema}.autonomy_feedback (
        step_id TEXT PRIMARY KEY,
        agreed BOOLEAN NOT NULL,
        by TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        note TEXT
    );
    CREATE INDEX IF NOT EXISTS autonomy_feedback_at ON {schema}.autonomy_feedback (at);
    CREATE TABLE IF NOT EXISTS {schema}.detector_state (
        name TEXT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        state TEXT NOT NULL
    );
    """,
    # durable approval requests (closedloop.store.postgres._approvals): one row per request,
    # its fenced lease (token, epoch, expiry) in the row, and an append-only history
    """
    CREATE TABLE IF NOT EXISTS {schema}.approvals (
        request_id TEXT PRIMARY KEY,
        task_type TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL,
        portable INTEGER NOT NULL,
        approvals_needed INTEGER NOT NULL,
        approvers TEXT NOT NULL,
        revise BOOLEAN NOT NULL,
        lease_epoch INTEGER NOT NULL,
        lease_until DOUBLE PRECISION,
        body TEXT NOT NULL,
        result TEXT,
        lease_token TEXT
    );
    CREATE INDEX IF NOT EXISTS approvals_created ON {schema}.approvals (created_at, request_id);
    CREATE INDEX IF NOT EXISTS approvals_status ON {schema}.approvals (status, created_at,
        request_id);
    CREATE TABLE IF NOT EXISTS {schema}.approval_history (
        id BIGSERIAL PRIMARY KEY,
        request_id TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        action TEXT NOT NULL,
        by TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS approval_history_request ON {schema}.approval_history
        (request_id, id);
    """,
    # halts of runs from outside their process (closedloop runs halt; closedloop.store.
    # postgres._runs): one row per run, the first halt wins; polled by the run's process
    """
    CREATE TABLE IF NOT EXISTS {schema}.run_halts (
        run_id TEXT PRIMARY KEY,
        at DOUBLE PRECISION NOT NULL,
        by TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    """,
    # a trace's steps, oldest first (the dashboard's trace page: trace_id = %s ORDER BY ts
    # LIMIT n): one short ordered scan per day partition whatever their statistics say. With
    # events_trace_id alone, a partition not yet analyzed (the newest day, a fresh store) let
    # the planner walk events_ts instead, filtering every row: 0.7 s on 1M events
    """
    CREATE INDEX IF NOT EXISTS events_trace_ts ON {schema}.events (trace_id, ts);
    DROP INDEX IF EXISTS {schema}.events_trace_id;
    """,
    # what a stored event costs the server is mostly index upkeep: one index keyed by task
    # type and time, covering the summary's columns, serves what events_task_type_ts and
    # events_report served (a task type's steps newest first, the task types, the summary's
    # counts as an index-only scan). Its entries go in time order within a task type, the
    # cheapest place in a B-tree, where events_report's six-column key put them anywhere
    """
    CREATE INDEX IF NOT EXISTS events_task ON {schema}.events (task_type, ts) INCLUDE
        (outcome, error_type, validation_passed, verification_passed, attempts,
        input_tokens, output_tokens, latency_ms, cached_input_tokens, cost_usd);
    DROP INDEX IF EXISTS {schema}.events_report;
    DROP INDEX IF EXISTS {schema}.events_task_type_ts;
    """,
    # the learning layer's hourly roll-up (closedloop.store.postgres._rollup): each row
    # records its inserting transaction (a column default: a new column without one first,
    # so no row is rewritten; old rows stay NULL), the watermark of what is rolled up
    ROLLUP_MIGRATION,
    # the evidence for autonomy levels, per hour (closedloop.store.postgres._evidence): the
    # same watermark as the learning roll-up's
    EVIDENCE_MIGRATION,
)
SCHEMA_VERSION = len(MIGRATIONS)
# the column types of ``events``, for binary COPY
_COLUMN_TYPES = {
    "ts": "float8", "trace_id": "text", "agent_id": "text", "task_type": "text",
    "autonomy": "text", "outcome": "text", "attempts": "int4", "input_tokens": "int8",
    "output_tokens": "int8", "latency_ms": "float8", "validation_passed": "bool",
    "verification_passed": "bool", "error_type": "text", "error_message": "text",
    "propose_ms": "float8", "validate_ms": "float8", "act_ms": "float8", "verify_ms": "float8",
    "detail": "jsonb",
    # v3
    "step_id": "text", "parent_step_id": "text", "run_id": "text", "model": "text",
    "provider": "text", "agent_version": "text", "prompt_version": "text", "labels": "jsonb",
    "cached_input_tokens": "int8", "cost_usd": "float8", "proposal": "text",
    "proposal_digest": "text",
    # derived by the writer (migration 5)
    "error_group": "text",
}
_COLUMNS = (*EVENT_FIELDS, "error_group")
"""The stored columns: the event's, then what the writer derives from it."""
_COPY_TYPES = tuple(_COLUMN_TYPES[f] for f in _COLUMNS)

_DAY_PARTITION = re.compile(r"events_\d{8}")
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_INSTALL = "pip install 'closedloop[postgres]'"


def _import_psycopg(pool: bool = True) -> None:
    try:
        import psycopg  # noqa: F401

        if pool:
            import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"a postgresql:// store needs psycopg 3 and psycopg_pool ({exc.name} is missing): "
            f"{_INSTALL}"
        ) from None


def parse_url(url: str) -> tuple[str, str, str]:
    """``(conninfo for libpq, schema name, url without password)`` of a store URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"not a PostgreSQL store URL: {redact_url(url)!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [v for k, v in query if k == "schema"]
    schema = schemas[-1] if schemas else DEFAULT_SCHEMA
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ConfigError(
            f"store URL {redact_url(url)!r}: schema {schema!r} is not a plain SQL name "
            "(letters, digits, underscore; at most 63)"
        )
    rest = urlencode([(k, v) for k, v in query if k != "schema"])
    conninfo = urlunsplit(("postgresql", parts.netloc, parts.path, rest, ""))
    return conninfo, schema, redact_url(url)


def _lock_key(purpose: str, schema: str) -> int:
    """A signed 64-bit advisory lock key for ``purpose`` on ``schema``."""
    digest = hashlib.blake2b(f"closedloop:{purpose}:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _partition_day(ts: float) -> int | None:
    """The UTC day number (days since 1970-01-01) holding ``ts``; None if not finite."""
    if not math.isfinite(ts):
        return None
    return int(ts // DAY_S)


def _clean(value: Any) -> Any:
    """A value PostgreSQL text accepts: NUL and lone surrogates replaced by U+FFFD."""
    if isinstance(value, str):
        return _surrogates_replaced(value.replace("\x00", "\ufffd"))
    return value


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_MESSAGES = itemgetter(EVENT_FIELDS.index("error_message"))
_TS = itemgetter(EVENT_FIELDS.index("ts"))


def _days(events: Sequence[StepEvent]) -> set[int]:
    """The UTC day numbers of the events' finite timestamps (see :func:`_partition_day`), at
    C speed: a Python call per event would cost the writer thread, which shares the GIL
    with the agent, a few tenths of a microsecond each."""
    # inf // DAY_S and nan // DAY_S are nan: left out with the other non-finite values
    days = set(map(_DAY_F.__rfloordiv__, map(_TS, events)))
    return {int(d) for d in days if math.isfinite(d)}


def _clean_row(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` (an event tuple, ``detail`` a dict) with every text cleaned by :func:`_clean`."""
    return tuple(_clean_json(v) for v in row)


def _clean_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean_json(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean_json(v) for v in value]
    return value


def _surrogates_replaced(text: str) -> str:
    return "".join("\ufffd" if "\ud800" <= ch <= "\udfff" else ch for ch in text) \
        if _has_surrogate(text) else text


class PostgresBackend:
    """Events in a PostgreSQL schema; created (``create=True``) and migrated when opened.

    Telemetry side of the store: a batch the server refuses raises, and the store's writer
    retries, holds and dead-letters it (see :mod:`closedloop.store._writer`); reading errors
    are one-line :class:`~closedloop.StoreError`.
    """

    concurrent_batches = 2
    """The store's writer may write two batches at once (each its own ``COPY`` transaction
    on a pooled connection of its own): the server's index upkeep, most of what a stored
    event costs, then runs in two server processes instead of one."""

    def __init__(self, url: str, *, create: bool = True, pool_size: int = 4,
                 connect_timeout: float = 10.0, read_only: bool = False) -> None:
        _import_psycopg(pool=not read_only)
        import psycopg
        from psycopg import sql

        self._conninfo, self.schema, self.url = parse_url(url)
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._pool: ConnectionPool[psycopg.Connection[Any]] | _Connections | None = None
        self._pool_pid = 0
        self._pool_lock = threading.Lock()
        self._partitions: set[int] = set()
        self._spans: PostgresSpanStore | None = None
        self._ledger: PostgresLedger | None = None
        self.read_only = read_only
        """Opened to read (``closedloop report``): never migrated, events never written."""
        s = sql.Identifier(self.schema)
        self._copy = tuple(sql.SQL("COPY {}.events ({}) FROM STDIN (FORMAT BINARY)").format(
            s, sql.SQL(", ").join(sql.Identifier(f) for f in columns))
            for columns in (EVENT_FIELDS, _COLUMNS))
        """COPY of the event's columns [0], and with the error group [1]."""
        self._select = sql.SQL("SELECT {} FROM {}.events").format(
            sql.SQL(", ").join(sql.Identifier(f) for f in EVENT_FIELDS), s)
        try:
            if read_only:  # the connection that checks the version stays for the queries
                try:
                    with self.pool().connection() as conn:
                        self.found_version = existing_version(conn, self.schema)
                except BaseException:
                    self.close()
                    raise
            else:
                with self._connect() as conn:
                    self.found_version = migrate(conn, self.schema, create=create)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open store {self.url}: {_one_line(exc)}") from None

    def _connect(self, autocommit: bool = False) -> psycopg.Connection[Any]:
        import psycopg

        return psycopg.connect(self._conninfo, autocommit=autocommit,
                               connect_timeout=max(1, int(self._connect_timeout)))

    def pool(self) -> ConnectionPool[psycopg.Connection[Any]] | _Connections:
        """This process's connection pool, opened on first use (again in a forked child);
        plain connections (:class:`_Connections`) for a store opened read-only."""
        pid = os.getpid()
        pool = self._pool
        if pool is not None and self._pool_pid == pid:
            return pool
        with self._pool_lock:
            if self._pool is not None and self._pool_pid == pid:
                return self._pool
            if self.read_only:
                self._pool = _Connections(self._connect)
                self._pool_pid = pid
                return self._pool
            from psycopg_pool import ConnectionPool

            # A pool inherited through fork holds the parent's sockets: closing it would end
            # the parent's sessions, so the child only forgets it (psycopg never finishes a
            # connection from another process when it is garbage-collected).
            self._pool = ConnectionPool(
                self._conninfo, min_size=1, max_size=self._pool_size, open=True,
                configure=_configure,
                timeout=self._connect_timeout, num_workers=1,
                name=f"closedloop-{self.schema}",
                kwargs={"connect_timeout": max(1, int(self._connect_timeout)),
                        "autocommit": True})
            self._pool_pid = pid
            self._partitions = set()
            return self._pool

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """COPY the batch in one transaction, creating the day partitions it needs first."""
        import psycopg

        if not events:
            return
        if self.read_only:
            raise StoreError(f"store {self.url} was opened read-only")
        missing = _days(events) - self._partitions
        rows: Sequence[tuple[Any, ...]] = events
        if any(map(_MESSAGES, events)):  # the failure messages' groups go with them
            rows = [(*e, message_group(m) if (m := e.error_message) else None) for e in events]
        with self.pool().connection() as conn:
            if missing:
                ensure_partitions(conn, self.schema, missing)
                self._partitions |= missing
            try:
                self._copy_rows(conn, rows)
            except (psycopg.DataError, UnicodeEncodeError):
                # NUL or a lone surrogate somewhere: write the same batch with them replaced
                self._copy_rows(conn, [_clean_row(r) for r in rows])

    def _copy_rows(self, conn: psycopg.Connection[Any], rows: Sequence[tuple[Any, ...]]) -> None:
        # One COPY statement on an autocommit connection is one transaction, all or nothing,
        # without the round trips of BEGIN and COMMIT (each also costs the writer thread a
        # wait for the GIL while the agent's threads run). Binary: no float text to format
        # here or to parse on the server; ``detail`` is dumped as jsonb by psycopg. Rows are
        # the events themselves when no event has a failure message (no error group to add),
        # and are written at C speed (no Python frame per row but psycopg's own).
        grouped = len(rows[0]) == len(_COLUMNS)
        with conn.cursor() as cur, cur.copy(self._copy[grouped]) as copy:
            copy.set_types(_COPY_TYPES if grouped else _COPY_TYPES[:-1])
            deque(map(copy.write_row, rows), maxlen=0)

    def iter_events(self, query: EventQuery) -> Iterator[StepEvent]:
        """Events matching ``query``, oldest first, streamed from a server-side cursor."""
        import psycopg
        from psycopg import sql

        where: list[sql.Composable] = []
        params: list[Any] = []
        if query.since is not None:
            where.append(sql.SQL("ts >= %s"))
            params.append(query.since)
        if query.until is not None:
            where.append(sql.SQL("ts < %s"))
            params.append(query.until)
        if query.task_type is not None:
            where.append(sql.SQL("task_type = %s"))
            params.append(query.task_type)
        if query.trace_id is not None:
            where.append(sql.SQL("trace_id = %s"))
            params.append(query.trace_id)
        if query.run_id is not None:
            where.append(sql.SQL("run_id = %s"))
            params.append(query.run_id)
        stmt: sql.Composable = self._select
        if where:
            stmt = sql.SQL("{} WHERE {}").format(stmt, sql.SQL(" AND ").join(where))
        stmt = sql.SQL("{} ORDER BY ts").format(stmt)
        if query.limit is not None:
            stmt = sql.SQL("{} LIMIT {}").format(stmt, sql.Literal(max(0, int(query.limit))))
        try:
            with (self.pool().connection() as conn, conn.transaction(),
                  conn.cursor(name="closedloop_events") as cur):
                cur.itersize = 2000
                cur.execute(stmt, params)
                for row in cur:
                    yield StepEvent(*row)
        except psycopg.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {_one_line(exc)}") from None

    def summarize(self, where: StepFilter, *, top_messages: int) -> EventSummary | None:
        """The figures of the steps matching ``where``, in SQL (the query port)."""
        from closedloop.store.postgres._query import summarize

        return summarize(self, where, top_messages=top_messages)

    def list_steps(self, where: StepFilter, *, limit: int,
                   cursor: str | None = None) -> StepPage:
        """A page of steps matching ``where``, newest first (the query port)."""
        from closedloop.store.postgres._query import list_steps

        return list_steps(self, where, limit=limit, cursor=cursor)

    def list_steps_after(self, where: StepFilter, *, limit: int,
                         cursor: str | None = None) -> StepPage:
        """The steps matching ``where`` past ``cursor``, oldest first (the query port)."""
        from closedloop.store.postgres._query import list_steps

        return list_steps(self, where, limit=limit, cursor=cursor, after=True)

    def task_types(self) -> list[str]:
        """Every task type with a stored step, sorted (the query port)."""
        from closedloop.store.postgres._query import task_types

        return task_types(self)

    # ----- the learning layer's aggregations (closedloop.store._learn) ---------------------
    def series(self, where: StepFilter, *, by: Dimension, window: str
               ) -> list[SeriesCell] | None:
        """Per value of ``by`` and period, the series' figures (in SQL)."""
        from closedloop.store.postgres._learn import series

        return series(self, where, by=by, window=window)

    def factor_counts(self, where: StepFilter) -> list[FactorCell] | None:
        """Steps and failures per combination of factor values (in SQL)."""
        from closedloop.store.postgres._learn import factor_counts

        return factor_counts(self, where)

    def fold_rollups(self) -> int:
        """Bring the learning roll-ups up to date (see :class:`~closedloop.store.
        RollupKeeper`); how many were folded."""
        from closedloop.store.postgres._learn import fold_rollups

        return fold_rollups(self) + self._fold_evidence()

    def _fold_evidence(self) -> int:
        """Fold the new steps into the evidence roll-up (:mod:`closedloop.store.postgres.
        _evidence`): 1 when it did."""
        import psycopg

        from closedloop.store.postgres._evidence import refresh

        try:
            with self.pool().connection() as conn:
                return int(refresh(conn, self.schema))
        except psycopg.Error as exc:
            raise StoreError(f"cannot update the evidence roll-up of store {self.url}: "
                             f"{_one_line(exc)}") from None

    def factor_margins(self, where: StepFilter) -> FactorMargins | None:
        """Steps and failures per value of each factor alone (from the roll-up)."""
        from closedloop.store.postgres._learn import factor_margins

        return factor_margins(self, where)

    def failure_counts(self, where: StepFilter, *, window: str) -> list[FailureCell] | None:
        """Failed steps per group, task type, model and period (in SQL)."""
        from closedloop.store.postgres._learn import failure_counts

        return failure_counts(self, where, window=window)

    def failure_examples(self, where: StepFilter, keys: Sequence[ExampleKey], *,
                         per_key: int) -> dict[ExampleKey, list[tuple[float, str]]] | None:
        """The newest trace ids of each key's failed steps (in SQL)."""
        from closedloop.store.postgres._learn import failure_examples

        return failure_examples(self, where, keys, per_key=per_key)

    def period_steps(self, where: StepFilter, *, window: str) -> dict[int, int] | None:
        """Steps per period (in SQL)."""
        from closedloop.store.postgres._learn import period_steps

        return period_steps(self, where, window=window)

    def count(self) -> int:
        """How many events the schema holds."""
        import psycopg
        from psycopg import sql

        try:
            with self.pool().connection() as conn:
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}.events").format(
                    sql.Identifier(self.schema))).fetchone()
        except psycopg.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {_one_line(exc)}") from None
        assert row is not None
        return int(row[0])

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        with self.pool().connection() as conn:
            return _recorded_version(conn, self.schema)

    def close(self) -> None:
        """Close this process's pool and the control ledger's connection; the next call
        opens new ones."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
            ledger = self._ledger
        if pool is not None and self._pool_pid == os.getpid():
            pool.close()
        if ledger is not None:
            ledger.close()

    # ----- maintenance: the port of closedloop.store._retention ----------------------------
    def info(self) -> StoreInfo:
        """Counts, size in the database, schema version, partitions, oldest and newest
        event; never writes."""
        import psycopg

        try:
            with self.pool().connection() as conn:
                return _info(conn, self.schema, self.url)
        except psycopg.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {_one_line(exc)}") from None

    def prune_events(self, before: float, *, limit: int | None = None,
                     dry_run: bool = False) -> EventsPruned:
        """Drop the day partitions that end before ``before``, oldest first, stopping once
        ``limit`` events have gone (a whole partition at least); then delete the late events
        of those days that landed in ``events_default``. No row of a kept day is touched."""
        import psycopg
        from psycopg import sql

        keep_from = math.floor(before / DAY_S) * DAY_S if math.isfinite(before) else before
        s = sql.Identifier(self.schema)
        dropped: list[str] = []
        done = 0
        approximate = False
        try:
            with self.pool().connection() as conn:
                old = [name for name in _partition_names(conn, self.schema)
                       if _partition_start(name) + DAY_S <= keep_from]
                for name in old:
                    if limit is not None and done >= limit and dropped:
                        return EventsPruned(events=done, partitions=tuple(dropped),
                                            kept_from=keep_from, more=True,
                                            approximate=approximate)
                    table = sql.SQL("{}.{}").format(s, sql.Identifier(name))
                    rows, estimated = _partition_rows(conn, self.schema, name)
                    approximate = approximate or estimated
                    if not dry_run:
                        with conn.transaction():
                            # as partitions are created: one at a time per schema; a busy
                            # table (a long read) is tried again on the next run
                            conn.execute("SET LOCAL lock_timeout = '5s'")
                            conn.execute("SELECT pg_advisory_xact_lock(%s)",
                                         (_lock_key("partition", self.schema),))
                            # the learning roll-up, in the same transaction (its lock
                            # first, as a fold takes it before reading the partitions)
                            rollup_pruned(conn, self.schema, _partition_start(name) + DAY_S)
                            evidence_pruned(conn, self.schema, _partition_start(name) + DAY_S)
                            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(table))
                        self._partitions.discard(int(_partition_start(name) // DAY_S))
                    done += rows
                    dropped.append(name)
                late = sql.SQL("FROM {}.events_default WHERE ts < %s").format(s)
                if dry_run:
                    row = conn.execute(sql.SQL("SELECT count(*) {}").format(late),
                                       (keep_from,)).fetchone()
                    done += int(row[0]) if row else 0
                else:
                    with conn.transaction():
                        if keep_from > -math.inf:
                            rollup_pruned(conn, self.schema, keep_from)
                            evidence_pruned(conn, self.schema, keep_from)
                        done += conn.execute(sql.SQL("DELETE {}").format(late),
                                             (keep_from,)).rowcount
        except psycopg.Error as exc:
            raise StoreError(f"cannot prune store {self.url}: {_one_line(exc)}") from None
        return EventsPruned(events=done, partitions=tuple(dropped), kept_from=keep_from,
                            approximate=approximate)

    def prune_control(self, before: float, *, now: float, dry_run: bool = False) -> int:
        """Delete control history, snapshots and expired pauses older than ``before``; never a
        stop active at ``now`` or the history record of its start."""
        import psycopg
        from psycopg import sql

        args = {"before": before, "now": now}
        prefix = f'"{self.schema}".'  # a plain SQL name (parse_url checks it)
        try:
            with self.pool().connection() as conn, conn.transaction():
                if _recorded_version(conn, self.schema) < _CONTROL_V:
                    return 0
                conn.execute("SELECT pg_advisory_xact_lock(%s)",
                             (_lock_key("control", self.schema),))
                removed = 0
                for table, where in CONTROL_PRUNE:
                    clause = sql.SQL(where.format(s=prefix))
                    target = sql.SQL("{}.{}").format(sql.Identifier(self.schema),
                                                     sql.Identifier(table))
                    if dry_run:
                        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                            target, clause), args).fetchone()
                        removed += int(row[0]) if row else 0
                    else:
                        removed += conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(
                            target, clause), args).rowcount
                return removed
        except psycopg.Error as exc:
            raise StoreError(f"cannot prune store {self.url}: {_one_line(exc)}") from None

    def prune_records(self, before: float, *, dry_run: bool = False) -> dict[str, int]:
        """Delete settled approval requests and their history, autonomy audit and feedback,
        and runs older than ``before`` (the rules of
        :data:`~closedloop.store._retention.RECORD_PRUNE`), in one transaction."""
        import psycopg
        from psycopg import sql

        prefix = f'"{self.schema}".'  # a plain SQL name (parse_url checks it)
        removed: dict[str, int] = {}
        try:
            with self.pool().connection() as conn, conn.transaction():
                for table, where in record_clauses(prefix):
                    if conn.execute("SELECT to_regclass(%s)",
                                    (f"{prefix}{table}",)).fetchone() == (None,):
                        continue  # a schema of an older version
                    target = sql.SQL("{}.{}").format(sql.Identifier(self.schema),
                                                     sql.Identifier(table))
                    if dry_run:
                        row = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                            target, sql.SQL(where)), {"before": before}).fetchone()
                        removed[table] = int(row[0]) if row else 0
                    else:
                        removed[table] = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(
                            target, sql.SQL(where)), {"before": before}).rowcount
        except psycopg.Error as exc:
            raise StoreError(f"cannot prune store {self.url}: {_one_line(exc)}") from None
        return removed

    def run_store(self) -> PostgresRunStore:
        """The run records in this schema (the run port)."""
        from closedloop.store.postgres._runs import PostgresRunStore

        return PostgresRunStore(self)

    def approval_store(self) -> PostgresApprovals:
        """The approval requests in this store's schema (the approval port), on its pool."""
        from closedloop.store.postgres._approvals import PostgresApprovals

        return PostgresApprovals(self)

    def control_ledger(self) -> PostgresLedger:
        """Pauses and halts in this store's schema (the control-state port); one for the
        backend's life, with its one connection."""
        with self._pool_lock:
            if self._ledger is None:
                self._ledger = PostgresLedger(self._conninfo, self.schema, self.url,
                                              connect_timeout=self._connect_timeout)
            return self._ledger

    def level_store(self) -> PostgresLevelStore:
        """Autonomy levels, their audit trail, feedback and detector states in this store's
        schema (the level-store port), on its connection pool; fails closed."""
        from closedloop.store.postgres._autonomy import PostgresLevelStore

        found: PostgresLevelStore | None = getattr(self, "_level_store", None)
        if found is None:  # one for the backend's life: it throttles its folds
            found = self._level_store = PostgresLevelStore(
                self.pool, self._connect, self.schema, self.url, fold=not self.read_only)
        return found

    def span_store(self) -> PostgresSpanStore:
        """Spans and scores in this store's schema (the span/score port); one for the
        backend's life, on its connection pool."""
        from closedloop.store.postgres._spans import PostgresSpanStore

        with self._pool_lock:
            if self._spans is None:
                self._spans = PostgresSpanStore(self)
            return self._spans

    def __repr__(self) -> str:
        return f"PostgresBackend({self.url!r})"


class PostgresLedger:
    """Pauses and halts in the store's schema: ``control_stops`` and ``control_history``.

    The same record and rules as :class:`~closedloop.control.SQLiteLedger`, shared by every
    process and machine using the store: a pause never replaces a halt in force, a lift
    records who and why, reasons and evidence are redacted before they are stored. Writes
    are serialised by an advisory lock on the schema. It keeps one connection of its own,
    apart from the event pool so that telemetry never delays a control decision: control
    state is read about once a second per task type, and a connection per read cost ~7 ms
    of connection setup. A call on a kept connection that fails at the connection level
    (the server restarted, the connection was killed) is tried once more on a fresh one, so
    a server that was away is used again at once; any other failure raises
    :class:`~closedloop.ControlUnavailable` (the guard fails closed). A child process after
    ``fork`` never touches its parent's connection. Reads never create anything: a schema
    without the tables has no stops; the first write migrates it (as opening a store does).
    """

    def __init__(self, conninfo: str, schema: str, url: str, *,
                 connect_timeout: float = 10.0, statement_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time) -> None:
        from psycopg import sql

        self._conninfo = conninfo
        self.schema = schema
        self.url = url
        self.clock = clock
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._migrated = False
        self._kept = _Kept()
        self._lock = threading.Lock()
        # a ledger dropped without close() still closes its connection (psycopg warns about
        # a connection collected open), and so does the interpreter's exit
        weakref.finalize(self, self._kept.close)
        s = sql.Identifier(schema)
        self._q = {name: sql.SQL(text).format(s=s) for name, text in _LEDGER_SQL.items()}

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PostgresLedger:
        """The ledger of the store at ``url`` (nothing is opened until the first call)."""
        _import_psycopg()
        conninfo, schema, shown = parse_url(url)
        return cls(conninfo, schema, shown, **kwargs)

    def __repr__(self) -> str:
        return f"PostgresLedger({self.url!r})"

    # ----- one kept connection --------------------------------------------------------------
    def _connection(self) -> psycopg.Connection[Any]:
        """The kept connection, opened (with the statement timeout) when there is none."""
        import psycopg

        kept = self._kept
        kept.forget_if_forked()
        if kept.conn is None or kept.conn.closed:
            conn = psycopg.connect(self._conninfo, autocommit=True,
                                   connect_timeout=max(1, int(self._connect_timeout)))
            try:
                conn.execute("SELECT set_config('statement_timeout', %s, false)",
                             (f"{int(self._statement_timeout * 1000)}ms",))
            except BaseException:
                conn.close()
                raise
            kept.conn = conn
        return kept.conn

    def close(self) -> None:
        """Close the kept connection (the next call opens another)."""
        with self._lock:
            self._kept.close()

    def _run(self, what: str, work: Callable[[psycopg.Connection[Any]], _T], *,
             absent: Callable[[], _T] | None = None, write: bool = False,
             create: bool = False) -> _T:
        """``work`` on the kept connection (``write``: in one transaction under the schema's
        control lock; ``create``: migrating the schema first, once), or ``absent()`` if the
        tables do not exist."""
        import psycopg
        from psycopg import errors

        with self._lock:
            self._kept.forget_if_forked()
            reused = self._kept.conn is not None and not self._kept.conn.closed
            try:
                return self._attempt(work, absent=absent, write=write, create=create)
            except errors.QueryCanceled as exc:  # the statement timeout: the server is slow
                raise self._fail(what, exc) from None
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                self._kept.close()
                if not reused:
                    raise self._fail(what, exc) from None
            except (psycopg.Error, StoreError, OSError) as exc:
                raise self._fail(what, exc) from None
            try:  # the kept connection had gone (a restart, a killed backend): once afresh
                return self._attempt(work, absent=absent, write=write, create=create)
            except (psycopg.Error, StoreError, OSError) as exc:
                self._kept.close()
                raise self._fail(what, exc) from None

    def _attempt(self, work: Callable[[psycopg.Connection[Any]], _T], *,
                 absent: Callable[[], _T] | None, write: bool, create: bool) -> _T:
        conn = self._connection()
        if create and not self._migrated:
            migrate(conn, self.schema, create=True)
            self._migrated = True
        # no tables: nothing was ever stopped here, unless the store's schema says they
        # should exist (then control state is broken: fail closed)
        return locked_work(conn, self.schema, "control", work, write=write, absent=absent,
                           tables_since=_CONTROL_V)

    def _fail(self, what: str, exc: BaseException) -> ControlUnavailable:
        return ControlUnavailable(f"cannot {what} control state in {self.url}: "
                                  f"{_one_line(exc)}")

    # ----- the ledger ----------------------------------------------------------------------
    def put(self, stop: Stop) -> None:
        """Record a pause or halt; a pause never replaces a halt in force."""
        stop = redacted(stop)
        row = (_clean(stop.task_type), stop.kind.value, _clean(stop.reason), _clean(stop.by),
               stop.at, stop.until, json.dumps(stop.evidence, default=str))

        def work(conn: psycopg.Connection[Any]) -> None:
            old = conn.execute(self._q["get"], (row[0],)).fetchone()
            if _merge(_ledger_stop(old) if old else None, stop, self.clock()):
                conn.execute(self._q["upsert"], row)
                conn.execute(self._q["log"], (stop.at, stop.kind.value, row[0], row[2], row[3],
                                              row[6]))

        self._run("write", work, write=True, create=True)

    def get(self, task_type: str) -> Stop | None:
        """The stop in force for ``task_type`` (an expired pause is none)."""
        row = self._run("read", lambda conn: conn.execute(
            self._q["get"], (_clean(task_type),)).fetchone(), absent=lambda: None)
        stop = _ledger_stop(row) if row else None
        return stop if stop is not None and stop.active(self.clock()) else None

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        """Remove the stop and record who lifted it and why; returns what was lifted."""
        reason = _clean(redact_text(reason))

        def work(conn: psycopg.Connection[Any]) -> Stop | None:
            row = conn.execute(self._q["delete"], (_clean(task_type),)).fetchone()
            if row is None:
                return None
            conn.execute(self._q["log"], (self.clock(), "resumed", _clean(task_type), reason,
                                          _clean(by), None))
            return _ledger_stop(row)

        # a lift never creates the tables: where there are none, nothing is stopped
        return self._run("write", work, write=True, absent=lambda: None)

    def stops(self) -> list[Stop]:
        """Every stop in force, by task type."""
        rows = self._run("read", lambda conn: conn.execute(self._q["stops"]).fetchall(),
                         absent=list)
        now = self.clock()
        return [s for s in map(_ledger_stop, rows) if s.active(now)]

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """Recent stops and resumes, newest first."""
        rows = self._run("read", lambda conn: conn.execute(
            self._q["history"], (max(0, int(limit)),)).fetchall(), absent=list)
        return [history_entry(r) for r in rows]

    def publish(self, source: str, keys: dict[str, dict[str, Any]]) -> None:
        """Store one process's per-key flow-control snapshot, for ``closedloop status``."""
        now = self.clock()
        rows = [(_clean(source), _clean(key), now, json.dumps(snap, default=str))
                for key, snap in keys.items()]

        def work(conn: psycopg.Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(self._q["publish"], rows)

        self._run("write", work, write=True, create=True)

    def published(self, max_age: float = 300.0) -> dict[str, dict[str, Any]]:
        """Recent snapshots by ``key@source`` (older than ``max_age`` seconds are left out)."""
        rows = self._run("read", lambda conn: conn.execute(
            self._q["published"], (self.clock() - max_age,)).fetchall(), absent=list)
        return {f"{key}@{source}": {**json.loads(snap), "published": _iso(at)}
                for source, key, at, snap in rows}


_T = TypeVar("_T")
_INHERITED: list[Any] = []
"""Kept ledger connections a forked child inherited: held, never used or closed (psycopg
itself never ends a session from a child), so that collecting them warns of nothing."""


class _Kept:
    """A ledger's one connection and the process that opened it."""

    def __init__(self) -> None:
        self.conn: psycopg.Connection[Any] | None = None
        self.pid = os.getpid()

    def forget_if_forked(self) -> None:
        if self.pid != os.getpid():  # a forked child: the parent's socket is not ours
            if self.conn is not None:
                _INHERITED.append(self.conn)
            self.conn, self.pid = None, os.getpid()

    def close(self) -> None:
        self.forget_if_forked()
        conn, self.conn = self.conn, None
        if conn is not None:
            with suppress(Exception):
                conn.close()
_CONTROL_V = 2  # the migration that creates the control tables
_STOP_COLUMNS = "task_type, kind, reason, by, at, until, evidence"
_LEDGER_SQL = {
    "get": f"SELECT {_STOP_COLUMNS} FROM {{s}}.control_stops WHERE task_type = %s",
    "stops": f"SELECT {_STOP_COLUMNS} FROM {{s}}.control_stops ORDER BY task_type",
    "upsert": f"INSERT INTO {{s}}.control_stops ({_STOP_COLUMNS}) "
              "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (task_type) DO UPDATE SET "
              "kind = EXCLUDED.kind, reason = EXCLUDED.reason, by = EXCLUDED.by, "
              "at = EXCLUDED.at, until = EXCLUDED.until, evidence = EXCLUDED.evidence",
    "delete": f"DELETE FROM {{s}}.control_stops WHERE task_type = %s RETURNING {_STOP_COLUMNS}",
    "log": "INSERT INTO {s}.control_history (at, event, task_type, reason, by, evidence) "
           "VALUES (%s, %s, %s, %s, %s, %s)",
    "history": "SELECT at, event, task_type, reason, by, evidence FROM {s}.control_history "
               "ORDER BY at DESC, id DESC LIMIT %s",
    "publish": "INSERT INTO {s}.control_keys (source, key, at, snapshot) "
               "VALUES (%s, %s, %s, %s) ON CONFLICT (source, key) DO UPDATE SET "
               "at = EXCLUDED.at, snapshot = EXCLUDED.snapshot",
    "published": "SELECT source, key, at, snapshot FROM {s}.control_keys WHERE at >= %s "
                 "ORDER BY key, source",
}


class _Connections:
    """What a read-only backend uses instead of a pool: plain autocommit connections, opened
    when none is idle and kept for the next use. No thread, no ``psycopg_pool``: a one-shot
    command (``closedloop traces list``) pays neither for a pool it uses once."""

    def __init__(self, connect: Callable[[bool], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        """An idle connection, or a new one; kept afterwards if it is still usable."""
        from psycopg.pq import TransactionStatus

        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._connect(True)
            _configure(conn)
        try:
            yield conn
        finally:
            with self._lock:
                keep = not (self._closed or conn.closed
                            or conn.info.transaction_status != TransactionStatus.IDLE)
                if keep:
                    self._idle.append(conn)
            if not keep:  # closed meanwhile, broken, or left inside a transaction
                conn.close()

    def close(self) -> None:
        """Close the idle connections."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._closed = True
        for conn in idle:
            conn.close()


def _configure(conn: psycopg.Connection[Any]) -> None:
    from psycopg.types.json import set_json_dumps

    set_json_dumps(dumps, context=conn)  # as SQLite's: what JSON cannot hold, as str()


def _statements(migration: str, schema: str) -> Iterator[sql.Composed]:
    from psycopg import sql

    for statement in migration.split(";"):
        if statement.strip():
            yield sql.SQL(statement).format(schema=sql.Identifier(schema))


def locked_work(conn: psycopg.Connection[Any], schema: str, lock: str,
                work: Callable[[psycopg.Connection[Any]], _T], *, write: bool,
                absent: Callable[[], _T] | None, tables_since: int) -> _T:
    """``work`` on ``conn`` (``write``: in one transaction under the schema's advisory lock
    for ``lock``); where its tables do not exist, ``absent()``, unless there is no ``absent``
    or the schema's recorded version (``tables_since`` or later) says they should exist: then
    the error is raised (a broken record of control state fails closed)."""
    from psycopg import errors

    try:
        if not write:
            return work(conn)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(lock, schema),))
            return work(conn)
    except (errors.UndefinedTable, errors.InvalidSchemaName):
        if absent is None or _recorded_version(conn, schema) >= tables_since:
            raise
        return absent()


def _recorded_version(conn: psycopg.Connection[Any], schema: str) -> int:
    from psycopg import sql

    exists = conn.execute("SELECT to_regclass(%s)", (f'"{schema}".schema_version',)).fetchone()
    if exists is None or exists[0] is None:
        return 0
    row = conn.execute(sql.SQL("SELECT coalesce(max(version), 0) FROM {}.schema_version")
                       .format(sql.Identifier(schema))).fetchone()
    assert row is not None
    return int(row[0])


def migrate(conn: psycopg.Connection[Any], schema: str, *, create: bool = True) -> int:
    """Bring ``schema`` up to :data:`SCHEMA_VERSION`; return the version found before.

    Runs in one transaction under an advisory lock on the schema, so concurrent openers
    serialise and the second finds the work done. With ``create=False`` a schema without a
    closedloop store is a :class:`~closedloop.StoreError` and nothing is created.
    """
    from psycopg import sql

    s = sql.Identifier(schema)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("migrate", schema),))
        found = _recorded_version(conn, schema)
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"store schema {schema!r} is at version {found}, newer than this closedloop "
                f"supports ({SCHEMA_VERSION}); upgrade closedloop"
            )
        if found == SCHEMA_VERSION:
            return found
        if found == 0 and not create:
            raise StoreError(f"no closedloop store in schema {schema!r}; run `closedloop "
                             "demo --store URL` or point --store at one")
        if found == 0:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(s))
            conn.execute(sql.SQL(
                "CREATE TABLE {}.schema_version (version INTEGER PRIMARY KEY, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())").format(s))
        for version in range(found, SCHEMA_VERSION):
            for statement in _statements(MIGRATIONS[version], schema):
                conn.execute(statement)
            conn.execute(sql.SQL("INSERT INTO {}.schema_version (version) VALUES (%s)")
                         .format(s), (version + 1,))
    return found


def existing_version(conn: psycopg.Connection[Any], schema: str) -> int:
    """The schema version of the store in ``schema``, which must exist and not be newer than
    this closedloop; nothing is created or migrated (readers)."""
    found = _recorded_version(conn, schema)
    if found == 0:
        raise StoreError(f"no closedloop store in schema {schema!r}; run `closedloop demo "
                         "--store URL` or point --store at one")
    if found > SCHEMA_VERSION:
        raise StoreError(f"store schema {schema!r} is at version {found}, newer than this "
                         f"closedloop supports ({SCHEMA_VERSION}); upgrade closedloop")
    return found


def _partition_names(conn: psycopg.Connection[Any], schema: str) -> list[str]:
    """The day partitions of ``schema.events`` (``events_YYYYMMDD``), oldest first."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace "
        "WHERE n.nspname = %s AND p.relname = 'events'", (schema,)).fetchall()
    return sorted(r[0] for r in rows if _DAY_PARTITION.fullmatch(r[0]))


COUNT_UP_TO = 1_000_000
"""Partitions the planner's statistics put above this many rows are not counted before they
are dropped (counting tens of millions of rows would hold up the writer for seconds): the
statistics' figure is reported instead, marked approximate."""


def _partition_rows(conn: psycopg.Connection[Any], schema: str, name: str) -> tuple[int, bool]:
    """The rows of day partition ``name``, and whether that is an estimate."""
    from psycopg import sql

    row = conn.execute("SELECT c.reltuples FROM pg_class c JOIN pg_namespace n ON "
                       "n.oid = c.relnamespace WHERE n.nspname = %s AND c.relname = %s",
                       (schema, name)).fetchone()
    if row is None:  # dropped meanwhile (another process pruning)
        return 0, False
    if row[0] > COUNT_UP_TO:  # -1 until the table is first analyzed
        return int(row[0]), True
    counted = conn.execute(sql.SQL("SELECT count(*) FROM {}.{}").format(
        sql.Identifier(schema), sql.Identifier(name))).fetchone()
    return (int(counted[0]) if counted else 0), False


def _partition_start(name: str) -> float:
    """Unix seconds at the start of day partition ``events_YYYYMMDD`` (UTC)."""
    return float(calendar.timegm(time.strptime(name[len("events_"):], "%Y%m%d")))


def _info(conn: psycopg.Connection[Any], schema: str, url: str) -> StoreInfo:
    """What ``schema`` holds (see :class:`~closedloop.store._retention.StoreInfo`)."""
    from psycopg import sql

    def one(query: sql.Composed | str, *args: Any) -> Any:
        row = conn.execute(query, args).fetchone()
        return row[0] if row else None

    def table(name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))

    def count(name: str) -> int | None:
        if one("SELECT to_regclass(%s)", f'"{schema}"."{name}"') is None:
            return None
        return int(one(sql.SQL("SELECT count(*) FROM {}").format(table(name))))

    finite = "WHERE ts > '-Infinity'::float8 AND ts < 'Infinity'::float8"  # NaN sorts last
    stops = halts = 0
    if count("control_stops") is not None:
        row = conn.execute(sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE kind = 'halted') FROM {} "
            "WHERE until IS NULL OR until > %s").format(table("control_stops")),
            (time.time(),)).fetchone()
        stops, halts = (int(row[0]), int(row[1])) if row else (0, 0)
    size = one("SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c JOIN "
               "pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s AND "
               "c.relkind IN ('r', 'm')", schema)
    return StoreInfo(
        backend="postgresql", url=url, schema_version=_recorded_version(conn, schema),
        latest_version=SCHEMA_VERSION, events=count("events") or 0,
        oldest_event=one(sql.SQL("SELECT min(ts) FROM {} " + finite).format(table("events"))),
        newest_event=one(sql.SQL("SELECT max(ts) FROM {} " + finite).format(table("events"))),
        spans=count("spans"), scores=count("scores"), control_stops=stops,
        control_halts=halts, control_history=count("control_history") or 0,
        size_bytes=int(size),
        records={t: n for t in RECORD_TABLES if (n := count(t)) is not None},
        partitions=tuple(_partition_names(conn, schema)))


def partition_name(day: int) -> str:
    """``events_YYYYMMDD`` for a day number (days since 1970-01-01, UTC)."""
    return "events_" + time.strftime("%Y%m%d", time.gmtime(day * DAY_S))


def ensure_partitions(conn: psycopg.Connection[Any], schema: str, days: set[int]) -> None:
    """Create the day partitions of ``events`` that do not exist yet, in one transaction."""
    from psycopg import sql

    s = sql.Identifier(schema)
    with conn.transaction():
        # concurrent CREATE TABLE IF NOT EXISTS of one name can still collide: serialise
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("partition", schema),))
        for day in sorted(days):
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {}.{} PARTITION OF {}.events "
                "FOR VALUES FROM ({}) TO ({})").format(
                    s, sql.Identifier(partition_name(day)), s,
                    sql.Literal(float(day * DAY_S)), sql.Literal(float((day + 1) * DAY_S))))


def open_backend(url: str, *, create: bool = True, read_only: bool = False) -> PostgresBackend:
    """The scheme registry's factory for ``postgresql://`` and ``postgres://``."""
    return PostgresBackend(url, create=create, read_only=read_only)
