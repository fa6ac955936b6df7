"""Pauses and halts in a SQLite store's file: the control-state port of the SQLite backend.

:meth:`SQLiteBackend.control_ledger <closedloop.store.SQLiteBackend.control_ledger>` gives
the store's :class:`SQLiteLedger`: small tables in the event store's own file
(``control_stops``, ``control_history`` and ``control_keys``), created with ``CREATE TABLE IF
NOT EXISTS`` on the first write. They are kept out of the event store's migrations on purpose:
control state is not an event, has its own life cycle, and this way works with any store
schema version (a store opened read-only still gets its stops).

Fails closed: every failure to read or write is :class:`~closedloop.ControlUnavailable`, and
the guard refuses. Reads never create the file or its tables.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

from closedloop._control_state import (
    Stop,
    _iso,
    _merge,
    history_entry,
    redacted,
    stop_from_row,
)
from closedloop._errors import ControlUnavailable
from closedloop._redact import redact_text
from closedloop.store.sqlite._backend import connect_read_only

_SCHEMA = """
CREATE TABLE IF NOT EXISTS control_stops (
    task_type TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    at REAL NOT NULL,
    until REAL,
    evidence TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS control_keys (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    at REAL NOT NULL,
    snapshot TEXT NOT NULL,
    PRIMARY KEY (source, key)
);
CREATE TABLE IF NOT EXISTS control_history (
    at REAL NOT NULL,
    event TEXT NOT NULL,
    task_type TEXT NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    evidence TEXT
);
"""


class SQLiteLedger:
    """Stops in a SQLite file (by default the event store's), shared by local processes.

    Opens a connection per call (control state is read about once a second per task type),
    so that a store that was unreadable for a while (disk full, no file descriptors) is used
    again as soon as it can be. Every failure is :class:`~closedloop.ControlUnavailable`.
    Reads never create the tables (a file that has none has no stops).
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser()
        self.clock = clock
        self._schema = False

    def __repr__(self) -> str:
        return f"SQLiteLedger({str(self.path)!r})"

    def _conn(self, *, write: bool) -> closing[sqlite3.Connection]:
        if write and not self._schema:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        if write:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        else:  # a read never writes the file, so it also works on a read-only mount
            conn = connect_read_only(self.path)
        try:
            if write and not self._schema:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                self._schema = True
        except BaseException:
            conn.close()
            raise
        return closing(conn)

    def _fail(self, what: str, exc: BaseException) -> ControlUnavailable:
        return ControlUnavailable(f"cannot {what} control state in {self.path}: {exc}")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            if not self._schema and not self.path.exists():
                return []  # no file yet: nothing was ever stopped here
            with self._conn(write=False) as conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.OperationalError as exc:
            if str(exc).startswith("no such table"):
                return []
            raise self._fail("read", exc) from exc
        except (OSError, sqlite3.Error) as exc:
            raise self._fail("read", exc) from exc

    def _write(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            with self._conn(write=True) as conn:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    out = work(conn)
                    conn.execute("COMMIT")
                except BaseException:
                    # a failing ROLLBACK (disk full) must not mask the error that caused it
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                    raise
                return out
        except (OSError, sqlite3.Error) as exc:
            raise self._fail("write", exc) from exc

    def put(self, stop: Stop) -> None:
        """Record a pause or halt; a pause never replaces a halt in force."""
        stop = redacted(stop)

        def work(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT * FROM control_stops WHERE task_type = ?",
                               (stop.task_type,)).fetchone()
            if _merge(stop_from_row(row) if row else None, stop, self.clock()):
                conn.execute(
                    "INSERT OR REPLACE INTO control_stops VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (stop.task_type, stop.kind.value, stop.reason, stop.by, stop.at,
                     stop.until, json.dumps(stop.evidence, default=str)))
                conn.execute("INSERT INTO control_history VALUES (?, ?, ?, ?, ?, ?)",
                             (stop.at, stop.kind.value, stop.task_type, stop.reason,
                              stop.by, json.dumps(stop.evidence, default=str)))

        self._write(work)

    def get(self, task_type: str) -> Stop | None:
        """The stop in force for ``task_type`` (an expired pause is none)."""
        rows = self._read("SELECT * FROM control_stops WHERE task_type = ?", (task_type,))
        stop = stop_from_row(rows[0]) if rows else None
        return stop if stop is not None and stop.active(self.clock()) else None

    def lift(self, task_type: str, *, reason: str, by: str) -> Stop | None:
        """Remove the stop and record who lifted it and why; returns what was lifted."""
        reason = redact_text(reason)

        def work(conn: sqlite3.Connection) -> Stop | None:
            row = conn.execute("SELECT * FROM control_stops WHERE task_type = ?",
                               (task_type,)).fetchone()
            if row:
                conn.execute("DELETE FROM control_stops WHERE task_type = ?", (task_type,))
                conn.execute("INSERT INTO control_history VALUES (?, ?, ?, ?, ?, NULL)",
                             (self.clock(), "resumed", task_type, reason, by))
            return stop_from_row(row) if row else None

        if not self._schema and not self.path.exists():
            return None
        lifted: Stop | None = self._write(work)
        return lifted

    def stops(self) -> list[Stop]:
        """Every stop in force, by task type."""
        rows = self._read("SELECT * FROM control_stops ORDER BY task_type")
        now = self.clock()
        return [s for s in map(stop_from_row, rows) if s.active(now)]

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """Recent stops and resumes, newest first."""
        rows = self._read("SELECT * FROM control_history ORDER BY at DESC LIMIT ?",
                          (int(limit),))
        return [history_entry(r) for r in rows]

    def publish(self, source: str, keys: dict[str, dict[str, Any]]) -> None:
        """Store one process's per-key flow-control snapshot, for ``closedloop status``."""
        now = self.clock()
        self._write(lambda conn: conn.executemany(
            "INSERT OR REPLACE INTO control_keys VALUES (?, ?, ?, ?)",
            [(source, key, now, json.dumps(snap, default=str)) for key, snap in keys.items()]))

    def published(self, max_age: float = 300.0) -> dict[str, dict[str, Any]]:
        """Recent snapshots by ``key@source`` (older than ``max_age`` seconds are left out)."""
        rows = self._read("SELECT source, key, at, snapshot FROM control_keys "
                          "WHERE at >= ? ORDER BY key, source", (self.clock() - max_age,))
        return {f"{key}@{source}": {**json.loads(snap), "published": _iso(at)}
                for source, key, at, snap in rows}
