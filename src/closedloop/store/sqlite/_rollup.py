"""An hourly roll-up of the events that trends read instead of every row (SQLite).

``learn_rollup`` holds, per exact UTC hour (``hour * 3600 <= ts < hour * 3600 + 3600``),
task type, *dimension* (``task_type``, ``model``, ``agent_version``, ``prompt_version``,
``label:KEY``), its value and latency bucket, the sums a :class:`~closedloop.store._learn.
SeriesCell` folds: one row per group of the events it covers. It covers exactly the events
whose rowid is at most ``learn_rollup_state.covered`` and whose hour is at least ``floor``;
a query adds up its rows for the whole hours inside its window, and reads from ``events``
what the roll-up does not cover: the rows written since (rowid above ``covered``, late
arrivals included), the partial hours at the window's edges and the hours below ``floor``.
So the result is the scan's, cell for cell (floating-point sums up to their last digits).
``learn_failures`` does the same for failure clusters: failed steps per hour, error type,
message group, task type and model, with their first and last time; ``learn_factors``
(:data:`FACTORS_TABLE`, made by the first writable query that needs it) for factors: per
hour and task type, the steps (refusals left out) and failures of each factor's value alone
(hour of day, input-size class, model, versions, and the labels as their JSON text, split in
Python as the scan does).

- **Kept up lazily, never by the writer**: ingest is unchanged. A query through a writable
  handle first folds the rows past ``covered`` in (:func:`refresh`, chunks of
  :data:`CHUNK` rows, each its own short write transaction), when there are at least
  :data:`REFRESH_ROWS` of them; a read-only handle uses what is there.
- **The periods of each window** are stored as the scan computes them (``ph``, ``pd``,
  ``pw``: the same truncating division of ``ts``), so a timestamp within a rounding error of
  a boundary lands where the scan puts it.
- **Retention** (:func:`pruned`, after each delete of ``prune_events``, in its
  transaction): raises ``floor`` past the hour of the cut-off and drops the roll-up below
  it, and moves ``covered`` down to the largest rowid left below it when its row was
  deleted (SQLite reuses rowids above the largest).
- **Checked before use**: ``covered`` is stored with that row's ``ts`` and trace id; a
  ``VACUUM`` that renumbered the rows makes them differ, and the roll-up is then ignored
  (and rebuilt by the next writable query).
- Rows of a label dimension exist only for steps that have the label: the steps without it
  (the value None) are the task type's row minus the label's rows.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from closedloop.store._learn import (
    FAILURE_OUTCOMES,
    REFUSAL_OUTCOMES,
    Dimension,
    factor_rows_sql,
    parse_dimension,
    whole_hours,
)
from closedloop.store._learn import latency_bucket_sql as _bucket_sql
from closedloop.store._learn import series_sums as _series_sums

VERSION = 2
"""The roll-up's layout; a store holding another is rebuilt by the next writable query (2:
the series dimensions have their days in ``learn_rollup_day`` too, :data:`DAYS_TABLE`)."""
CHUNK = 65_536
"""Rows folded in per write transaction."""
REFRESH_ROWS = 20_000
"""A writable query folds the new rows in when there are at least this many."""
FIRST_HOUR = 14 * 24
"""``floor`` of a new store: the first fortnight of 1970 is always read from the events
(there a period is not a function of the hour: truncation toward zero before the week's
offset)."""
SUMS = tuple(f"s{i}" for i in range(16))
"""The columns of :func:`~closedloop.store._learn.series_sums`, in order."""
PERIODS = {"hour": "ph", "day": "pd", "week": "pw"}
_FAILED = f"outcome IN ({', '.join(repr(o) for o in FAILURE_OUTCOMES)})"
REFUSED = f"outcome IN ({', '.join(repr(o) for o in REFUSAL_OUTCOMES)})"
_DIGITS = "CAST(input_tokens AS TEXT)"
SIZE = (f"(CASE WHEN input_tokens > 0 THEN length({_DIGITS}) * 10 + (CASE WHEN "
        f"substr({_DIGITS}, 1, 1) < '2' THEN 1 WHEN substr({_DIGITS}, 1, 1) < '5' THEN 2 "
        "ELSE 5 END) ELSE 0 END)")
""":func:`~closedloop.store._learn.size_code` in SQLite."""
_SUMS = _series_sums("outcome = 'succeeded'", _FAILED,
                     "validation_passed IS NOT NULL AND attempts > 1")
_BUCKET = _bucket_sql()
_HOUR = ("(CAST(ts / 3600.0 AS INTEGER) - (CAST(ts / 3600.0 AS INTEGER) * 3600.0 > ts) "
         "+ ((CAST(ts / 3600.0 AS INTEGER) + 1) * 3600.0 <= ts))")
"""The exact hour of ``ts`` (the division may round up to the next whole hour)."""

MIGRATION = f"""
    CREATE TABLE learn_rollup (
        hour INTEGER NOT NULL, ph INTEGER NOT NULL, pd INTEGER NOT NULL, pw INTEGER NOT NULL,
        task_type TEXT NOT NULL, dim TEXT NOT NULL, value TEXT, bucket INTEGER NOT NULL,
        {', '.join(f'{s} NUMERIC' for s in SUMS)}
    );
    CREATE INDEX learn_rollup_dim ON learn_rollup (dim, hour);
    CREATE TABLE learn_failures (
        hour INTEGER NOT NULL, ph INTEGER NOT NULL, pd INTEGER NOT NULL, pw INTEGER NOT NULL,
        error_type TEXT NOT NULL, error_group TEXT NOT NULL, task_type TEXT NOT NULL,
        model TEXT, n INTEGER NOT NULL, first_ts REAL NOT NULL, last_ts REAL NOT NULL
    );
    CREATE INDEX learn_failures_hour ON learn_failures (hour);
    CREATE TABLE learn_rollup_state (
        dim TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        covered INTEGER NOT NULL,
        covered_ts REAL,
        covered_trace TEXT,
        floor INTEGER NOT NULL
    )
    """
"""The SQLite migration that adds the roll-up (appended to the store's list)."""

FAILURES = "#failures"
"""The state's name of ``learn_failures``."""
FACTORS = "#factors"
"""The state's name of ``learn_factors``."""
FACTORS_TABLE = """
    CREATE TABLE IF NOT EXISTS learn_factors (
        hour INTEGER NOT NULL, task_type TEXT NOT NULL, dim TEXT NOT NULL, key TEXT NOT NULL,
        value TEXT, hod INTEGER NOT NULL, steps INTEGER NOT NULL, failures INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS learn_factors_hour ON learn_factors (hour)
    """
"""The factors' roll-up, made by the first writable query that needs it (stop 19: no
migration of its own): per exact hour and task type, the steps (refusals left out) and
failures of each factor's value alone (rows of
:func:`~closedloop.store._learn.margins_from_rows`)."""
_TABLES = {FAILURES: "learn_failures", FACTORS: "learn_factors"}
DAYS_TABLE = f"""
    CREATE TABLE IF NOT EXISTS learn_rollup_day (
        day INTEGER NOT NULL, pd INTEGER NOT NULL, pw INTEGER NOT NULL,
        task_type TEXT NOT NULL, dim TEXT NOT NULL, value TEXT, bucket INTEGER NOT NULL,
        {', '.join(f'{s} NUMERIC' for s in SUMS)}
    );
    CREATE INDEX IF NOT EXISTS learn_rollup_day_dim ON learn_rollup_day (dim, day)
    """
"""``learn_rollup``'s rows added up per exact UTC day (``hour / 24``), period and the rest of
the key, made by the first fold that needs it (no migration; a store of VERSION 1 is
rebuilt): a daily or weekly series reads its whole days from here (24 times fewer rows to
group: the overview over 30 days or all time), the hours at its edges from
``learn_rollup``. Each chunk of a fold adds up the hourly rows it inserted."""
_DAYS = (f"INSERT INTO learn_rollup_day (day, pd, pw, task_type, dim, value, bucket, "
         f"{', '.join(SUMS)}) SELECT hour / 24, pd, pw, task_type, dim, value, bucket, "
         f"{', '.join(f'sum({s})' for s in SUMS)} FROM learn_rollup WHERE rowid > ? AND "
         "dim = ? GROUP BY hour / 24, pd, pw, task_type, value, bucket")


def factor_select(terms: str) -> str:
    """The steps :func:`~closedloop.store._learn.factor_rows_sql` counts (its ``inner``),
    with the hour and task type first: ``terms`` is the FROM clause's rest (index and
    WHERE), refusals left out here."""
    where = f"{terms} AND NOT {REFUSED}" if "WHERE" in terms else f"{terms} WHERE NOT {REFUSED}"
    return (f"SELECT {_HOUR} AS hour, task_type, CASE WHEN {_FAILED} THEN 1 ELSE 0 END AS "
            f"failed, CAST(ts / 3600.0 AS INTEGER) % 24 AS hod, model, agent_version, "
            f"prompt_version, {SIZE} AS size, labels FROM events {where}")




@dataclass(frozen=True, slots=True)
class State:
    """What one dimension's roll-up covers: rowids up to ``covered``, hours from ``floor``
    (``usable`` False: ignore it)."""

    covered: int
    floor: int
    usable: bool


def state(conn: sqlite3.Connection, dim: str) -> State | None:
    """The roll-up's state of ``dim`` (None: this store has no roll-up, or none of
    ``dim``)."""
    try:
        row = conn.execute("SELECT version, covered, covered_ts, covered_trace, floor FROM "
                           "learn_rollup_state WHERE dim = ?", (dim,)).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise
    if row is None:
        return None
    version, covered, covered_ts, covered_trace, floor = row
    usable = version == VERSION
    if usable and covered:
        found = conn.execute("SELECT ts, trace_id FROM events WHERE rowid = ?",
                             (covered,)).fetchone()
        usable = found is not None and (found[0], found[1]) == (covered_ts, covered_trace)
    return State(covered=int(covered), floor=int(floor), usable=usable)


_PERIOD = {"ph": "CAST((ts - 0.0) / 3600.0 AS INTEGER)",
           "pd": "CAST((ts - 0.0) / 86400.0 AS INTEGER)",
           "pw": "CAST((ts - 345600.0) / 604800.0 AS INTEGER)"}
"""Each window's period of ``ts``, spelled as the scan spells it (``_period`` there)."""
_HEAD = f"{_HOUR}, {_PERIOD['ph']}, {_PERIOD['pd']}, {_PERIOD['pw']}"
_CHUNK_ROWS = "rowid > :low AND rowid <= :high AND ts >= :floor * 3600.0"
GROUPED_FAILURE = (f"{_FAILED} AND NOT (error_group IS NULL AND "
                   "coalesce(error_message, '') <> '')")
"""The failed steps whose message is grouped (or that have none): those the roll-up
counts; the others (stored before messages were grouped) are grouped when read."""


def _insert(dim: str) -> tuple[str, dict[str, Any]]:
    """The INSERT of one chunk's grouped rows of ``dim`` (params: low rowid, high rowid,
    floor, then the returned ones)."""
    if dim == FACTORS:
        return ("INSERT INTO learn_factors (hour, task_type, dim, key, value, hod, steps, "
                "failures) " + factor_rows_sql(factor_select(f"NOT INDEXED WHERE {_CHUNK_ROWS}"),
                                               head=("hour", "task_type"))), {}
    if dim == FAILURES:
        return ("INSERT INTO learn_failures (hour, ph, pd, pw, error_type, error_group, "
                f"task_type, model, n, first_ts, last_ts) SELECT {_HEAD}, coalesce(error_type, "
                "''), coalesce(error_group, ''), task_type, model, count(*), min(ts), max(ts) "
                f"FROM events NOT INDEXED WHERE {_CHUNK_ROWS} AND {GROUPED_FAILURE} "
                "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8"), {}
    by = parse_dimension(dim)
    value, params = (("json_extract(labels, :label)", {"label": f'$."{by.label}"'})
                     if by.column == "label" else (by.column, {}))
    return (f"INSERT INTO learn_rollup (hour, ph, pd, pw, task_type, dim, value, bucket, "
            f"{', '.join(SUMS)}) SELECT {_HEAD}, task_type, :dim, {value}, {_BUCKET}, {_SUMS} "
            f"FROM events NOT INDEXED WHERE {_CHUNK_ROWS} GROUP BY 1, 2, 3, 4, 5, 7, 8"), params


def refresh(conn: sqlite3.Connection, dim: str, *, at_least: int | None = None) -> bool:
    """Fold the events past what ``dim``'s roll-up covers into it (starting it if there is
    none), :data:`CHUNK` rows a transaction, when there are at least ``at_least`` (default
    :data:`REFRESH_ROWS`); True when it did. ``conn`` is a writable connection outside any
    transaction."""
    at_least = REFRESH_ROWS if at_least is None else at_least
    try:
        found = state(conn, dim)
    except sqlite3.OperationalError:
        return False
    if found is None and conn.execute("SELECT 1 FROM sqlite_master WHERE name = "
                                      "'learn_rollup_state'").fetchone() is None:
        return False
    top = conn.execute("SELECT max(rowid) FROM events").fetchone()[0] or 0
    if found is not None and found.usable and top - found.covered < max(at_least, 1):
        return False
    if dim == FACTORS:
        conn.executescript(FACTORS_TABLE)
    elif dim not in _TABLES:
        conn.executescript(DAYS_TABLE)
    sql, params = _insert(dim)
    table = _TABLES.get(dim, "learn_rollup")
    mine = "" if dim in _TABLES else " WHERE dim = :dim"
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = state(conn, dim)
            if now is None:
                conn.execute("INSERT INTO learn_rollup_state VALUES (?, ?, 0, NULL, NULL, ?)",
                             (dim, VERSION, FIRST_HOUR))
                now = State(covered=0, floor=FIRST_HOUR, usable=True)
            covered = now.covered
            if not now.usable:  # another layout, or renumbered rows: start again
                conn.execute(f"DELETE FROM {table}{mine}", {"dim": dim})
                if dim not in _TABLES:
                    conn.execute("DELETE FROM learn_rollup_day WHERE dim = ?", (dim,))
                covered = 0
            high = conn.execute(  # an existing row's: the check of what is covered
                "SELECT max(rowid) FROM (SELECT rowid FROM events WHERE rowid > ? "
                "ORDER BY rowid LIMIT ?)", (covered, max(CHUNK, 1))).fetchone()[0]
            if high is not None:
                last = (conn.execute("SELECT max(rowid) FROM learn_rollup").fetchone()[0]
                        or 0) if dim not in _TABLES else 0
                conn.execute(sql, {"low": covered, "high": high, "floor": now.floor,
                                   "dim": dim, **params})
                if dim not in _TABLES:  # the days of the hourly rows just inserted
                    conn.execute(_DAYS, (last, dim))
            _cover(conn, dim, high or covered)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if high is None:
            return True


def _cover(conn: sqlite3.Connection, dim: str | None, rowid: int) -> None:
    """``dim``'s roll-up (every one's: None) covers the rows up to ``rowid``."""
    row = conn.execute("SELECT ts, trace_id FROM events WHERE rowid = ?",
                       (rowid,)).fetchone() if rowid else None
    conn.execute("UPDATE learn_rollup_state SET version = ?, covered = ?, covered_ts = ?, "
                 "covered_trace = ? WHERE ? IS NULL OR dim = ?",
                 (VERSION, rowid if row else 0, row[0] if row else None,
                  row[1] if row else None, dim, dim))


def pruned(conn: sqlite3.Connection, before: float) -> None:
    """Keep the roll-up equal to the events while ``prune_events`` deletes those older than
    ``before``: call it after each of its deletes, in the delete's transaction."""
    try:
        rows = conn.execute("SELECT dim, covered, floor FROM learn_rollup_state").fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return
        raise
    if not rows:
        return
    floor = max(*(r[2] for r in rows), math.floor(before / 3600.0) + 1)
    if any(r[2] != floor for r in rows):
        conn.execute("UPDATE learn_rollup_state SET floor = ?", (floor,))
        conn.execute("DELETE FROM learn_rollup WHERE hour < ?", (floor,))
        conn.execute("DELETE FROM learn_failures WHERE hour < ?", (floor,))
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'learn_factors'").fetchone():
            conn.execute("DELETE FROM learn_factors WHERE hour < ?", (floor,))
        if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'learn_rollup_day'"
                        ).fetchone():
            # a day that starts below the floor is never read again (its hours from the
            # floor are read from learn_rollup)
            conn.execute("DELETE FROM learn_rollup_day WHERE day * 24 < ?", (floor,))
    for dim, covered, _ in rows:
        if covered and conn.execute("SELECT 1 FROM events WHERE rowid = ?",
                                    (covered,)).fetchone() is None:
            # every row up to it that is left is rolled up (or below the floor); SQLite
            # reuses the rowids above the largest one left
            left = conn.execute("SELECT max(rowid) FROM events WHERE rowid <= ?",
                                (covered,)).fetchone()[0]
            _cover(conn, dim, left or 0)


