"""An hourly roll-up of the events that trends, failure clusters and factors read instead of
every row (PostgreSQL; the same tables and sums as SQLite's,
:mod:`closedloop.store.sqlite._rollup`).

``learn_rollup`` (per exact UTC hour, task type, dimension, value and latency bucket: the sums
of a :class:`~closedloop.store._learn.SeriesCell`), ``learn_failures`` (failed steps per
hour, error type, message group, task type and model, with their first and last time) and
``learn_factors`` (per hour and task type, steps and failures of each factor's value alone:
the rows of :func:`~closedloop.store._learn.margins_from_rows`). A query adds up the
roll-up's rows for the whole hours inside its window and reads from ``events`` what the
roll-up does not cover, in the same REPEATABLE READ snapshot: the partial hours at the
window's edges, the hours below ``floor``, and the rows written since. So the result is the
scan's, cell for cell (floating-point sums up to their last digits).

**The watermark** (PostgreSQL has no rowid, and the ids of rows become visible out of
order: a transaction that took its number first may commit last). Every row records the
transaction that inserted it: ``events.xact BIGINT DEFAULT pg_current_xact_id()`` (a column
default, nothing per row in the writer; rows stored before it are NULL). A fold, under a
transaction-level advisory lock (several processes may try at once: the others skip it and
read what is there), takes ``upto = pg_snapshot_xmin(pg_current_snapshot())``: every
transaction numbered below it had ended before that statement, and any transaction that
starts later is numbered above it, so the rows with ``xact < upto`` are complete and are
all visible to the fold's next statement (READ COMMITTED: a new snapshot per statement).
It adds the rows with ``covered <= xact < upto`` (the first fold: ``xact`` NULL too) and
sets ``covered = upto`` in the same transaction. A row is thus rolled up exactly once,
whenever its transaction commits; what is not rolled up yet is ``xact >= covered``, read
through the BRIN index ``events_xact`` (rows are appended in about the order of their
transactions). A long transaction anywhere in the cluster holds ``upto`` back: the rows
after it are then read from the events until it ends (slower, never wrong).

- **Kept up lazily, never by the writer**: a query through a writable handle folds in the
  new rows first when there are at least :data:`REFRESH_ROWS`; read-only handles use what
  is there. A fold (and a process's first check) also summarizes ``events_xact``'s new
  page ranges (:func:`summarize`), so that ``xact >= covered`` reads only recent pages.
- **Days** (:data:`DAYS`): the series dimensions' rows are also kept per exact day, written
  by the same statement; a daily or weekly series reads its whole days from there.
- **Retention** (:func:`pruned`, in the transaction that drops a day partition or deletes
  late rows, before it does): raises ``floor`` to the first hour kept and deletes the
  roll-up below it, under the same advisory lock as folds (taken before the partition's
  lock, in the order a fold takes them).
- **Labels** are rolled up as their JSON text and read in Python, as the scan reads them.
- **Rows with a non-finite ts** (``events_default``) are never rolled up: they are outside
  every window's whole hours and read from the events.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from closedloop.store._learn import (
    FAILURE_OUTCOMES,
    REFUSAL_OUTCOMES,
    factor_rows_sql,
    latency_bucket_sql,
    parse_dimension,
    series_sums,
    whole_hours,
)

if TYPE_CHECKING:
    import psycopg

VERSION = 2
"""The roll-up's layout; a dimension holding another is rebuilt by the next writable
query (2: the series dimensions have their days in :data:`DAYS` too)."""
REFRESH_ROWS = 20_000
"""A writable query folds the new rows in when there are at least this many."""
FIRST_HOUR = 14 * 24
"""``floor`` of a new roll-up: the first fortnight of 1970 is always read from the events
(there a period is not a function of the hour)."""
FAILURES = "#failures"
FACTORS = "#factors"
PERIODS = {"hour": "ph", "day": "pd", "week": "pw"}
_TABLES = {FAILURES: "learn_failures", FACTORS: "learn_factors"}
SUMS = tuple(f"s{i}" for i in range(16))
_FLOATS = frozenset({"s9", "s12", "s13", "s14", "s15"})
_COUNTS = frozenset({"s0", "s1", "s2", "s3", "s4", "s5", "s6", "s7", "s11"})
"""The sums that count steps (never above 2**63): read as BIGINT, whose sum PostgreSQL
accumulates in 128-bit integers, 2-3x faster than NUMERIC's (the token sums may not fit)."""


