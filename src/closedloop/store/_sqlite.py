"""The embedded default backend: one SQLite file in WAL mode, schema versioned by migrations.

Several processes may write the same file: each batch is one ``BEGIN IMMEDIATE`` transaction
and SQLite's busy timeout serialises them. The schema version lives in ``PRAGMA
user_version``; migrations run in one exclusive transaction, so two processes opening a new
file at once cannot both apply them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from closedloop._errors import StoreError
from closedloop._events import EVENT_FIELDS, StepEvent
from closedloop.store._base import EventQuery

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
)
SCHEMA_VERSION = len(MIGRATIONS)

_INSERT = (
    f"INSERT INTO events ({', '.join(EVENT_FIELDS)}) "
    f"VALUES ({', '.join('?' for _ in EVENT_FIELDS)})"
)
_SELECT = f"SELECT {', '.join(EVENT_FIELDS)} FROM events"
_BUSY_TIMEOUT_S = 30.0


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
        conn.execute("ROLLBACK")
        raise
    return found


class SQLiteBackend:
    """Events in one SQLite file; created (with its folder) and migrated when opened."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.url = f"sqlite:///{self.path}"
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = _connect(self.path)
            try:
                migrate(conn)
            finally:
                conn.close()
        except OSError as exc:
            raise StoreError(f"cannot open store {self.url}: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}") from None

    def _writer_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = _connect(self.path)
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """Insert the batch in one transaction."""
        conn = self._writer_conn()
        # Plain tuples: sqlite3's executemany takes a much slower path for tuple subclasses.
        rows = [e.to_row() for e in events]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
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

    read_only = False
    """True for a :class:`SQLiteReader`: this backend never writes its file."""

    def _reader(self) -> sqlite3.Connection:
        return _connect(self.path)

    def count(self) -> int:
        """How many events the file holds."""
        conn = _connect(self.path)
        try:
            return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            conn.close()

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

    def count(self) -> int:
        """How many events the file holds."""
        try:
            conn = connect_read_only(self.path)
            try:
                return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read store {self.url}: {exc}") from None

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
