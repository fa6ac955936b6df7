"""The embedded default backend: one SQLite file in WAL mode, schema versioned by migrations.

Several processes may write the same file: each batch is one ``BEGIN IMMEDIATE`` transaction
and SQLite's busy timeout serialises them. The schema version lives in ``PRAGMA
user_version``; migrations run in one exclusive transaction, so two processes opening a new
file at once cannot both apply them.

A batch is inserted with a few multi-row ``INSERT`` statements rather than ``executemany``:
sqlite3 releases the GIL around every statement step, and an agent busy in Python in the same
process makes each re-acquisition wait up to the switch interval; one step per thousand rows
instead of one per row keeps the writer ahead of a busy producer. Columns that are NULL in
the whole batch are left out of the statement: sqlite3 binds ``None`` slowly, and most events
leave most optional fields empty.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

from closedloop._errors import StoreError
from closedloop._events import EVENT_FIELDS, JSON_COLUMNS, StepEvent, dumps
from closedloop._figures import message_group
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
from closedloop.store._retention import (
    BATCH,
    CONTROL_PRUNE,
    RECORD_TABLES,
    EventsPruned,
    StoreInfo,
    record_clauses,
)
from closedloop.store.sqlite._evidence import MIGRATION as EVIDENCE_MIGRATION
from closedloop.store.sqlite._evidence import pruned as evidence_pruned
from closedloop.store.sqlite._rollup import MIGRATION as ROLLUP_MIGRATION
from closedloop.store.sqlite._rollup import pruned as rollup_pruned

if TYPE_CHECKING:
    from closedloop.store.sqlite._approvals import SQLiteApprovals
    from closedloop.store.sqlite._autonomy import SQLiteLevelStore
    from closedloop.store.sqlite._ledger import SQLiteLedger
    from closedloop.store.sqlite._runs import SQLiteRunStore
    from closedloop.store.sqlite._spans import SQLiteSpanStore

LATENCY_BUCKET = (
    "(CASE WHEN latency_ms >= 0.001 THEN"
    " length(CAST(CAST(latency_ms * 1000 AS INTEGER) AS TEXT)) * 10"
    " + CAST(substr(CAST(CAST(latency_ms * 1000 AS INTEGER) AS TEXT), 1, 1) AS INTEGER)"
    " ELSE 0 END)")
"""A latency's bucket, non-decreasing in the latency and computed by SQLite alone (no math
functions, which not every build has): its whole microseconds' digit count and leading digit,
nine buckets per decade (0 below 1 µs). Indexed by ``events_latency``; never change it."""

# Each entry upgrades the schema from version N to N+1; never edit a released entry.
MIGRATIONS: tuple[str, ...] = (
    # 1: the step events table
    """
    CREATE TABLE events (
        ts REAL NOT NULL,
        trace_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        task_type TEXT NOT NULL,
        autonomy TEXT NOT NULL,
        outcome TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        validation_passed INTEGER,
        verification_passed INTEGER,
        error_type TEXT,
        error_message TEXT,
        propose_ms REAL NOT NULL,
        validate_ms REAL NOT NULL,
        act_ms REAL NOT NULL,
        verify_ms REAL NOT NULL,
        detail TEXT
    );
    CREATE INDEX events_ts ON events (ts);
    """,
    # 2: trace spans and semantic scores (closedloop.telemetry)
    """
    CREATE TABLE spans (
        trace_id TEXT NOT NULL,
        span_id TEXT NOT NULL,
        parent_id TEXT,
        name TEXT NOT NULL,
        kind INTEGER NOT NULL,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        status INTEGER NOT NULL,
        status_message TEXT,
        attributes TEXT NOT NULL,
        events TEXT,
        content TEXT
    );
    CREATE INDEX spans_trace ON spans (trace_id);
    CREATE INDEX spans_start ON spans (start_ns);
    CREATE TABLE scores (
        ts REAL NOT NULL,
        trace_id TEXT NOT NULL,
        span_id TEXT,
        name TEXT NOT NULL,
        value REAL,
        label TEXT,
        comment TEXT,
        source TEXT NOT NULL
    );
    CREATE INDEX scores_trace ON scores (trace_id);
    CREATE INDEX scores_name_ts ON scores (name, ts);
    """,
    # 3: one summary row per trace, kept up to date by every span batch, so that a trace
    # listing reads a page of an index instead of grouping every span (closedloop.store.
    # _sqlite_spans); filled here from the spans already stored
    """
    CREATE TABLE traces (
        trace_id TEXT PRIMARY KEY,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        spans INTEGER NOT NULL,
        label_ns INTEGER,
        task_type TEXT,
        outcome TEXT
    ) WITHOUT ROWID;
    INSERT INTO traces (trace_id, start_ns, end_ns, spans)
        SELECT trace_id, min(start_ns), max(end_ns), count(*) FROM spans GROUP BY trace_id;
    UPDATE traces SET (label_ns, task_type, outcome) = (
        SELECT s.start_ns, json_extract(s.attributes, '$."closedloop.task_type"'),
               json_extract(s.attributes, '$."closedloop.outcome"')
        FROM spans s WHERE s.trace_id = traces.trace_id
        AND json_extract(s.attributes, '$."closedloop.task_type"') IS NOT NULL
        ORDER BY s.start_ns,
                 json_extract(s.attributes, '$."closedloop.outcome"') IS NULL LIMIT 1);
    CREATE INDEX traces_start ON traces (start_ns, trace_id);
    CREATE INDEX traces_task_start ON traces (task_type, start_ns, trace_id);
    CREATE INDEX scores_ts ON scores (ts);
    """,
    # event schema v3: a step is data (ids, model, versions, labels, cost, the proposal);
    # nullable columns without a default: SQLite adds them without rewriting a row, and
    # the rows of older versions read as None
    """
    ALTER TABLE events ADD COLUMN step_id TEXT;
    ALTER TABLE events ADD COLUMN parent_step_id TEXT;
    ALTER TABLE events ADD COLUMN run_id TEXT;
    ALTER TABLE events ADD COLUMN model TEXT;
    ALTER TABLE events ADD COLUMN provider TEXT;
    ALTER TABLE events ADD COLUMN agent_version TEXT;
    ALTER TABLE events ADD COLUMN prompt_version TEXT;
    ALTER TABLE events ADD COLUMN labels TEXT;
    ALTER TABLE events ADD COLUMN cached_input_tokens INTEGER;
    ALTER TABLE events ADD COLUMN cost_usd REAL;
    ALTER TABLE events ADD COLUMN proposal TEXT;
    ALTER TABLE events ADD COLUMN proposal_digest TEXT;
    """,
    # 5: what `closedloop report` and `closedloop steps` ask (closedloop.store.sqlite._query):
    # each failure message's group, filled by the writer (rows stored before stay NULL and
    # are grouped when read, through events_ungrouped, which new rows never enter), and the
    # summary's indexes, each read in its order so that SQLite never sorts: counts and sums,
    # the latency histogram, message groups. Each grows at a few places per batch (its key
    # ends in ts), never at random places (see BENCHMARKS.md for what they cost ingest).
    f"""
    ALTER TABLE events ADD COLUMN error_group TEXT;
    CREATE INDEX events_report ON events (task_type, outcome, error_type, validation_passed,
        verification_passed, attempts, ts, input_tokens, output_tokens, latency_ms);
    CREATE INDEX events_latency ON events (task_type, {LATENCY_BUCKET}, ts, latency_ms);
    CREATE INDEX events_groups ON events (task_type, error_type, error_group, ts)
        WHERE error_group IS NOT NULL;
    CREATE INDEX events_ungrouped ON events (ts)
        WHERE error_group IS NULL AND error_message <> '';
    """,
    # a step by its id (approvals, replay, a multi-step run's parent) and a run's steps in
    # order: step ids grow within a process, so the first index grows at one place per
    # writing process; only steps that belong to a run enter the second (see BENCHMARKS.md
    # for what they cost ingest)
    """
    CREATE INDEX events_step ON events (step_id) WHERE step_id IS NOT NULL;
    CREATE INDEX events_run ON events (run_id, ts) WHERE run_id IS NOT NULL;
    """,
    # the report's cost and prompt-cache figures read from events_report too (covering):
    # the index again with the two columns at its end (a store of a million events
    # rebuilds it in a few seconds, once)
    """
    DROP INDEX events_report;
    CREATE INDEX events_report ON events (task_type, outcome, error_type, validation_passed,
        verification_passed, attempts, ts, input_tokens, output_tokens, latency_ms,
        cached_input_tokens, cost_usd);
    """,
    # runs (closedloop.Run, closedloop.store.sqlite._runs): one record per run, listed newest
    # first through runs_started; the steps of one run through events_run (above), a partial
    # index that steps outside any run never enter (so they cost ingest nothing)
    """
    CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        name TEXT,
        started REAL NOT NULL,
        ended REAL,
        outcome TEXT NOT NULL,
        error_type TEXT,
        message TEXT,
        steps INTEGER NOT NULL,
        refused INTEGER NOT NULL,
        failed INTEGER NOT NULL,
        compensated INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        cost_usd REAL,
        budgets TEXT,
        parent_run_id TEXT,
        labels TEXT
    ) WITHOUT ROWID;
    CREATE INDEX IF NOT EXISTS runs_started ON runs (started, run_id);
    """,
    # progressive autonomy (closedloop.store.sqlite._autonomy): the level per (task type,
    # agent, action class; '' for none), its audit trail, humans' feedback on suggestions,
    # and the saved state of change detectors
    """
    CREATE TABLE autonomy_levels (
        task_type TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        action_class TEXT NOT NULL,
        level TEXT NOT NULL,
        ceiling TEXT,
        by TEXT NOT NULL,
        at REAL NOT NULL,
        reason TEXT NOT NULL,
        evidence TEXT NOT NULL,
        PRIMARY KEY (task_type, agent_id, action_class)
    ) WITHOUT ROWID;
    CREATE TABLE autonomy_history (
        at REAL NOT NULL,
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
    CREATE INDEX autonomy_history_at ON autonomy_history (at);
    CREATE INDEX autonomy_history_task_at ON autonomy_history (task_type, at);
    CREATE TABLE autonomy_feedback (
        step_id TEXT PRIMARY KEY,
        agreed INTEGER NOT NULL,
        by TEXT NOT NULL,
        at REAL NOT NULL,
        note TEXT
    );
    CREATE INDEX autonomy_feedback_at ON autonomy_feedback (at);
    CREATE TABLE detector_state (
        name TEXT PRIMARY KEY,
        at REAL NOT NULL,
        state TEXT NOT NULL
    );
    """,
    # durable approval requests (closedloop.store.sqlite._approvals): one row per request,
    # its fenced lease (token, epoch, expiry) in the row, and an append-only history
    """
    CREATE TABLE approvals (
        request_id TEXT PRIMARY KEY,
        task_type TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        updated_at REAL NOT NULL,
        portable INTEGER NOT NULL,
        approvals_needed INTEGER NOT NULL,
        approvers TEXT NOT NULL,
        revise INTEGER NOT NULL,
        lease_epoch INTEGER NOT NULL,
        lease_until REAL,
        body TEXT NOT NULL,
        result TEXT,
        lease_token TEXT
    ) WITHOUT ROWID;
    CREATE INDEX approvals_created ON approvals (created_at, request_id);
    CREATE INDEX approvals_status ON approvals (status, created_at, request_id);
    CREATE TABLE approval_history (
        request_id TEXT NOT NULL,
        at REAL NOT NULL,
        action TEXT NOT NULL,
        by TEXT NOT NULL,
        reason TEXT NOT NULL
    );
    CREATE INDEX approval_history_request ON approval_history (request_id);
    """,
    # halts of runs from outside their process (closedloop runs halt; closedloop.store.sqlite.
    # _runs): one row per run, the first halt wins; polled by the run's process by run id
    """
    CREATE TABLE IF NOT EXISTS run_halts (
        run_id TEXT PRIMARY KEY,
        at REAL NOT NULL,
        by TEXT NOT NULL,
        reason TEXT NOT NULL
    ) WITHOUT ROWID;
    """,
    # a trace's steps, oldest first (the dashboard's trace page, `events --trace`): without
    # it, every step was read (1.1-1.7 s on 1M events)
    """
    CREATE INDEX IF NOT EXISTS events_trace ON events (trace_id, ts);
    """,
    # the learning layer's hourly roll-up (closedloop.store.sqlite._rollup): kept up by the
    # queries that read it, never by the writer
    ROLLUP_MIGRATION,
    # the evidence for autonomy levels, per hour (closedloop.store.sqlite._evidence): kept up
    # like the learning roll-up, never by the writer
    EVIDENCE_MIGRATION,
)
SCHEMA_VERSION = len(MIGRATIONS)

_NFIELDS = len(EVENT_FIELDS)
_BOOLS = tuple(EVENT_FIELDS.index(f) for f in ("validation_passed", "verification_passed"))
_NULLABLE = tuple(EVENT_FIELDS.index(f) for f in (
    "validation_passed", "verification_passed", "error_type", "error_message", "detail",
    *EVENT_FIELDS[EVENT_FIELDS.index("detail") + 1:]))
"""Columns that may be NULL: left out of a batch's INSERT when no event of it has one."""
_MESSAGE = EVENT_FIELDS.index("error_message")
_COLUMNS = (*EVENT_FIELDS, "error_group")
"""The stored columns: the event's, then what the writer derives from it (migration 5)."""
_GROUP = _NFIELDS
"""``error_group``'s index in :data:`_COLUMNS`."""
_SELECT = f"SELECT {', '.join(EVENT_FIELDS)} FROM events"
_BUSY_TIMEOUT_S = 30.0


_MAX_PARAMS = 32766
"""SQLite's default limit of parameters per statement."""
_ROWS = 256
"""Rows per INSERT statement at most (a power of two, within SQLite's parameter limit for
every set of columns)."""


class _Insert(NamedTuple):
    """The multi-row INSERTs of one set of columns, one per power-of-two row count up to
    :data:`_ROWS`, each text built once: a batch is written with the same few statements
    every time, each parsed once and then taken from the connection's statement cache (a
    statement of another size is parsed anew: more instructions per row than the insert)."""

    width: int
    head: str
    row: str
    texts: dict[int, str]

    @classmethod
    def of(cls, columns: Sequence[int]) -> _Insert:
        width = len(columns)
        head = f"INSERT INTO events ({', '.join(_COLUMNS[i] for i in columns)}) VALUES "
        return cls(width, head, f"({', '.join('?' * width)})", {})

    def statement(self, rows: int) -> str:
        text = self.texts.get(rows)
        if text is None:
            text = self.texts[rows] = self.head + ",".join([self.row] * rows)
        return text


def statement_sizes(n: int) -> list[int]:
    """The row counts of the statements that write ``n`` rows: :data:`_ROWS` each, then the
    rest as powers of two, largest first (``300`` -> ``[256, 32, 8, 4]``)."""
    sizes = [_ROWS] * (n // _ROWS)
    rest, size = n % _ROWS, _ROWS
    while rest:
        size >>= 1
        if rest & size:
            sizes.append(size)
            rest -= size
    return sizes


assert _ROWS * len(_COLUMNS) <= _MAX_PARAMS, "a statement must stay within the limit"


_INSERTS: dict[tuple[int, ...], _Insert] = {}
"""The INSERT of each set of columns seen (a handful: which optional fields are in use)."""


def _params(events: Sequence[StepEvent]) -> tuple[_Insert, list[Any]]:
    """The batch as one flat parameter list (row after row), ``detail`` and ``labels`` as
    JSON text and the two booleans as 0/1, each failure message's ``error_group``, and the
    INSERT it goes with.

    Built column by column at C speed: the batch is transposed once (``zip``), a column that
    is NULL in every event is left out of the statement (it is NULL by default), and each
    kept column is copied into its stride of the list. sqlite3 binds ``int``, ``float`` and
    ``str`` directly but sends anything else, ``None`` and ``bool`` included, through its
    adapter lookup (a failed ``__conform__`` look-up, ~1 µs each): the booleans are bound as
    integers, and the unused optional columns of schema v3 are not bound at all.
    """
    n = len(events)
    columns = list(zip(*events, strict=True))
    kept = tuple(i for i in range(_NFIELDS)
                 if i not in _NULLABLE or columns[i].count(None) != n)
    grouped = _MESSAGE in kept  # some step of the batch failed with a message: group it
    key = (*kept, _GROUP) if grouped else kept
    insert = _INSERTS.get(key)
    if insert is None:
        insert = _INSERTS[key] = _Insert.of(key)
    width = insert.width
    flat: list[Any] = [None] * (n * width)
    for at, i in enumerate(kept):
        values: Iterable[Any] = columns[i]
        if i in _BOOLS:
            values = map(_INT_OF.get, values, values)
        elif i in JSON_COLUMNS:
            values = [None if v is None else dumps(v) for v in values]
        flat[at::width] = values
    if grouped:
        flat[len(kept)::width] = [message_group(m) if m else None for m in columns[_MESSAGE]]
    return insert, flat


_INT_OF: dict[Any, Any] = {True: 1, False: 0}
"""A boolean as stored, 0/1 (anything else is bound as it is). Bound as it is, a bool takes
sqlite3's slow adapter path."""


LOW_SPACE = 1 << 20
"""Less free space than this in the store's folder counts as a full disk."""


def disk_full(path: Path) -> bool:
    """True when the disk that holds ``path`` (or would) has less than :data:`LOW_SPACE` free.

    SQLite does not always say so: a full disk can surface as "disk I/O error" when the
    shared-memory file of a WAL database cannot grow.
    """
    folder = next((p for p in path.parents if p.is_dir()), None)
    if folder is None:
        return False
    try:
        return shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        return False


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is open, never masking the error that brought us here.

    SQLite rolls a transaction back by itself on some errors ("database or disk is full"),
    and a ROLLBACK after that fails with "no transaction is active", hiding the real cause.
    """
    if conn.in_transaction:
        with suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None,
                           check_same_thread=False)
    # Switching a new file to WAL takes an exclusive lock and, unlike ordinary statements,
    # can fail with "database is locked" at once (no busy wait) while another process does
    # the same: retry it for as long as the busy timeout would have waited.
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    delay = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                conn.close()
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; return the version found before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if found > SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {found} is newer than this closedloop supports "
                f"({SCHEMA_VERSION}); upgrade closedloop"
            )
        for version in range(found, SCHEMA_VERSION):
            for statement in MIGRATIONS[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    return found


class SQLiteBackend:
    """Events in one SQLite file; created (with its folder) and migrated when opened.

    With ``defer=True`` a file that cannot be opened yet (full disk, read-only folder) is not
    an error here: :attr:`open_error` says why, and every ``write_batch`` tries again (and
    raises while it still fails), so the store's writer holds the events until it opens.

    The same file keeps the store's spans and scores (:meth:`span_store`) and its pauses and
    halts (:meth:`control_ledger`).
    """

    def __init__(self, path: str | os.PathLike[str], *, defer: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.url = f"sqlite:///{self.path}"
        self._local = threading.local()
        self._spans: SQLiteSpanStore | None = None
        self._spans_lock = threading.Lock()
        self.open_error: StoreError | None = None
        try:
            self._open()
        except StoreError as exc:
            if not defer:
                raise
            self.open_error = exc

    def _open(self) -> None:
        try:
            blocker = next((p for p in self.path.parents if p.exists()), None)
            if blocker is not None and not blocker.is_dir():
                raise StoreError(f"cannot open store {self.url}: {blocker} is a file, not a "
                                 "folder")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path)
            try:
                self.found_version = migrate(conn)
            finally:
                conn.close()
        except OSError as exc:
            raise StoreError(f"cannot open store {self.url}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            full = " (no space left on the disk)" if disk_full(self.path) else ""
            raise StoreError(f"cannot open store {self.url}: {exc}{full}") from None
        self.open_error = None

    def _writer_conn(self) -> sqlite3.Connection:
        if self.open_error is not None:
            self._open()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = _connect(self.path)
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """Insert the batch in one transaction; on failure the real error is raised."""
        conn = self._writer_conn()
        insert, params = _params(events)
        width, start = insert.width, 0
        try:
            conn.execute("BEGIN IMMEDIATE")
            for rows in statement_sizes(len(events)):
                end = start + rows * width
                conn.execute(insert.statement(rows), params[start:end])
                start = end
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)
            self.close()  # the next batch starts on a fresh connection
            raise

    def iter_events(self, query: EventQuery) -> Iterator[StepEvent]:
        """Events matching ``query``, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        if query.since is not None:
            where.append("ts >= ?")
            params.append(query.since)
        if query.until is not None:
            where.append("ts < ?")
            params.append(query.until)
        if query.task_type is not None:
            where.append("task_type = ?")
            params.append(query.task_type)
        if query.trace_id is not None:
            where.append("trace_id = ?")
            params.append(query.trace_id)
        if query.run_id is not None:
            where.append("run_id = ?")
            params.append(query.run_id)
        sql = self._select + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY ts"
        if query.limit is not None:
            sql += f" LIMIT {int(query.limit)}"
        try:
            conn = self._reader()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {exc}") from None
        try:
            for row in conn.execute(sql, params):
                yield _event(row)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {exc}") from None
        finally:
            conn.close()

    def summarize(self, where: StepFilter, *, top_messages: int) -> EventSummary | None:
        """The figures of the steps matching ``where``, in SQL (the query port)."""
        from closedloop.store.sqlite._query import summarize

        return summarize(self, where, top_messages=top_messages)

    def list_steps(self, where: StepFilter, *, limit: int,
                   cursor: str | None = None) -> StepPage:
        """A page of steps matching ``where``, newest first (the query port)."""
        from closedloop.store.sqlite._query import list_steps

        return list_steps(self, where, limit=limit, cursor=cursor)

    def list_steps_after(self, where: StepFilter, *, limit: int,
                         cursor: str | None = None) -> StepPage:
        """The steps matching ``where`` past ``cursor``, oldest first (the query port)."""
        from closedloop.store.sqlite._query import list_steps

        return list_steps(self, where, limit=limit, cursor=cursor, after=True)

    def task_types(self) -> list[str]:
        """Every task type with a stored step, sorted (the query port)."""
        from closedloop.store.sqlite._query import task_types

        return task_types(self)

    # ----- the learning layer's aggregations (closedloop.store._learn) ---------------------
    def series(self, where: StepFilter, *, by: Dimension, window: str
               ) -> list[SeriesCell] | None:
        """Per value of ``by`` and period, the series' figures (in SQL)."""
        from closedloop.store.sqlite._learn import series

        return series(self, where, by=by, window=window)

    def factor_counts(self, where: StepFilter) -> list[FactorCell] | None:
        """Steps and failures per combination of factor values (in SQL)."""
        from closedloop.store.sqlite._learn import factor_counts

        return factor_counts(self, where)

    def fold_rollups(self) -> int:
        """Bring the learning roll-ups up to date (see :class:`~closedloop.store.
        RollupKeeper`); how many were folded."""
        from closedloop.store.sqlite._learn import fold_rollups

        return fold_rollups(self) + self._fold_evidence()

    def _fold_evidence(self) -> int:
        """Fold the new steps into the evidence roll-up (:mod:`closedloop.store.sqlite.
        _evidence`): 1 when it did."""
        from closedloop.store.sqlite._evidence import refresh

        with self._maintenance("update the evidence roll-up of") as conn:
            return int(refresh(conn))

    def factor_margins(self, where: StepFilter) -> FactorMargins | None:
        """Steps and failures per value of each factor alone (from the roll-up)."""
        from closedloop.store.sqlite._learn import factor_margins

        return factor_margins(self, where)

    def failure_counts(self, where: StepFilter, *, window: str) -> list[FailureCell] | None:
        """Failed steps per group, task type, model and period (in SQL)."""
        from closedloop.store.sqlite._learn import failure_counts

        return failure_counts(self, where, window=window)

    def failure_examples(self, where: StepFilter, keys: Sequence[ExampleKey], *,
                         per_key: int) -> dict[ExampleKey, list[tuple[float, str]]] | None:
        """The newest trace ids of each key's failed steps (in SQL)."""
        from closedloop.store.sqlite._learn import failure_examples

        return failure_examples(self, where, keys, per_key=per_key)

    def period_steps(self, where: StepFilter, *, window: str) -> dict[int, int] | None:
        """Steps per period (in SQL)."""
        from closedloop.store.sqlite._learn import period_steps

        return period_steps(self, where, window=window)

    read_only = False
    """True for a :class:`SQLiteReader`: this backend never writes its file."""
    _select = _SELECT

    def _reader(self) -> sqlite3.Connection:
        return _connect(self.path)

    def count(self) -> int:
        """How many events the file holds."""
        try:
            conn = self._reader()
            try:
                return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {exc}") from None

    def close(self) -> None:
        """Close this thread's writer connection, if any."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def span_store(self) -> SQLiteSpanStore:
        """The spans and scores in this file (the span/score port); one for the backend's
        life, read-only when the backend is."""
        from closedloop.store.sqlite._spans import SQLiteSpanStore

        with self._spans_lock:
            if self._spans is None:
                self._spans = SQLiteSpanStore(self)
            return self._spans

    def run_store(self) -> SQLiteRunStore:
        """The run records in this file (the run port)."""
        from closedloop.store.sqlite._runs import SQLiteRunStore

        return SQLiteRunStore(self)

    def approval_store(self) -> SQLiteApprovals:
        """The approval requests in this file (the approval port)."""
        from closedloop.store.sqlite._approvals import SQLiteApprovals

        return SQLiteApprovals(self)

    def control_ledger(self) -> SQLiteLedger:
        """The pauses and halts in this file (the control-state port); fails closed."""
        from closedloop.store.sqlite._ledger import SQLiteLedger

        return SQLiteLedger(self.path)

    def level_store(self) -> SQLiteLevelStore:
        """The autonomy levels, their audit trail, feedback and detector states in this file
        (the level-store port); fails closed."""
        from closedloop.store.sqlite._autonomy import SQLiteLevelStore

        found: SQLiteLevelStore | None = getattr(self, "_level_store", None)
        if found is None:  # one for the backend's life: it throttles its folds
            found = self._level_store = SQLiteLevelStore(self.path, fold=not self.read_only)
        return found

    # ----- maintenance: the port of closedloop.store._retention ----------------------------
    def info(self) -> StoreInfo:
        """Counts, size on disk, schema version, oldest and newest event; never writes."""
        try:
            conn = self._reader()
            try:
                return _info(conn, self.url, self.path)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {exc}") from None

    def prune_events(self, before: float, *, limit: int | None = None,
                     dry_run: bool = False) -> EventsPruned:
        """Delete events older than ``before`` in transactions of :data:`BATCH` rows (writers
        of other processes get the lock between them); at most about ``limit`` rows."""
        older = "SELECT rowid FROM events WHERE ts < ?"
        with self._maintenance("prune") as conn:
            if dry_run:
                return EventsPruned(events=conn.execute(f"SELECT count(*) FROM ({older})",
                                                  (before,)).fetchone()[0])
            done = 0
            while limit is None or done < limit:
                size = BATCH if limit is None else min(BATCH, limit - done)
                conn.execute("BEGIN IMMEDIATE")
                n = conn.execute(f"DELETE FROM events WHERE rowid IN ({older} LIMIT ?)",
                                 (before, size)).rowcount
                rollup_pruned(conn, before)  # the learning roll-up, in the same transaction
                evidence_pruned(conn, before)  # and the evidence roll-up
                conn.execute("COMMIT")
                done += n
                if n < size:
                    return EventsPruned(events=done)
            more = conn.execute(f"{older} LIMIT 1", (before,)).fetchone() is not None
            return EventsPruned(events=done, more=more)

    def prune_control(self, before: float, *, now: float, dry_run: bool = False) -> int:
        """Delete control history, snapshots and expired pauses older than ``before``; never a
        stop active at ``now`` or the history record of its start."""
        args = {"before": before, "now": now}
        with self._maintenance("prune") as conn:
            if "control_stops" not in _tables(conn):  # the ledger has never written here
                return 0
            clauses = [(table, where.replace("%(before)s", ":before")
                        .replace("%(now)s", ":now").format(s=""))
                       for table, where in CONTROL_PRUNE]
            if dry_run:
                return sum(conn.execute(f"SELECT count(*) FROM {table} WHERE {where}",
                                        args).fetchone()[0] for table, where in clauses)
            conn.execute("BEGIN IMMEDIATE")
            removed = sum(conn.execute(f"DELETE FROM {table} WHERE {where}", args).rowcount
                          for table, where in clauses)
            conn.execute("COMMIT")
            return removed

    def prune_records(self, before: float, *, dry_run: bool = False) -> dict[str, int]:
        """Delete settled approval requests and their history, autonomy audit and feedback,
        and runs older than ``before`` (the rules of
        :data:`~closedloop.store._retention.RECORD_PRUNE`), in one transaction."""
        args = {"before": before}
        with self._maintenance("prune") as conn:
            tables = _tables(conn)
            clauses = [(table, where) for table, where in record_clauses("", named=":before")
                       if table in tables]
            if dry_run:
                return {table: int(conn.execute(f"SELECT count(*) FROM {table} WHERE {where}",
                                                args).fetchone()[0])
                        for table, where in clauses}
            conn.execute("BEGIN IMMEDIATE")
            removed = {table: conn.execute(f"DELETE FROM {table} WHERE {where}", args).rowcount
                       for table, where in clauses}
            conn.execute("COMMIT")
            return removed

    @contextmanager
    def _maintenance(self, what: str) -> Iterator[sqlite3.Connection]:
        """A connection of its own for a maintenance task, errors as one-line StoreErrors."""
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot {what} store {self.url}: {exc}") from None
        try:
            yield conn
        except sqlite3.Error as exc:
            rollback(conn)
            raise StoreError(f"cannot {what} store {self.url}: {exc}") from None
        finally:
            conn.close()


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that can never write ``path``: no migration, no table, no journal change.

    On a read-only mount a WAL file cannot get its shared-memory index, so SQLite refuses
    ``mode=ro``; the file is then opened ``immutable`` (no locking: nothing can write it
    there, and changes still in an unmerged ``-wal`` file are not seen).
    """
    uri = f"file:{quote(str(path))}"
    try:
        conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=_BUSY_TIMEOUT_S,
                               isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA user_version").fetchone()  # opening is lazy: read something
    except sqlite3.OperationalError:
        if os.access(path.parent, os.W_OK):
            raise
        conn = sqlite3.connect(f"{uri}?immutable=1", uri=True, isolation_level=None,
                               check_same_thread=False)
    return conn


def check_schema(conn: sqlite3.Connection, url: str) -> int:
    """The schema version of a closedloop store; a :class:`StoreError` for any other file."""
    found = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if found > SCHEMA_VERSION:
        raise StoreError(f"store schema version {found} is newer than this closedloop supports "
                         f"({SCHEMA_VERSION}); upgrade closedloop")
    tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' "
                          "AND name = 'events'").fetchone()[0]
    if found == 0 or not tables:
        raise StoreError(f"{url} is not a closedloop store (it has no closedloop tables)")
    return found


class SQLiteReader(SQLiteBackend):
    """An existing closedloop store, opened to read only (``closedloop report``, ``traces``).

    Nothing is created, migrated or written; a file without closedloop's tables is a
    :class:`StoreError`, and a store on a read-only mount can be read.
    """

    read_only = True

    def __init__(self, path: str | os.PathLike[str]) -> None:  # no migration: no super()
        self.path = Path(path).expanduser()
        self.url = f"sqlite:///{self.path}"
        self._local = threading.local()
        self._spans = None
        self._spans_lock = threading.Lock()
        try:
            conn = connect_read_only(self.path)
            try:
                if check_schema(conn, self.url) < SCHEMA_VERSION:
                    self._select = _select_from(conn)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}") from None

    def _reader(self) -> sqlite3.Connection:
        return connect_read_only(self.path)

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """Always a :class:`StoreError`: this store was opened read-only."""
        raise StoreError(f"store {self.url} was opened read-only")


