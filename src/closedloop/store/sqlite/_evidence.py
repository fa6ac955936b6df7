"""An hourly roll-up of the evidence for autonomy levels (SQLite).

``autonomy_rollup`` holds, per exact UTC hour (``hour * 3600 <= ts < hour * 3600 + 3600``)
and task type, the steps of each :class:`~closedloop.autonomy.EvidenceGroup` less its
feedback: agent, autonomy mode, outcome, whether the error type is an executed one, the
verification verdict, the action class and whether an approve-mode step went through a
durable request. The evidence of a key (:meth:`~closedloop.store.sqlite._autonomy.
SQLiteLevelStore.evidence_groups`) adds up its rows for the whole hours since the level was
entered and reads from ``events`` what it does not cover: the partial hour at the start, the
rows past ``covered`` (late arrivals included) and the hours below ``floor``. Feedback is
recorded after the step, so it is never rolled up: the suggestions with feedback are counted
by a join from ``autonomy_feedback`` (a few rows) and moved to their groups. So the evidence
is the scan's, exactly.

The same rules as the learning roll-up (:mod:`closedloop.store.sqlite._rollup`), with a state
of its own (``autonomy_rollup_state``, one row): folded lazily by a writable handle
(:func:`refresh`, :data:`CHUNK` rows a transaction, once :data:`REFRESH_ROWS` wait; the
store's :class:`~closedloop.store.RollupKeeper` too), never by the writer; ``covered`` checked
against that row's ``ts`` and trace id before use (a ``VACUUM`` that renumbered the rows
makes it start again); retention (:func:`pruned`) raises ``floor`` and moves ``covered``
down when its row was deleted.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Sequence
from typing import Any

from closedloop._autonomy_state import EXECUTED_ERRORS
from closedloop.store._learn import whole_hours

VERSION = 1
"""The roll-up's layout; a store holding another is rebuilt by the next fold."""
CHUNK = 65_536
"""Rows folded in per write transaction."""
REFRESH_ROWS = 20_000
"""A fold runs when at least this many rows wait."""

MIGRATION = """
    CREATE TABLE IF NOT EXISTS autonomy_rollup (
        hour INTEGER NOT NULL, task_type TEXT NOT NULL, agent_id TEXT, mode TEXT,
        outcome TEXT, executed INTEGER NOT NULL, verified INTEGER, action_class,
        durable INTEGER NOT NULL, steps INTEGER NOT NULL
    );
    CREATE INDEX IF NOT EXISTS autonomy_rollup_task ON autonomy_rollup (task_type, hour);
    CREATE TABLE IF NOT EXISTS autonomy_rollup_state (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        version INTEGER NOT NULL,
        covered INTEGER NOT NULL,
        covered_ts REAL,
        covered_trace TEXT,
        floor INTEGER NOT NULL
    )
    """
"""The SQLite migration that adds the evidence roll-up (appended to the store's list)."""

_EXECUTED = ", ".join(f"'{e}'" for e in EXECUTED_ERRORS)
CLASS = ("CASE WHEN json_type(detail, '$.autonomy') = 'object' THEN "
         "json_extract(detail, '$.autonomy.class') END")
"""A step's action class (``detail["autonomy"]["class"]``)."""


def key_sql(classes: bool) -> str:
    """The seven columns of a step's evidence group, less the feedback: the class only when
    asked (``json_extract`` costs), whether a request was durable for approve-mode steps
    only."""
    return (f"agent_id, autonomy, outcome, coalesce(error_type IN ({_EXECUTED}), 0), "
            f"verification_passed, {CLASS if classes else 'NULL'}, CASE WHEN autonomy = "
            "'approve' AND detail IS NOT NULL THEN coalesce(json_type(detail, '$.approval') "
            "= 'object', 0) ELSE 0 END")