def _type(column: str) -> str:
    return ("DOUBLE PRECISION" if column in _FLOATS else "BIGINT" if column in _COUNTS
            else "NUMERIC")


def _sum(column: str) -> str:
    """``sum(column)`` as :func:`series_rows` reads it (a count as BIGINT)."""
    return f"sum({column}::bigint)::bigint" if column in _COUNTS else f"sum({column})"

FAILED = f"outcome IN ({', '.join(repr(o) for o in FAILURE_OUTCOMES)})"
REFUSED = f"outcome IN ({', '.join(repr(o) for o in REFUSAL_OUTCOMES)})"
SERIES_SUMS = series_sums("outcome = 'succeeded'", FAILED,
                          "validation_passed IS NOT NULL AND attempts > 1")
BUCKET = latency_bucket_sql()
_DIGITS = "input_tokens::text"
SIZE = (f"(CASE WHEN input_tokens > 0 THEN length({_DIGITS}) * 10 + (CASE WHEN "
        f"left({_DIGITS}, 1) < '2' COLLATE \"C\" THEN 1 WHEN left({_DIGITS}, 1) < '5' "
        "COLLATE \"C\" THEN 2 ELSE 5 END) ELSE 0 END)")
""":func:`~closedloop.store._learn.size_code` in PostgreSQL."""
HOUR_OF_DAY = "mod(trunc(ts / 3600.0)::bigint, 24)"
GROUPED_FAILURE = (f"{FAILED} AND NOT (error_group IS NULL AND "
                   "coalesce(error_message, '') <> '')")
"""The failed steps whose message is grouped (or that have none): those the roll-up
counts; the others (stored before messages were grouped) are grouped when read."""
_FLOOR = "trunc(ts / 3600.0)"
_HOUR = (f"({_FLOOR}::bigint - ({_FLOOR} * 3600.0 > ts)::int "
         f"+ (({_FLOOR} + 1) * 3600.0 <= ts)::int)")
"""The exact hour of ``ts`` (the division may round up to the next whole hour)."""
_PERIOD = {"ph": "trunc((ts - 0.0) / 3600.0)::bigint",
           "pd": "trunc((ts - 0.0) / 86400.0)::bigint",
           "pw": "trunc((ts - 345600.0) / 604800.0)::bigint"}
"""Each window's period of ``ts``, spelled as the scan spells it (``_period`` there)."""
_HEAD = f"{_HOUR}, {_PERIOD['ph']}, {_PERIOD['pd']}, {_PERIOD['pw']}"

MIGRATION = f"""
    ALTER TABLE {{schema}}.events ADD COLUMN IF NOT EXISTS xact BIGINT;
    ALTER TABLE {{schema}}.events ALTER COLUMN xact
        SET DEFAULT pg_current_xact_id()::text::bigint;
    CREATE INDEX IF NOT EXISTS events_xact ON {{schema}}.events USING brin (xact);
    CREATE TABLE IF NOT EXISTS {{schema}}.learn_rollup (
        hour BIGINT NOT NULL, ph BIGINT NOT NULL, pd BIGINT NOT NULL, pw BIGINT NOT NULL,
        task_type TEXT NOT NULL, dim TEXT NOT NULL, value TEXT, bucket INTEGER NOT NULL,
        {', '.join(f"{s} {'DOUBLE PRECISION' if s in _FLOATS else 'NUMERIC'}" for s in SUMS)}
    );
    CREATE INDEX IF NOT EXISTS learn_rollup_dim ON {{schema}}.learn_rollup (dim, hour);
    CREATE TABLE IF NOT EXISTS {{schema}}.learn_failures (
        hour BIGINT NOT NULL, ph BIGINT NOT NULL, pd BIGINT NOT NULL, pw BIGINT NOT NULL,
        error_type TEXT NOT NULL, error_group TEXT NOT NULL, task_type TEXT NOT NULL,
        model TEXT, n BIGINT NOT NULL, first_ts DOUBLE PRECISION NOT NULL,
        last_ts DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX IF NOT EXISTS learn_failures_hour ON {{schema}}.learn_failures (hour);
    CREATE TABLE IF NOT EXISTS {{schema}}.learn_factors (
        hour BIGINT NOT NULL, task_type TEXT NOT NULL, dim TEXT NOT NULL, key TEXT NOT NULL,
        value TEXT, hod INTEGER NOT NULL, steps BIGINT NOT NULL, failures BIGINT NOT NULL
    );
    CREATE INDEX IF NOT EXISTS learn_factors_hour ON {{schema}}.learn_factors (hour);
    CREATE TABLE IF NOT EXISTS {{schema}}.learn_rollup_state (
        dim TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        covered BIGINT NOT NULL,
        floor BIGINT NOT NULL
    )
    """