hours = whole_hours
"""(:func:`~closedloop.store._learn.whole_hours`.)"""


def series_rows(conn: sqlite3.Connection, by: Dimension, window: str, span: tuple[int, int],
                task_type: str | None) -> list[Sequence[Any]]:
    """Rows ``(value, period, bucket, *sums)`` of ``by``'s roll-up over the hours ``span``:
    by day or week, its whole days from ``learn_rollup_day`` (:data:`DAYS_TABLE`) and the
    hours at its edges from ``learn_rollup``."""
    sums = ", ".join(f"sum({s})" for s in SUMS)
    return conn.execute(*_hours_and_days(
        f"value, {PERIODS[window]}, bucket", ", ".join(SUMS), sums, groups="1, 2, 3",
        dim=str(by), window=window, span=span, task_type=task_type)).fetchall()


def _hours_and_days(key: str, columns: str, sums: str, *, groups: str, dim: str, window: str,
                    span: tuple[int, int], task_type: str | None
                    ) -> tuple[str, list[Any]]:
    """``SELECT {key}, {sums} … GROUP BY {groups}`` over ``dim``'s rows of the hours
    ``span`` (``columns``: what ``sums`` reads), the whole days of a daily or weekly window
    from ``learn_rollup_day``, the rest from ``learn_rollup``."""
    task = " AND task_type = ?" if task_type is not None else ""
    more = [task_type] if task_type is not None else []
    low, high = span
    first, end = -(-low // 24), high // 24  # the whole days inside
    if window == "hour" or first >= end:
        return (f"SELECT {key}, {sums} FROM learn_rollup INDEXED BY learn_rollup_dim WHERE "
                f"dim = ? AND hour >= ? AND hour < ?{task} GROUP BY {groups}",
                [dim, *span, *more])
    hours = (f"SELECT {key}, {columns} FROM learn_rollup INDEXED BY learn_rollup_dim WHERE "
             f"dim = ? AND hour >= ? AND hour < ?{task}")
    return (f"SELECT {key}, {sums} FROM ({hours} UNION ALL {hours} UNION ALL SELECT {key}, "
            f"{columns} FROM learn_rollup_day INDEXED BY learn_rollup_day_dim WHERE dim = ? "
            f"AND day >= ? AND day < ?{task}) GROUP BY {groups}",
            [dim, low, first * 24, *more, dim, end * 24, high, *more, dim, first, end, *more])


def period_rows(conn: sqlite3.Connection, window: str, span: tuple[int, int],
                task_type: str | None) -> list[Sequence[Any]]:
    """Rows ``(period, steps)`` of the task types' roll-up over the hours ``span`` (by day or
    week, its whole days from ``learn_rollup_day``)."""
    return conn.execute(*_hours_and_days(PERIODS[window], "s0", "sum(s0)", groups="1",
                                         dim="task_type", window=window, span=span,
                                         task_type=task_type)).fetchall()


def failure_rows(conn: sqlite3.Connection, window: str, span: tuple[int, int],
                 task_type: str | None) -> list[Sequence[Any]]:
    """Rows ``(error_type, group, task_type, model, period, count, first, last)`` of the
    failures' roll-up over the hours ``span``."""
    task = " AND task_type = ?" if task_type is not None else ""
    return conn.execute(
        f"SELECT error_type, error_group, task_type, model, {PERIODS[window]}, sum(n), "
        "min(first_ts), max(last_ts) FROM learn_failures INDEXED BY learn_failures_hour "
        f"WHERE hour >= ? AND hour < ?{task} GROUP BY 1, 2, 3, 4, 5",
        [*span, *([task_type] if task_type is not None else [])]).fetchall()


def factor_rows(conn: sqlite3.Connection, span: tuple[int, int],
                task_type: str | None) -> list[Sequence[Any]]:
    """Rows ``(dim, key, value, hour of day, steps, failures)`` of the factors' roll-up
    over the hours ``span`` (see :func:`~closedloop.store._learn.margins_from_rows`)."""
    task = " AND task_type = ?" if task_type is not None else ""
    return conn.execute(
        "SELECT dim, key, value, hod, sum(steps), sum(failures) FROM learn_factors "
        f"INDEXED BY learn_factors_hour WHERE hour >= ? AND hour < ?{task} GROUP BY 1, 2, 3, 4",
        [*span, *([task_type] if task_type is not None else [])]).fetchall()