_GROUP = "GROUP BY 1, 2, 3, 4, 5, 6, 7"
_HOUR = ("(CAST(ts / 3600.0 AS INTEGER) - (CAST(ts / 3600.0 AS INTEGER) * 3600.0 > ts) "
         "+ ((CAST(ts / 3600.0 AS INTEGER) + 1) * 3600.0 <= ts))")
"""The exact hour of ``ts`` (the division may round up to the next whole hour)."""
_FOLD = (f"INSERT INTO autonomy_rollup SELECT {_HOUR}, task_type, {key_sql(True)}, count(*) "
         "FROM events NOT INDEXED WHERE rowid > ? AND rowid <= ? AND ts >= ? * 3600.0 "
         "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9")


def _usable(conn: sqlite3.Connection) -> tuple[int, int] | None:
    """``(covered, floor)`` of a roll-up that may be used (None: none, another layout, or
    rows renumbered since)."""
    row = conn.execute("SELECT version, covered, covered_ts, covered_trace, floor "
                       "FROM autonomy_rollup_state").fetchone()
    if row is None or row[0] != VERSION:
        return None
    if row[1] and conn.execute("SELECT ts, trace_id FROM events WHERE rowid = ?",
                               (row[1],)).fetchone() != (row[2], row[3]):
        return None
    return int(row[1]), int(row[4])


def _set_covered(conn: sqlite3.Connection, rowid: int) -> None:
    found = conn.execute("SELECT ts, trace_id FROM events WHERE rowid = ?",
                         (rowid,)).fetchone() if rowid else None
    ts, trace = found if found else (None, None)
    conn.execute("UPDATE autonomy_rollup_state SET version = ?, covered = ?, covered_ts = ?, "
                 "covered_trace = ?", (VERSION, rowid if found else 0, ts, trace))


def refresh(conn: sqlite3.Connection, *, at_least: int | None = None) -> bool:
    """Fold the events past what the roll-up covers into it (starting it if there is none),
    :data:`CHUNK` rows a transaction, when at least ``at_least`` (default
    :data:`REFRESH_ROWS`) wait; True when it did. ``conn``: writable, outside a
    transaction; a store without the roll-up's tables: False."""
    wait = max(REFRESH_ROWS if at_least is None else at_least, 1)
    try:
        found = _usable(conn)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return False
        raise
    if found is not None and conn.execute(
            "SELECT count(*) FROM (SELECT 1 FROM events WHERE rowid > ? LIMIT ?)",
            (found[0], wait)).fetchone()[0] < wait:
        return False
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = _usable(conn)  # again, under the write lock
            if now is None:  # none, another layout, or renumbered rows: start again
                old = conn.execute("SELECT floor FROM autonomy_rollup_state").fetchone()
                conn.execute("DELETE FROM autonomy_rollup")
                conn.execute("DELETE FROM autonomy_rollup_state")
                conn.execute("INSERT INTO autonomy_rollup_state VALUES (1, ?, 0, NULL, NULL, ?)",
                             (VERSION, old[0] if old else 0))
                now = (0, old[0] if old else 0)
            covered, floor = now
            high = conn.execute("SELECT max(rowid) FROM (SELECT rowid FROM events WHERE "
                                "rowid > ? ORDER BY rowid LIMIT ?)",
                                (covered, max(CHUNK, 1))).fetchone()[0]
            if high is not None:
                conn.execute(_FOLD, (covered, high, floor))
                _set_covered(conn, high)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if high is None:
            return True