"""The migration that adds the watermark column and the roll-up (appended to the list)."""


DAYS = "learn_rollup_day"
"""``learn_rollup``'s rows added up per exact UTC day (``hour // 24``), period and the rest
of the key: what a daily or weekly series reads for the whole days of its window (24 times
fewer rows to add up: the overview over 30 days or all time), the hours at its edges from
``learn_rollup``. Written by the same statement of every fold (from the hourly rows it
inserts); made by the first fold of a store that has none (no migration: a store written by
an older closedloop, version 1, is rebuilt)."""
_DAY_TABLE = (
    'CREATE TABLE IF NOT EXISTS "{schema}".learn_rollup_day (day BIGINT NOT NULL, '
    "pd BIGINT NOT NULL, pw BIGINT NOT NULL, task_type TEXT NOT NULL, dim TEXT NOT NULL, "
    "value TEXT, bucket INTEGER NOT NULL, "
    + ", ".join(f"{s} {_type(s)}" for s in SUMS) + ")")
_DAY_INDEX = ('CREATE INDEX IF NOT EXISTS learn_rollup_day_dim ON "{schema}".learn_rollup_day '
              "(dim, day)")


@dataclass(frozen=True, slots=True)
class State:
    """What one dimension's roll-up covers: rows with ``xact`` below ``covered`` (and those
    without one), hours from ``floor``; ``usable`` False: ignore it."""

    covered: int
    floor: int
    usable: bool


def state(conn: psycopg.Connection[Any], schema: str, dim: str) -> State | None:
    """The roll-up's state of ``dim`` (None: none, or a schema without the roll-up)."""
    if conn.execute("SELECT to_regclass(%s)",
                    (f'"{schema}".learn_rollup_state',)).fetchone() in (None, (None,)):
        return None
    row = conn.execute(f'SELECT version, covered, floor FROM "{schema}".learn_rollup_state '
                       "WHERE dim = %s", (dim,)).fetchone()
    if row is None:
        return None
    return State(covered=int(row[1]), floor=int(row[2]), usable=row[0] == VERSION)


def factor_select(table: str, terms: str) -> str:
    """The steps :func:`~closedloop.store._learn.factor_rows_sql` counts (its ``inner``),
    with the hour and task type first; ``terms`` is the WHERE clause's rest (after TRUE),
    refusals left out here."""
    return (f"SELECT {_HOUR} AS hour, task_type, CASE WHEN {FAILED} THEN 1 ELSE 0 END AS "
            f"failed, {HOUR_OF_DAY} AS hod, model, agent_version, prompt_version, {SIZE} "
            f"AS size, labels::text AS labels FROM {table} WHERE NOT {REFUSED}{terms}")


def _insert(schema: str, dim: str) -> tuple[str, list[Any]]:
    """The INSERT of ``dim``'s rows from the events matching ``{rows}`` (placeholder),
    and its parameters before those of ``{rows}``."""
    table = f'"{schema}".events'
    if dim == FACTORS:
        return (f'INSERT INTO "{schema}".learn_factors (hour, task_type, dim, key, value, hod, '
                "steps, failures) " + factor_rows_sql(
                    factor_select(table, " AND {rows}"), head=("hour", "task_type")), [])
    if dim == FAILURES:
        return (f'INSERT INTO "{schema}".learn_failures (hour, ph, pd, pw, error_type, '
                f"error_group, task_type, model, n, first_ts, last_ts) SELECT {_HEAD}, "
                "coalesce(error_type, ''), coalesce(error_group, ''), task_type, model, "
                f"count(*), min(ts), max(ts) FROM {table} WHERE {{rows}} AND "
                f"{GROUPED_FAILURE} GROUP BY 1, 2, 3, 4, 5, 6, 7, 8", [])
    by = parse_dimension(dim)
    value, params = (("labels ->> %s", [by.label]) if by.column == "label"
                     else (by.column, []))
    sums = ", ".join(SUMS)
    hours = (f'INSERT INTO "{schema}".learn_rollup (hour, ph, pd, pw, task_type, dim, value, '
             f"bucket, {sums}) SELECT {_HEAD}, task_type, %s::text, {value}, {BUCKET}, "
             f"{SERIES_SUMS} FROM {table} WHERE {{rows}} GROUP BY 1, 2, 3, 4, 5, 7, 8 "
             f"RETURNING hour, pd, pw, task_type, value, bucket, {sums}")
    # the days from the hours just inserted, in the same statement (one read of the events)
    return (f'WITH h AS ({hours}) INSERT INTO "{schema}".{DAYS} (day, pd, pw, task_type, dim, '
            f"value, bucket, {sums}) SELECT hour / 24, pd, pw, task_type, %s::text, value, "
            f"bucket, {', '.join(f'sum({s})' for s in SUMS)} FROM h GROUP BY 1, 2, 3, 4, 6, 7",
            [dim, *params])


