"""The query port (:class:`~closedloop.store.EventQueries`) of the SQLite backend.

SQLite groups rows by sorting them unless they arrive in order (it has no hash aggregation;
sorting a million rows costs seconds): every grouped query of a summary reads an index of
migration 5 whose leading columns are its GROUP BY, and that holds every column it needs —
``events_report`` for counts and sums, ``events_latency`` for the latency histogram and each
task type's first and last step, ``events_groups`` for failure-message groups. Those scans
read the whole index whatever the time window; a window holding less than 1/8 of the rows
(the time index counts them) is read through ``events_ts`` instead, sorting only its rows.
All queries of one summary run in one read transaction (one snapshot). A store whose schema
predates migration 5 (opened read-only, so not migrated) has no summary here: the caller
makes the Python pass.

A step listing walks ``events_ts`` backwards (ties by rowid), filtering as it goes: a page
of a rare task type or outcome reads back until it has its steps (a time window bounds that).
A listing filtered by model or label (neither is indexed) first asks the hourly roll-up of
that dimension (:mod:`closedloop.store.sqlite._rollup`, started and kept up as the learning
queries keep it) which hours hold such steps, adds the hours of the matching rows it does not
cover yet (read by rowid) and everything below its floor, and walks only those time ranges,
newest first, in the same keyset order: the same page as the walk over every row, and a
model or label no step has answers at once.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from closedloop._errors import StoreError
from closedloop.store._query import (
    EventSummary,
    StepFilter,
    StepPage,
    check_limit,
    decode_cursor,
    exact_hour,
    page,
    page_after,
    rolled_dim,
    task_types_sql,
)
from closedloop.store._sqlsummary import summarize as assemble
from closedloop.store.sqlite import _rollup
from closedloop.store.sqlite._backend import LATENCY_BUCKET, _event

if TYPE_CHECKING:
    from closedloop.store.sqlite._backend import SQLiteBackend

SUMMARY_INDEXES = frozenset({"events_report", "events_latency", "events_groups",
                             "events_ungrouped"})
_MMAP_BYTES = 256 << 20
_CACHE_KIB = 64 << 10
_NARROW = 8
"""A window with fewer than 1/_NARROW of the rows is read through the time index."""
_GROUP_COLUMNS = ("task_type, outcome, error_type, validation_passed, verification_passed, "
                  "attempts")


def _terms(where: StepFilter) -> tuple[list[str], list[Any]]:
    columns = where.columns()
    terms = [f"{column} {op} ?" for column, op, _ in columns]
    params = [v for *_, v in columns]
    if where.label is not None:  # a label key is a name: no quote in it (check_labels)
        terms.append("json_extract(labels, ?) = ?")
        params += [f'$."{where.label[0]}"', where.label[1]]
    return terms, params


def _where(where: StepFilter, *extra: str) -> tuple[str, list[Any]]:
    found, params = _terms(where)
    terms = [*extra, *found]
    return (" WHERE " + " AND ".join(terms) if terms else ""), params


def _and(where: StepFilter) -> tuple[str, list[Any]]:
    """The filter's terms to append to a WHERE clause."""
    terms, params = _terms(where)
    return "".join(f" AND {t}" for t in terms), params


