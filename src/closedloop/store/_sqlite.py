"""The embedded default backend: one SQLite file in WAL mode, schema versioned by migrations.

Several processes may write the same file: each batch is one ``BEGIN IMMEDIATE`` transaction
and SQLite's busy timeout serialises them. The schema version lives in ``PRAGMA
user_version``; migrations run in one exclusive transaction, so two processes opening a new
file at once cannot both apply them.

A batch is inserted with a few multi-row ``INSERT`` statements rather than ``executemany``:
sqlite3 releases the GIL around every statement step, and an agent busy in Python in the same
process makes each re-acquisition wait up to the switch interval; one step per thousand rows
instead of one per row keeps the writer ahead of a busy producer.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import suppress
from itertools import chain
from pathlib import Path
from typing import Any
from urllib.parse import quote

from closedloop._errors import StoreError
from closedloop._events import EVENT_FIELDS, StepEvent
from closedloop._figures import message_group
from closedloop.store._base import EventQuery
from closedloop.store._query import EventSummary, StepFilter, StepPage

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
    # 3: what `closedloop report` and `closedloop steps` ask (closedloop.store._sqlite_query):
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
)
SCHEMA_VERSION = len(MIGRATIONS)

_NFIELDS = len(EVENT_FIELDS)
_DETAIL = EVENT_FIELDS.index("detail")
_MESSAGE = EVENT_FIELDS.index("error_message")
_COLUMNS = (*EVENT_FIELDS, "error_group")
"""The stored columns: the event's, then what the writer derives from it."""
_WIDTH = len(_COLUMNS)
_ROW = f"({', '.join('?' for _ in _COLUMNS)})"
_INSERT_HEAD = f"INSERT INTO events ({', '.join(_COLUMNS)}) VALUES "
_CHUNK = 1024
"""Rows per multi-row INSERT (1024 * 20 parameters stays under SQLite's default 32766)."""
_SELECT = f"SELECT {', '.join(EVENT_FIELDS)} FROM events"
_BUSY_TIMEOUT_S = 30.0


def _insert(rows: int) -> str:
    return _INSERT_HEAD + ",".join([_ROW] * rows)


_INSERT_CHUNK = _insert(_CHUNK)


def _params(events: Sequence[StepEvent]) -> list[Any]:
    """The batch as one flat parameter list of :data:`_COLUMNS`, ``detail`` as JSON text,
    ``error_group`` from the message (C-speed where it can)."""
    flat: list[Any] = list(chain.from_iterable(events))
    details = flat[_DETAIL::_NFIELDS]
    if details.count(None) != len(details):
        flat[_DETAIL::_NFIELDS] = [
            None if d is None else json.dumps(d, default=str, separators=(",", ":"))
            for d in details]
    params: list[Any] = [None] * (len(events) * _WIDTH)
    for i in range(_NFIELDS):
        params[i::_WIDTH] = flat[i::_NFIELDS]
    messages = flat[_MESSAGE::_NFIELDS]
    if messages.count(None) != len(messages):
        params[_NFIELDS::_WIDTH] = [message_group(m) if m else None for m in messages]
    return params


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
    """

    def __init__(self, path: str | os.PathLike[str], *, defer: bool = False) -> None:
        self.path = Path(path).expanduser()
        self.url = f"sqlite:///{self.path}"
        self._local = threading.local()
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
                migrate(conn)
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
        params = _params(events)
        width = _CHUNK * _WIDTH
        full = len(events) // _CHUNK * width
        try:
            conn.execute("BEGIN IMMEDIATE")
            for start in range(0, full, width):
                conn.execute(_INSERT_CHUNK, params[start:start + width])
            if full < len(params):
                conn.execute(_insert(len(events) % _CHUNK), params[full:])
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
        sql = _SELECT + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY ts"
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
        from closedloop.store._sqlite_query import summarize

        return summarize(self, where, top_messages=top_messages)

    def list_steps(self, where: StepFilter, *, limit: int,
                   cursor: str | None = None) -> StepPage:
        """A page of steps matching ``where``, newest first (the query port)."""
        from closedloop.store._sqlite_query import list_steps

        return list_steps(self, where, limit=limit, cursor=cursor)

    read_only = False
    """True for a :class:`SQLiteReader`: this backend never writes its file."""

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
        try:
            conn = connect_read_only(self.path)
            try:
                check_schema(conn, self.url)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}") from None

    def _reader(self) -> sqlite3.Connection:
        return connect_read_only(self.path)

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """Always a :class:`StoreError`: this store was opened read-only."""
        raise StoreError(f"store {self.url} was opened read-only")


def _event(row: tuple[Any, ...]) -> StepEvent:
    values = list(row)
    for i in (10, 11):  # validation_passed, verification_passed
        if values[i] is not None:
            values[i] = bool(values[i])
    if values[18] is not None:
        values[18] = json.loads(values[18])
    return StepEvent(*values)