def refresh(conn: psycopg.Connection[Any], schema: str, dim: str, *,
            at_least: int | None = None) -> bool:
    """Fold the rows past what ``dim``'s roll-up covers into it (starting it if there is
    none) when there are at least ``at_least`` (default :data:`REFRESH_ROWS`), unless
    another process is folding; True when it did. ``conn`` is an autocommit connection
    (each statement of the fold's transaction sees what committed before it). After a fold,
    and on a process's first call for a schema, the new page ranges of ``events_xact`` are
    summarized (:func:`summarize`)."""
    folded = _fold(conn, schema, dim, REFRESH_ROWS if at_least is None else at_least)
    place = (conn.info.host, conn.info.port, conn.info.dbname, schema)
    if folded or place not in _SUMMARIZED:
        _SUMMARIZED.add(place)
        summarize(conn, schema)
    return folded


_SUMMARIZED: set[tuple[str, int, str, str]] = set()
"""The schemas whose ``events_xact`` this process summarized (:func:`refresh`)."""


def summarize(conn: psycopg.Connection[Any], schema: str) -> int:
    """Summarize the page ranges of ``events_xact`` that have no summary yet, in every
    partition: how many it did (0 when a partition's lock is not had within 0.2 s, the next
    fold's call does it; or when the index is another role's).

    A BRIN range gets its summary only from VACUUM, which leaves each table's last, partial
    range alone, or from this; a range without one matches every query, so without it
    ``xact >= covered`` (what the roll-up does not cover: the fold's check and every rolled
    query) read the tail pages of every day partition, ~60 ms on 1M events written across
    31 days at once. A summarized range is kept up by the inserts into it, so that after
    this only the rows written since (the pages of new ranges) are read."""
    import psycopg

    try:
        with conn.transaction():
            conn.execute("SET LOCAL lock_timeout = '200ms'")
            row = conn.execute(
                "SELECT coalesce(sum(brin_summarize_new_values(relid)), 0) FROM "
                "pg_partition_tree(to_regclass(%s)) WHERE isleaf",
                (f'"{schema}".events_xact',)).fetchone()
    except (psycopg.errors.LockNotAvailable, psycopg.errors.InsufficientPrivilege):
        return 0  # busy, or another role's index: the reads stay exact, only slower
    return 0 if row is None else int(row[0])