class _Source:
    """One summary's queries, on one connection inside one read transaction."""

    def __init__(self, conn: sqlite3.Connection, where: StepFilter,
                 narrow: bool | None = None) -> None:
        self.conn = conn
        self.where = where
        self.narrow = self._narrow() if narrow is None else narrow

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    def _narrow(self) -> bool:
        """True when the time window holds less than 1/_NARROW of the rows."""
        w = self.where
        if w.since is None and w.until is None:
            return False
        total = self._rows("SELECT count(*) FROM events INDEXED BY events_ts", ())[0][0]
        sql, params = _where(StepFilter(since=w.since, until=w.until))
        inside = self._rows(f"SELECT count(*) FROM events INDEXED BY events_ts{sql}",
                            params)[0][0]
        return bool(inside * _NARROW < total)

    def _index(self, summary_index: str) -> str:
        return f"INDEXED BY {'events_ts' if self.narrow else summary_index}"

    def groups(self) -> Iterable[Sequence[Any]]:
        sql, params = _where(self.where)
        return self._rows(
            f"SELECT {_GROUP_COLUMNS}, count(*), sum(input_tokens), sum(output_tokens), "
            "sum(latency_ms), sum(cached_input_tokens), sum(cost_usd), count(cost_usd) "
            f"FROM events {self._index('events_report')}{sql} "
            f"GROUP BY {_GROUP_COLUMNS}", params)

    def histogram(self) -> Iterable[Sequence[Any]]:
        # counts only: each min() or max() would cost a third of the scan again, where the
        # few bounds and times needed are a seek or a bucket's scan each (below)
        sql, params = _where(self.where)
        return [(*r, None, None, None, None) for r in self._rows(
            f"SELECT task_type, {LATENCY_BUCKET}, count(*) "
            f"FROM events {self._index('events_latency')}{sql} GROUP BY 1, 2", params)]

    # a bucket's rows of every time, filtered by the window: no table row is read
    def bucket_bounds(self, pairs: Sequence[tuple[str, Any]]
                      ) -> dict[tuple[str, Any], tuple[float, float]]:
        sql, params = _and(self.where)
        query = ("SELECT min(latency_ms), max(latency_ms) FROM events INDEXED BY "
                 f"events_latency WHERE task_type = ? AND {LATENCY_BUCKET} = ?{sql}")
        return {(t, b): tuple(self._rows(query, [t, b, *params])[0]) for t, b in pairs}

    def bucket_latencies(self, pairs: Sequence[tuple[str, Any]]
                         ) -> dict[tuple[str, Any], list[float]]:
        sql, params = _and(self.where)
        query = ("SELECT latency_ms FROM events INDEXED BY events_latency WHERE task_type = ? "
                 f"AND {LATENCY_BUCKET} = ?{sql}")
        return {(t, b): [r[0] for r in self._rows(query, [t, b, *params])] for t, b in pairs}

    def time_spans(self, buckets: dict[str, list[Any]]) -> dict[str, tuple[float, float]]:
        # within a bucket the index is in ts order: a first or last ts is one seek
        sql, params = _and(self.where)
        out = {}
        for task, found in buckets.items():
            ends = [self._rows(
                f"SELECT {end}(ts) FROM events INDEXED BY events_latency WHERE task_type = ? "
                f"AND {LATENCY_BUCKET} = ?{sql}", [task, bucket, *params])[0][0]
                for end in ("min", "max") for bucket in found]
            times = [t for t in ends if t is not None]
            out[task] = (min(times), max(times))
        return out

    def message_counts(self, top: int | None) -> Iterable[Sequence[Any]]:
        sql, params = _where(self.where, "error_group IS NOT NULL")
        # grouped in index order first, then NULL and "" error types merged (one key, "")
        grouped = (
            f"WITH g AS (SELECT task_type, coalesce(error_type, '') AS et, error_group AS eg, "
            f"count(*) AS n, max(ts) AS last FROM events {self._index('events_groups')}{sql} "
            "GROUP BY task_type, error_type, error_group), "
            "k AS (SELECT task_type, et, eg, sum(n) AS n, max(last) AS last FROM g "
            "GROUP BY task_type, et, eg) ")
        if top is None:
            return self._rows(grouped + "SELECT task_type, et, eg, n, last FROM k", params)
        return self._rows(
            grouped + "SELECT task_type, et, eg, n, last FROM (SELECT *, row_number() OVER "
            "(PARTITION BY task_type ORDER BY n DESC, et, eg) AS r FROM k) WHERE r <= ? "
            "UNION ALL SELECT NULL, et, eg, n, last FROM (SELECT et, eg, sum(n) AS n, "
            "max(last) AS last, row_number() OVER (ORDER BY sum(n) DESC, et, eg) AS r "
            "FROM k GROUP BY et, eg) WHERE r <= ?", [*params, top, top])

    def ungrouped_messages(self) -> Iterable[Sequence[Any]]:
        sql, params = _and(self.where)
        return self._rows(
            "SELECT task_type, error_type, error_message, ts FROM events INDEXED BY "
            "events_ungrouped WHERE error_group IS NULL AND error_message <> ''" + sql, params)

    def examples(self, keys: Sequence[tuple[str, str, str]]
                 ) -> dict[tuple[str, str, str], tuple[float, str]]:
        sql, params = _and(self.where)
        out = {}
        for task, error_type, group in keys:
            kind = "error_type = ?" if error_type else "(error_type IS NULL OR error_type = ?)"
            rows = self._rows(
                f"SELECT ts, error_message FROM events INDEXED BY events_groups WHERE "
                f"task_type = ? AND {kind} AND error_group = ?{sql} "
                "ORDER BY ts DESC, rowid DESC LIMIT 1", [task, error_type, group, *params])
            if rows:
                out[task, error_type, group] = (rows[0][0], rows[0][1])
        return out


def _read(backend: SQLiteBackend) -> sqlite3.Connection:
    conn = backend._reader()
    # a summary reads whole indexes: map the file rather than copy each page through read()
    conn.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
    conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
    return conn


def summarize(backend: SQLiteBackend, where: StepFilter, *,
              top_messages: int) -> EventSummary | None:
    """The summary of ``where`` in SQL; ``None`` when the schema predates migration 5.

    Two connections read at once (SQLite runs each query without holding the GIL): the
    latency figures on the second (see :func:`closedloop.store._sqlsummary.summarize`).
    """
    try:
        conn = _read(backend)
        other = None
        try:
            conn.execute("BEGIN")
            indexes = {r[1] for r in conn.execute("PRAGMA index_list(events)")}
            if not SUMMARY_INDEXES.issubset(indexes):
                return None
            source = _Source(conn, where)  # its first read fixes its snapshot
            other = _read(backend)
            other.execute("BEGIN")
            return assemble(source, top_messages=top_messages,
                            alongside=_Source(other, where, source.narrow))
        finally:
            conn.close()
            if other is not None:
                other.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {exc}") from None