def pruned(conn: sqlite3.Connection, before: float) -> None:
    """Keep the roll-up equal to the events while ``prune_events`` deletes those older than
    ``before``: call it after each of its deletes, in the delete's transaction."""
    try:
        row = conn.execute("SELECT covered, floor FROM autonomy_rollup_state").fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return
        raise
    if row is None:
        return
    covered, floor = row
    if math.floor(before / 3600.0) + 1 > floor:
        floor = math.floor(before / 3600.0) + 1
        conn.execute("UPDATE autonomy_rollup_state SET floor = ?", (floor,))
        conn.execute("DELETE FROM autonomy_rollup WHERE hour < ?", (floor,))
    if covered and conn.execute("SELECT 1 FROM events WHERE rowid = ?",
                                (covered,)).fetchone() is None:
        # every row left up to it is rolled up (or below the floor); SQLite reuses the
        # rowids above the largest one left
        _set_covered(conn, conn.execute("SELECT max(rowid) FROM events WHERE rowid <= ?",
                                        (covered,)).fetchone()[0] or 0)


NARROW_ROWS = 50_000
"""Without a roll-up, a window holding fewer steps than this (of every task type) is read
through ``events_ts``; a wider one through the task type's own rows (``events_latency`` leads
with it)."""


def evidence_rows(conn: sqlite3.Connection, task_type: str, *, since: float,
                  classes: bool) -> list[Sequence[Any]]:
    """Rows ``(*key, steps)`` (:func:`key_sql`) of ``task_type``'s steps since ``since``:
    the roll-up's whole hours and the rest from the events (a few hours and the rows not
    rolled up yet), in ``conn``'s open read transaction; without a roll-up, every step."""
    scan = (f"SELECT {key_sql(classes)}, count(*) FROM events INDEXED BY %s "
            "WHERE task_type = ? AND ts >= ?")
    try:
        found = _usable(conn)
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        found = None
    span = (whole_hours(since, None, found[1])
            if found is not None and math.isfinite(since) else None)
    if found is None or span is None:
        inside = conn.execute("SELECT count(*) FROM (SELECT 1 FROM events INDEXED BY "
                              "events_ts WHERE ts >= ? LIMIT ?)",
                              (since, NARROW_ROWS)).fetchone()[0]
        index = "events_ts" if inside < NARROW_ROWS else "events_latency"
        return conn.execute(f"{scan % index} {_GROUP}", (task_type, since)).fetchall()
    scan %= "events_ts"
    covered, (low, high) = found[0], span
    cls = "action_class" if classes else "NULL"
    return [
        *conn.execute(f"SELECT agent_id, mode, outcome, executed, verified, {cls}, durable, "
                      "sum(steps) FROM autonomy_rollup INDEXED BY autonomy_rollup_task "
                      f"WHERE task_type = ? AND hour >= ? AND hour < ? {_GROUP}",
                      (task_type, low, high)).fetchall(),
        *conn.execute(f"{scan} AND ts < ? {_GROUP}",
                      (task_type, since, low * 3600.0)).fetchall(),
        *conn.execute(f"SELECT {key_sql(classes)}, count(*) FROM events INDEXED BY events_ts "
                      f"WHERE task_type = ? AND ts >= ? {_GROUP}",  # high * 3600 >= since
                      (task_type, high * 3600.0)).fetchall(),
        *conn.execute(f"SELECT {key_sql(classes)}, count(*) FROM events NOT INDEXED WHERE "
                      f"rowid > ? AND task_type = ? AND ts >= ? AND ts < ? {_GROUP}",
                      (covered, task_type, low * 3600.0, high * 3600.0)).fetchall()]


def feedback_rows(conn: sqlite3.Connection, task_type: str, *, since: float,
                  classes: bool) -> list[Sequence[Any]]:
    """Rows ``(*key, agreed, steps)`` of ``task_type``'s suggestions since ``since`` with
    feedback recorded since then (a join from the feedback, a few rows)."""
    return conn.execute(
        f"SELECT {key_sql(classes)}, f.agreed, count(*) FROM autonomy_feedback f "
        "JOIN events ON events.step_id = f.step_id WHERE f.at >= ? AND task_type = ? AND "
        "ts >= ? AND outcome = 'suggested' GROUP BY 1, 2, 3, 4, 5, 6, 7, 8",
        (since, task_type, since)).fetchall()