def _fold(conn: psycopg.Connection[Any], schema: str, dim: str, at_least: int) -> bool:
    from closedloop.store.postgres._backend import _lock_key

    with conn.transaction():
        conn.execute("SET LOCAL jit = off")
        conn.execute("SET LOCAL work_mem = '64MB'")
        if not _one(conn, "SELECT pg_try_advisory_xact_lock(%s)",
                    (_lock_key("rollup", schema),)):
            return False
        if _one(conn, "SELECT to_regclass(%s)", (f'"{schema}".learn_rollup_state',)) is None:
            return False  # a schema that predates the roll-up
        found = state(conn, schema, dim)  # read after the lock: the last fold's commit
        upto = int(_one(conn, "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                        ()))
        events = f'"{schema}".events'
        if found is not None and found.usable:
            if upto <= found.covered:
                return False
            new = _one(conn, f"SELECT count(*) FROM (SELECT 1 FROM {events} WHERE xact >= %s "
                       "AND xact < %s LIMIT %s) AS n", (found.covered, upto, max(at_least, 1)))
            if new < max(at_least, 1):
                return False
            rows, params = "xact >= %s AND xact < %s", [found.covered, upto]
        else:  # none yet, or another layout: start again
            table = _TABLES.get(dim, "learn_rollup")
            mine = "" if dim in _TABLES else " WHERE dim = %s"
            conn.execute(f'DELETE FROM "{schema}".{table}{mine}', [] if dim in _TABLES
                         else [dim])
            if dim not in _TABLES:
                conn.execute(_DAY_TABLE.replace("{schema}", schema))
                conn.execute(_DAY_INDEX.replace("{schema}", schema))
                conn.execute(f'DELETE FROM "{schema}".{DAYS} WHERE dim = %s', [dim])
            conn.execute(
                f'INSERT INTO "{schema}".learn_rollup_state VALUES (%s, %s, 0, %s) '
                "ON CONFLICT (dim) DO NOTHING", (dim, VERSION, FIRST_HOUR))
            rows, params = "(xact IS NULL OR xact < %s)", [upto]
        floor = _one(conn, f'SELECT floor FROM "{schema}".learn_rollup_state WHERE dim = %s',
                     (dim,))
        sql, head = _insert(schema, dim)
        conn.execute(sql.replace("{rows}", f"{rows} AND ts >= %s AND ts < 'Infinity'"),
                     [*head, *params, float(floor) * 3600.0,
                      *([] if dim in _TABLES else [dim])])
        conn.execute(f'UPDATE "{schema}".learn_rollup_state SET version = %s, covered = %s '
                     "WHERE dim = %s", (VERSION, upto, dim))
    return True


def _one(conn: psycopg.Connection[Any], query: str, params: Sequence[Any]) -> Any:
    row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def pruned(conn: psycopg.Connection[Any], schema: str, kept_from: float) -> None:
    """Keep the roll-up equal to the events when those before ``kept_from`` (an hour's
    start) are gone: call it in the transaction that deletes them (after it, the hours
    below are read from what is left of the events)."""
    from closedloop.store.postgres._backend import _lock_key

    if conn.execute("SELECT to_regclass(%s)",
                    (f'"{schema}".learn_rollup_state',)).fetchone() in (None, (None,)):
        return
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("rollup", schema),))
    floor = int(kept_from // 3600.0) if kept_from < float("inf") else 1 << 40
    conn.execute(f'UPDATE "{schema}".learn_rollup_state SET floor = %s WHERE floor < %s',
                 (floor, floor))
    for table in ("learn_rollup", "learn_failures", "learn_factors"):
        conn.execute(f'DELETE FROM "{schema}".{table} WHERE hour < %s', (floor,))
    if _one(conn, "SELECT to_regclass(%s)", (f'"{schema}".{DAYS}',)) is not None:
        # a day that starts below the floor is never read again (its hours from the floor
        # are read from learn_rollup)
        conn.execute(f'DELETE FROM "{schema}".{DAYS} WHERE day * 24 < %s', (floor,))


Run = Callable[[Sequence[str], Sequence[Any]], list[Any]]
"""``run(terms, params)``: the scan's rows over the steps matching the query's filter and
``terms`` (SQL conditions on the events, with their parameters)."""


def rolled(conn: psycopg.Connection[Any], schema: str, dim: str, *, since: float | None,
           until: float | None, run: Run,
           read: Callable[[tuple[int, int]], list[Any]]) -> list[Any]:
    """The rows of ``run`` over the query's steps, the whole hours that ``dim``'s roll-up
    covers read from it by ``read(hours)`` instead (no roll-up: ``run`` over them all)."""
    found = state(conn, schema, dim)
    span = None if found is None or not found.usable else whole_hours(since, until,
                                                                      found.floor)
    if found is None or span is None:
        return run((), ())
    low, high = span[0] * 3600.0, span[1] * 3600.0
    # what is left to read from the events is small (the edge hours, the rows since the
    # last fold): starting parallel workers for it took longer (20-40 ms) than the read
    conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    # one statement (one plan over the day partitions, one round trip): the edge hours
    # through events_ts, the rows not covered yet through events_xact's summaries
    return [*read(span), *run(("(ts < %s OR ts >= %s OR xact >= %s)",),
                              (low, high, found.covered))]


def _task(task_type: str | None) -> tuple[str, list[Any]]:
    return ((" AND task_type = %s", [task_type]) if task_type is not None else ("", []))


def series_rows(conn: psycopg.Connection[Any], schema: str, dim: str, window: str, *,
                span: tuple[int, int], task_type: str | None) -> list[Any]:
    """Rows ``(value, period, bucket, *sums)`` of ``dim``'s roll-up over the hours
    ``span``: by day or week, its whole days from :data:`DAYS` and the hours at its edges
    from ``learn_rollup``, in one statement."""
    period = PERIODS[window]
    return _hours_and_days(
        conn, schema, dim, window=window, span=span, task_type=task_type,
        key=f"value, {period}, bucket",
        hours=", ".join(f"{s}::bigint AS {s}" if s in _COUNTS else s for s in SUMS),
        days=", ".join(SUMS), sums=", ".join(_sum(s) for s in SUMS), groups="1, 2, 3")


def period_rows(conn: psycopg.Connection[Any], schema: str, window: str,
                span: tuple[int, int], task_type: str | None) -> list[Any]:
    """Rows ``(period, steps)`` of the task types' roll-up over the hours ``span`` (by day or
    week, its whole days from :data:`DAYS`)."""
    return _hours_and_days(conn, schema, "task_type", window=window, span=span,
                           task_type=task_type, key=PERIODS[window],
                           hours="s0::bigint AS s0", days="s0",
                           sums="sum(s0::bigint)::bigint", groups="1")


def _hours_and_days(conn: psycopg.Connection[Any], schema: str, dim: str, *, window: str,
                    span: tuple[int, int], task_type: str | None, key: str, hours: str,
                    days: str, sums: str, groups: str) -> list[Any]:
    """``SELECT {key}, {sums} … GROUP BY {groups}`` over ``dim``'s rows of the hours
    ``span`` (``hours``, ``days``: the columns ``sums`` reads, from each table), a daily or
    weekly window's whole days from :data:`DAYS`, the rest from ``learn_rollup``."""
    task, more = _task(task_type)
    low, high = span
    first, end = -(-low // 24), high // 24  # the whole days inside
    if window == "hour" or first >= end:
        return conn.execute(
            f"SELECT {key}, {sums} FROM \"{schema}\".learn_rollup WHERE dim = %s AND "
            f"hour >= %s AND hour < %s{task} GROUP BY {groups}", [dim, *span, *more]).fetchall()
    return conn.execute(
        f"SELECT {key}, {sums} FROM (SELECT {key}, {hours} FROM \"{schema}\".learn_rollup "
        f"WHERE dim = %s AND (hour >= %s AND hour < %s OR hour >= %s AND hour < %s){task} "
        f"UNION ALL SELECT {key}, {days} FROM \"{schema}\".{DAYS} WHERE dim = %s AND "
        f"day >= %s AND day < %s{task}) AS r GROUP BY {groups}",
        [dim, low, first * 24, end * 24, high, *more, dim, first, end, *more]).fetchall()


def failure_rows(conn: psycopg.Connection[Any], schema: str, window: str,
                 span: tuple[int, int], task_type: str | None) -> list[Any]:
    """Rows ``(error_type, group, task_type, model, period, count, first, last)`` of the
    failures' roll-up over the hours ``span``."""
    task, more = _task(task_type)
    return conn.execute(
        f"SELECT error_type, error_group, task_type, model, {PERIODS[window]}, sum(n), "
        f"min(first_ts), max(last_ts) FROM \"{schema}\".learn_failures WHERE hour >= %s AND "
        f"hour < %s{task} GROUP BY 1, 2, 3, 4, 5", [*span, *more]).fetchall()


def factor_rows(conn: psycopg.Connection[Any], schema: str, span: tuple[int, int],
                task_type: str | None) -> list[Any]:
    """Rows ``(dim, key, value, hour of day, steps, failures)`` of the factors' roll-up
    over the hours ``span``."""
    task, more = _task(task_type)
    return conn.execute(
        f"SELECT dim, key, value, hod, sum(steps), sum(failures) FROM \"{schema}\"."
        f"learn_factors WHERE hour >= %s AND hour < %s{task} GROUP BY 1, 2, 3, 4",
        [*span, *more]).fetchall()