def _select_from(conn: sqlite3.Connection) -> str:
    """The events query of a store of an older schema, read as it is (a reader migrates
    nothing): the columns it does not have yet read as NULL."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    return f"SELECT {', '.join(f if f in have else f'NULL AS {f}' for f in EVENT_FIELDS)} " \
           "FROM events"


def _event(row: tuple[Any, ...]) -> StepEvent:
    values = list(row)
    for i in _BOOLS:
        if values[i] is not None:
            values[i] = bool(values[i])
    for i in JSON_COLUMNS:
        if values[i] is not None:
            values[i] = json.loads(values[i])
    return StepEvent(*values)


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _info(conn: sqlite3.Connection, url: str, path: Path) -> StoreInfo:
    """What the file holds (see :class:`~closedloop.store._retention.StoreInfo`)."""
    tables = _tables(conn)

    def one(sql: str, *args: Any) -> Any:
        return conn.execute(sql, args).fetchone()[0]

    def count(table: str) -> int | None:
        return int(one(f"SELECT count(*) FROM {table}")) if table in tables else None

    stops = halts = history = 0
    if "control_stops" in tables:  # created by the control ledger on its first write
        stops, halts = conn.execute(
            "SELECT count(*), coalesce(sum(kind = 'halted'), 0) FROM control_stops "
            "WHERE until IS NULL OR until > ?", (time.time(),)).fetchone()
        history = count("control_history") or 0
    events = "events" in tables
    # one aggregate per query: SQLite answers a lone min() or max() from the ts index
    oldest = one("SELECT min(ts) FROM events") if events else None
    newest = one("SELECT max(ts) FROM events") if events else None
    files = (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm"))
    return StoreInfo(
        backend="sqlite", url=url, schema_version=int(one("PRAGMA user_version")),
        latest_version=SCHEMA_VERSION, events=count("events") or 0, oldest_event=oldest,
        newest_event=newest, spans=count("spans"), scores=count("scores"),
        control_stops=int(stops), control_halts=int(halts), control_history=int(history),
        size_bytes=sum(f.stat().st_size for f in files if f.exists()),
        records={t: int(one(f"SELECT count(*) FROM {t}")) for t in RECORD_TABLES if t in tables},
        free_bytes=int(one("PRAGMA freelist_count")) * int(one("PRAGMA page_size")))
