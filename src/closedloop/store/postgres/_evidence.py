"""An hourly roll-up of the evidence for autonomy levels (PostgreSQL; the same table as
SQLite's, :mod:`closedloop.store.sqlite._evidence`).

``autonomy_rollup`` holds, per exact UTC hour and task type, the steps of each
:class:`~closedloop.autonomy.EvidenceGroup` less its feedback (recorded after the step, it is
counted by a join from ``autonomy_feedback`` when read: :mod:`closedloop.store._evidence`).
The evidence of a key adds up the roll-up's rows for the whole hours since the level was
entered and reads from ``events``, in the same REPEATABLE READ snapshot, what the roll-up
does not cover: the partial hour at the start, the hours below ``floor``, the rows not folded
yet. So the evidence is the scan's, exactly.

The watermark is the learning roll-up's (:mod:`closedloop.store.postgres._rollup`):
``events.xact``, the inserting transaction of each row; a fold, under a transaction-level
advisory try-lock of its own (one process at a time; the others read what is there), adds
the rows with ``covered <= xact < pg_snapshot_xmin(pg_current_snapshot())`` (the first fold:
``xact`` NULL too) and moves ``covered`` up in the same transaction. Retention
(:func:`pruned`, in the transaction that drops a day partition or deletes late rows) raises
``floor`` and deletes the roll-up below it under the same lock. Rows with a non-finite ts are
never rolled up (outside every whole hour: read from the events).

What is not folded yet is read, with the partial hours at the edges, in one statement (a
bitmap OR of the ts index and the ``events_xact`` BRIN in each partition). VACUUM leaves the
last, partial block range of every partition unsummarized, which such a read would take
whole (50 ms for the 31 partitions of 1M events); a fold therefore summarizes the new ranges
(``brin_summarize_new_values``; inserts keep a summarized range current).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from closedloop._autonomy_state import EXECUTED_ERRORS
from closedloop.store._learn import whole_hours

if TYPE_CHECKING:
    import psycopg

VERSION = 1
"""The roll-up's layout; a schema holding another is rebuilt by the next fold."""
REFRESH_ROWS = 20_000
"""A fold runs when at least this many rows wait."""
FIRST_HOUR = 14 * 24
"""``floor`` of a new roll-up: the first fortnight of 1970 is read from the events (as the
learning roll-up does: PostgreSQL refuses a division of a tiny time that underflows)."""

MIGRATION = """
    CREATE TABLE IF NOT EXISTS {schema}.autonomy_rollup (
        hour BIGINT NOT NULL, task_type TEXT NOT NULL, agent_id TEXT, mode TEXT,
        outcome TEXT, executed BOOLEAN NOT NULL, verified BOOLEAN, action_class JSONB,
        durable BOOLEAN NOT NULL, steps BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS autonomy_rollup_task ON {schema}.autonomy_rollup
        (task_type, hour);
    CREATE TABLE IF NOT EXISTS {schema}.autonomy_rollup_state (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        version INTEGER NOT NULL,
        covered BIGINT NOT NULL,
        floor BIGINT NOT NULL
    )
    """
"""The migration that adds the evidence roll-up (appended to the list; after the learning
roll-up's, whose ``events.xact`` it uses)."""

_EXECUTED = ", ".join(f"'{e}'" for e in EXECUTED_ERRORS)
CLASS = ("CASE WHEN jsonb_typeof(detail -> 'autonomy') = 'object' THEN "
         "detail -> 'autonomy' -> 'class' END")
"""A step's action class (``detail["autonomy"]["class"]``, as JSON)."""


def key_sql(classes: bool) -> str:
    """The seven columns of a step's evidence group, less the feedback: the class only when
    asked, whether a request was durable for approve-mode steps only."""
    return (f"agent_id, autonomy, outcome, coalesce(error_type IN ({_EXECUTED}), false), "
            f"verification_passed, {CLASS if classes else 'NULL::jsonb'}, "
            "coalesce(autonomy = 'approve' AND jsonb_typeof(detail -> 'approval') = 'object', "
            "false)")


_GROUP = "GROUP BY 1, 2, 3, 4, 5, 6, 7"
_FLOOR = "trunc(ts / 3600.0)"
_HOUR = (f"({_FLOOR}::bigint - ({_FLOOR} * 3600.0 > ts)::int "
         f"+ (({_FLOOR} + 1) * 3600.0 <= ts)::int)")
"""The exact hour of ``ts`` (the division may round up to the next whole hour)."""