def list_steps(backend: SQLiteBackend, where: StepFilter, *, limit: int,
               cursor: str | None, after: bool = False) -> StepPage:
    """Up to ``limit`` steps newest first (ties by rowid), after ``cursor`` (``[ts, rowid]``);
    with ``after``, the steps past ``cursor`` oldest first."""
    check_limit(limit)
    extra = []
    params: list[Any] = []
    if cursor is not None:
        ts, rowid = decode_cursor(cursor, int, backend.url)
        extra.append(f"(ts, rowid) {'>' if after else '<'} (?, ?)")
        params = [ts, rowid]
    dim = None if after else rolled_dim(where)
    if dim is not None and not backend.read_only:
        with backend._maintenance("update the roll-up of") as conn:
            _rollup.refresh(conn, dim[0])
    order = "ts, rowid" if after else "ts DESC, rowid DESC"
    # the backend's own column list: a store of an older schema, read as it is, has fewer
    # columns (the others read as NULL)
    select = backend._select.replace("SELECT ", "SELECT ts, rowid, ", 1)

    def walk(conn: sqlite3.Connection, *terms: str, values: Sequence[Any] = (),
             want: int = limit if after else limit + 1) -> list[Any]:
        sql, more = _where(where, *extra, *terms)
        return conn.execute(f"{select} INDEXED BY events_ts{sql} ORDER BY {order} LIMIT ?",
                            [*params, *values, *more, want]).fetchall()

    try:
        conn = backend._reader()
        try:
            ranges = None
            if dim is not None:
                conn.execute("BEGIN")  # one snapshot: the roll-up and the rows it points at
                ranges = _ranges(conn, where, *dim)
            if ranges is None:
                rows = walk(conn)
            else:
                rows = []
                for low, high in ranges:  # newest first, disjoint: the order is kept
                    if cursor is not None and low is not None and low > params[0]:
                        continue
                    terms, values = ["ts < ?"], [high]
                    if low is not None:
                        terms.append("ts >= ?")
                        values.append(low)
                    rows += walk(conn, *terms, values=values, want=limit + 1 - len(rows))
                    if len(rows) > limit:
                        break
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {exc}") from None
    found = [(r[0], r[1], _event(r[2:])) for r in rows]
    return page_after(found) if after else page(found, limit)


def _ranges(conn: sqlite3.Connection, where: StepFilter, dim: str, value: str
            ) -> list[tuple[float | None, float]] | None:
    """The time ranges ``[low, high)`` (``low`` None: unbounded), newest first, that hold
    every step of ``where``: the hours ``dim``'s roll-up has ``value`` in, the hours of the
    matching rows it does not cover yet, and all below its floor; None without a usable
    roll-up of ``dim``."""
    found = _rollup.state(conn, dim)
    if found is None or not found.usable:
        return None
    low = found.floor if where.since is None else max(found.floor, exact_hour(where.since))
    high = (1 << 40) if where.until is None else exact_hour(where.until) + 1
    task = " AND task_type = ?" if where.task_type is not None else ""
    hours = {r[0] for r in conn.execute(
        "SELECT DISTINCT hour FROM learn_rollup INDEXED BY learn_rollup_dim WHERE dim = ? "
        f"AND hour >= ? AND hour < ? AND value = ?{task}",
        [dim, low, high, value, *([where.task_type] if task else [])]).fetchall()}
    sql, params = _where(where, "rowid > ?")
    hours.update(h for r in conn.execute(f"SELECT ts FROM events{sql}",
                                         [found.covered, *params]).fetchall()
                 if (h := exact_hour(r[0])) >= found.floor)  # those below: the range below
    ranges: list[tuple[float | None, float]] = []
    for h in sorted(hours, reverse=True):
        if ranges and ranges[-1][0] == (h + 1) * 3600.0:
            ranges[-1] = (h * 3600.0, ranges[-1][1])
        else:
            ranges.append((h * 3600.0, (h + 1) * 3600.0))
    floor = found.floor * 3600.0
    if where.since is None or where.since < floor:
        if ranges and ranges[-1][0] == floor:
            ranges[-1] = (None, ranges[-1][1])
        else:
            ranges.append((None, floor))
    return ranges


def task_types(backend: SQLiteBackend) -> list[str]:
    """Every task type with a stored step, sorted: a loose scan of an index on task_type."""
    try:
        conn = backend._reader()
        try:
            return sorted(r[0] for r in conn.execute(task_types_sql("events")).fetchall())
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {exc}") from None
