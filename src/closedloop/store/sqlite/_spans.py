"""Spans and scores in a SQLite store's file: the span/score port of the SQLite backend.

Spans and scores sit next to the step events (migration 2 of :mod:`closedloop.store.sqlite`),
so one file answers "what happened" (events), "why" (spans) and "how good was it" (scores),
offline. Each span batch also updates one summary row per trace (``traces``, migration 3) in
the same transaction, so that listing traces reads a page of an index, newest first, instead
of grouping every span.

Telemetry side of the store: a batch that cannot be written raises the real error (the span
pipeline drops and counts it); reads raise :class:`~closedloop.StoreError`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from closedloop._errors import StoreError
from closedloop._spans import (
    RELABEL,
    SCORE_COLUMNS,
    SPAN_COLUMNS,
    SPANS_PAGE,
    Pruned,
    Score,
    StoredSpan,
    TaskScores,
    TracePage,
    TraceSummary,
    decode_cursor,
    fold_scores,
    page_of,
    rollup,
)
from closedloop.store.sqlite._backend import (
    SQLiteBackend,
    SQLiteReader,
    _connect,
    connect_read_only,
    rollback,
)

_SPANS = ", ".join(SPAN_COLUMNS)
_INSERT_SPANS = f"INSERT INTO spans ({_SPANS}) VALUES ({', '.join('?' * len(SPAN_COLUMNS))})"
_MERGE_TRACE = """
INSERT INTO traces (trace_id, start_ns, end_ns, spans, label_ns, task_type, outcome)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (trace_id) DO UPDATE SET
    start_ns = min(start_ns, excluded.start_ns),
    end_ns = max(end_ns, excluded.end_ns),
    spans = spans + excluded.spans,
    task_type = CASE WHEN {relabel} THEN excluded.task_type ELSE task_type END,
    outcome = CASE WHEN {relabel} THEN excluded.outcome ELSE outcome END,
    label_ns = CASE WHEN {relabel} THEN excluded.label_ns ELSE label_ns END