def _one(conn: psycopg.Connection[Any], query: str, params: Sequence[Any] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return None if row is None else row[0]


def refresh(conn: psycopg.Connection[Any], schema: str, *,
            at_least: int | None = None) -> bool:
    """Fold the rows past what the roll-up covers into it (starting it if there is none)
    when at least ``at_least`` (default :data:`REFRESH_ROWS`) wait, unless another process
    is folding; True when it did. ``conn``: autocommit (each statement of the fold's
    transaction sees what committed before it)."""
    from psycopg import errors

    from closedloop.store.postgres._backend import _lock_key

    wait = max(REFRESH_ROWS if at_least is None else at_least, 1)
    state, events = f'"{schema}".autonomy_rollup_state', f'"{schema}".events'
    with conn.transaction():
        conn.execute("SET LOCAL jit = off")
        conn.execute("SET LOCAL work_mem = '64MB'")
        if not _one(conn, "SELECT pg_try_advisory_xact_lock(%s)",
                    (_lock_key("evidence", schema),)):
            return False
        if _one(conn, "SELECT to_regclass(%s)", (state,)) is None:
            return False  # a schema that predates the roll-up
        row = conn.execute(f"SELECT version, covered, floor FROM {state}").fetchone()
        upto = int(_one(conn, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"))
        if row is not None and row[0] == VERSION:
            if upto <= row[1] or _one(conn, f"SELECT count(*) FROM (SELECT 1 FROM {events} "
                                      "WHERE xact >= %s AND xact < %s LIMIT %s) AS n",
                                      (row[1], upto, wait)) < wait:
                return False
            rows, params = "xact >= %s AND xact < %s", [row[1], upto]
        else:  # none yet, or another layout: start again
            conn.execute(f'DELETE FROM "{schema}".autonomy_rollup')
            conn.execute(f"INSERT INTO {state} VALUES (1, %s, 0, %s) ON CONFLICT (one) DO "
                         "UPDATE SET version = EXCLUDED.version, covered = 0",
                         (VERSION, FIRST_HOUR))
            rows, params = "(xact IS NULL OR xact < %s)", [upto]
        floor = _one(conn, f"SELECT floor FROM {state}")
        conn.execute(f'INSERT INTO "{schema}".autonomy_rollup SELECT {_HOUR}, task_type, '
                     f"{key_sql(True)}, count(*) FROM {events} WHERE {rows} AND ts >= %s "
                     "AND ts < 'Infinity' GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9",
                     [*params, float(floor) * 3600.0])
        conn.execute(f"UPDATE {state} SET version = %s, covered = %s", (VERSION, upto))
    # the BRIN ranges VACUUM leaves unsummarized (see above), in a transaction of its own
    with suppress(errors.InsufficientPrivilege):  # not the owner: slower, never wrong
        conn.execute("SELECT sum(brin_summarize_new_values(inhrelid)) FROM pg_inherits WHERE "
                     "inhparent = to_regclass(%s)", (f'"{schema}".events_xact',))
    return True


def pruned(conn: psycopg.Connection[Any], schema: str, kept_from: float) -> None:
    """Keep the roll-up equal to the events when those before ``kept_from`` (an hour's
    start) are gone: call it in the transaction that deletes them, before it does."""
    from closedloop.store.postgres._backend import _lock_key

    if _one(conn, "SELECT to_regclass(%s)", (f'"{schema}".autonomy_rollup_state',)) is None:
        return
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("evidence", schema),))
    floor = int(kept_from // 3600.0) if kept_from < math.inf else 1 << 40
    conn.execute(f'UPDATE "{schema}".autonomy_rollup_state SET floor = %s WHERE floor < %s',
                 (floor, floor))
    conn.execute(f'DELETE FROM "{schema}".autonomy_rollup WHERE hour < %s', (floor,))


def evidence_rows(conn: psycopg.Connection[Any], schema: str, task_type: str, *,
                  since: float, classes: bool) -> list[Sequence[Any]]:
    """Rows ``(*key, steps)`` (:func:`key_sql`) of ``task_type``'s steps since ``since``:
    the roll-up's whole hours and the rest from the events, in ``conn``'s open REPEATABLE
    READ transaction."""
    scan = (f'SELECT {key_sql(classes)}, count(*) FROM "{schema}".events WHERE '
            "task_type = %s AND ts >= %s")
    state = f'"{schema}".autonomy_rollup_state'
    row = (conn.execute(f"SELECT version, covered, floor FROM {state}").fetchone()
           if _one(conn, "SELECT to_regclass(%s)", (state,)) is not None else None)
    span = (whole_hours(since, None, int(row[2]))
            if row is not None and row[0] == VERSION and math.isfinite(since) else None)
    if row is None or span is None:
        return conn.execute(f"{scan} {_GROUP}", (task_type, since)).fetchall()
    low, high = span[0] * 3600.0, span[1] * 3600.0
    cls = "action_class" if classes else "NULL::jsonb"
    return [
        *conn.execute(f"SELECT agent_id, mode, outcome, executed, verified, {cls}, durable, "
                      f'sum(steps) FROM "{schema}".autonomy_rollup WHERE task_type = %s AND '
                      f"hour >= %s AND hour < %s {_GROUP}",
                      (task_type, *span)).fetchall(),
        # the partial hours at the edges and the rows not folded yet, in one pass over the
        # partitions (one plan: a bitmap OR of the ts index and the xact BRIN in each)
        *conn.execute(f"{scan} AND (ts < %s OR ts >= %s OR xact >= %s) {_GROUP}",
                      (task_type, since, low, high, row[1])).fetchall()]


def feedback_rows(conn: psycopg.Connection[Any], schema: str, task_type: str, *,
                  since: float, classes: bool) -> list[Sequence[Any]]:
    """Rows ``(*key, agreed, steps)`` of ``task_type``'s suggestions since ``since`` with
    feedback recorded since then (a join from the feedback, a few rows; none: no join)."""
    if conn.execute(f'SELECT 1 FROM "{schema}".autonomy_feedback WHERE at >= %s LIMIT 1',
                    (since,)).fetchone() is None:
        return []
    return conn.execute(
        f'SELECT {key_sql(classes)}, f.agreed, count(*) FROM "{schema}".autonomy_feedback f '
        f'JOIN "{schema}".events e ON e.step_id = f.step_id WHERE f.at >= %s AND '
        "e.task_type = %s AND e.ts >= %s AND e.outcome = 'suggested' "
        "GROUP BY 1, 2, 3, 4, 5, 6, 7, 8", (since, task_type, since)).fetchall()