""".format(relabel=RELABEL.format(new="excluded", old="traces"))
_SCORES = ", ".join(SCORE_COLUMNS)
_PRUNE_CHUNK = 50_000
"""Rows deleted per transaction by :meth:`SQLiteSpanStore.prune`, so writers wait little."""


class SQLiteSpanStore:
    """Spans and scores in a SQLite store's file (tables from migrations 2 and 3).

    Built on the store's backend (:meth:`SQLiteBackend.span_store`), or on a path:
    ``read_only`` reads an existing store without ever writing it (the CLI's readers);
    ``defer`` (the span store of a store that could not be opened yet): a file that cannot be
    opened now is not an error here, writes fail (counted by the pipeline) until it opens.
    """

    def __init__(self, source: str | os.PathLike[str] | SQLiteBackend, *,
                 read_only: bool = False, defer: bool = False) -> None:
        if isinstance(source, SQLiteBackend):
            self._backend = source
        else:  # creates and migrates the file if needed; read-only, checks it is a store
            self._backend = SQLiteReader(source) if read_only else SQLiteBackend(source,
                                                                                 defer=defer)
        self.path: Path = self._backend.path
        self.read_only = self._backend.read_only
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"SQLiteSpanStore({str(self.path)!r})"

    def _conn(self) -> sqlite3.Connection:
        if not self.read_only:
            # the backend's connection for this thread (it opens a deferred store, and a
            # forked child opens its own)
            return self._backend._writer_conn()
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = connect_read_only(self.path)
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    def _writable(self) -> sqlite3.Connection:
        if self.read_only:
            raise StoreError(f"store {self._backend.url} was opened read-only")
        return self._conn()

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read spans from {self.path}: {exc}") from None

    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        """Insert the batch and update its traces' summaries, in one transaction."""
        if not spans:
            return
        conn = self._writable()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT_SPANS, [s.to_row() for s in spans])
            conn.executemany(_MERGE_TRACE, [r.to_row() for r in rollup(spans)])
            conn.execute("COMMIT")
        except BaseException:
            rollback(conn)  # never masks the real error ("database or disk is full")
            raise

    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every span of one trace, by start time."""
        rows = self._query(f"SELECT {_SPANS} FROM spans WHERE trace_id = ? "
                           "ORDER BY start_ns, rowid", (trace_id.strip().lower(),))
        return [StoredSpan.from_row(r) for r in rows]

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None, cursor: str | None = None) -> TracePage:
        """Traces newest first, one page of the ``traces`` summary's index."""
        where: list[str] = []
        params: list[Any] = []
        if task_type is not None:
            where.append("task_type = ?")
            params.append(task_type)
        if since_ns is not None:
            where.append("start_ns >= ?")
            params.append(since_ns)
        if cursor is not None:
            where.append("(start_ns, trace_id) < (?, ?)")
            params.extend(decode_cursor(cursor))
        limit = max(0, int(limit))
        rows = self._query(
            "SELECT trace_id, start_ns, end_ns, spans, task_type, outcome FROM traces"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY start_ns DESC, trace_id DESC LIMIT ?", [*params, limit + 1])
        return page_of([TraceSummary(trace_id=r[0], start_ns=r[1], end_ns=r[2], spans=r[3],
                                     task_type=r[4], outcome=r[5]) for r in rows], limit)

    def add_score(self, score: Score) -> None:
        """Insert one score."""
        try:
            self._writable().execute(
                f"INSERT INTO scores ({_SCORES}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                score.to_row())
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write score to {self.path}: {exc}") from None

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        """Scores, oldest first."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("trace_id", trace_id), ("name", name)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        sql = f"SELECT {_SCORES} FROM scores" + (" WHERE " + " AND ".join(where) if where
                                                  else "")
        return [Score.from_row(r) for r in self._query(sql + " ORDER BY ts, rowid", params)]

    def score_summary(self, *, since: float | None = None,
                      until: float | None = None) -> list[TaskScores]:
        """Per task type with scores, aggregated in SQL: the scores joined to the task type of
        their trace's latest step in the period (one pass over the period's events, as they
        have no index by trace), then those task types' steps."""
        period, params = _period(since, until)
        if not self._query(f"SELECT 1 FROM scores{_where(period)} LIMIT 1", params):
            return []  # no score in the period: no pass over the events
        # SQLite: a bare column next to max() comes from the row holding the maximum
        groups = self._query(
            f"WITH s AS (SELECT trace_id, name, value, label, ts FROM scores{_where(period)}), "
            "t AS (SELECT trace_id, task_type, max(ts) FROM events WHERE "
            + " AND ".join([*period, "trace_id IN (SELECT trace_id FROM s)"])
            + " GROUP BY trace_id) "
            "SELECT t.task_type, s.name, strftime('%Y-%m-%d', s.ts, 'unixepoch'), s.label, "
            "count(s.value), sum(s.value), count(*) FROM s JOIN t ON t.trace_id = s.trace_id "
            "GROUP BY 1, 2, 3, 4", [*params, *params])
        tasks = sorted({g[0] for g in groups})
        if not tasks:
            return []
        steps = self._query(
            "SELECT task_type, count(*), sum(outcome = 'succeeded') FROM events WHERE "
            + " AND ".join([*period, f"task_type IN ({', '.join('?' * len(tasks))})"])
            + " GROUP BY task_type", [*params, *tasks])
        return fold_scores(steps, groups)

    def spans_since(self, cursor: int, *, limit: int = SPANS_PAGE
                    ) -> tuple[list[StoredSpan], int]:
        """Spans with a rowid above ``cursor``, and the highest rowid read."""
        rows = self._query(f"SELECT rowid, {_SPANS} FROM spans WHERE rowid > ? "
                           "ORDER BY rowid LIMIT ?", (cursor, max(1, int(limit))))
        if not rows:
            return [], cursor
        return [StoredSpan.from_row(r[1:]) for r in rows], int(rows[-1][0])

    def span_cursor(self) -> int:
        """The highest rowid of ``spans`` (0 when empty)."""
        return int(self._query("SELECT coalesce(max(rowid), 0) FROM spans")[0][0])

    def prune(self, before: float) -> Pruned:
        """Delete spans, traces and scores older than ``before``, a chunk per transaction."""
        # maintenance, like the events' prune: a connection of its own, which writes even when
        # the store was opened to read (``closedloop store prune`` never migrates it), and a
        # store of an older schema may lack some of the tables: nothing of theirs to prune
        try:
            conn = _connect(self.path)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot prune store {self._backend.url}: {exc}") from None
        try:
            return self._prune(conn, before)
        except sqlite3.Error as exc:
            rollback(conn)
            raise StoreError(f"cannot prune store {self._backend.url}: {exc}") from None
        finally:
            conn.close()

    def _prune(self, conn: sqlite3.Connection, before: float) -> Pruned:
        cut_ns = int(before * 1e9)
        have = {row[0] for row in
                conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        counts = []
        for table, column, cut in (("spans", "start_ns", cut_ns), ("traces", "start_ns", cut_ns),
                                   ("scores", "ts", before)):
            key = "trace_id" if table == "traces" else "rowid"
            removed = 0
            if table not in have:
                counts.append(removed)
                continue
            while True:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    n = conn.execute(f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM "
                                     f"{table} WHERE {column} < ? LIMIT {_PRUNE_CHUNK})",
                                     (cut,)).rowcount
                    conn.execute("COMMIT")
                except BaseException:
                    rollback(conn)
                    raise
                removed += n
                if n < _PRUNE_CHUNK:
                    break
            counts.append(removed)
        return Pruned(spans=counts[0], traces=counts[1], scores=counts[2])

    def close(self) -> None:
        """Close this thread's connection."""
        if not self.read_only:
            self._backend.close()
            return
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _period(since: float | None, until: float | None) -> tuple[list[str], list[float]]:
    where: list[str] = []
    params: list[float] = []
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if until is not None:
        where.append("ts < ?")
        params.append(until)
    return where, params


def _where(conditions: list[str]) -> str:
    return " WHERE " + " AND ".join(conditions) if conditions else ""
