"""The query port (:class:`~closedloop.store.EventQueries`) of the PostgreSQL backend.

A summary is one REPEATABLE READ, READ ONLY transaction (one snapshot) over the window (the
time filter prunes day partitions), each grouped query reading an index-only scan of its own
index, one day partition at a time: the counts and sums per combination
(``events_task``), the latency histogram (``events_latency``), the failure-message groups
(``events_groups``); then only the latencies of a percentile's bucket are read
(``events_latency``) and the most recent message of each listed group. (Reading the latency
figures on a second connection in the same exported snapshot, as SQLite does, was slower
here: the server already spreads each query over the cores.)
A step listing walks ``events_ts`` (or ``events_task``) backwards, ties
broken by the row's physical address (``ctid``: events are never updated, so it is stable for
as long as a reader pages; partitions keep equal timestamps together).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from closedloop._errors import StoreError
from closedloop._events import EVENT_FIELDS, StepEvent
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
from closedloop.store.postgres._backend import LATENCY_BUCKET, _one_line

if TYPE_CHECKING:
    import psycopg

    from closedloop.store.postgres._backend import PostgresBackend

_TID = re.compile(r"\(\d{1,10},\d{1,5}\)")
_GROUP_COLUMNS = ("task_type, outcome, error_type, validation_passed, verification_passed, "
                  "attempts")
_FIELDS = ", ".join(EVENT_FIELDS)


def _and(where: StepFilter) -> tuple[str, list[Any]]:
    """The filter's terms to append to a WHERE clause."""
    columns = where.columns()
    terms = [f" AND {column} {op} %s" for column, op, _ in columns]
    params = [v for *_, v in columns]
    if where.label is not None:
        terms.append(" AND labels ->> %s = %s")
        params += list(where.label)
    return "".join(terms), params


class _Source:
    """One summary's queries, on one connection inside one snapshot."""

    def __init__(self, conn: psycopg.Connection[Any], table: str, where: StepFilter) -> None:
        self.conn = conn
        self.table = table
        self.filter, self.params = _and(where)

    def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
        return self.conn.execute(sql, params).fetchall()

    def groups(self) -> Iterable[Sequence[Any]]:
        return self._rows(
            f"SELECT {_GROUP_COLUMNS}, count(*), sum(input_tokens), sum(output_tokens), "
            "sum(latency_ms), sum(cached_input_tokens), sum(cost_usd), count(cost_usd) "
            f"FROM {self.table} WHERE TRUE{self.filter} "
            f"GROUP BY {_GROUP_COLUMNS}", self.params)

    def histogram(self) -> Iterable[Sequence[Any]]:
        return self._rows(
            f"SELECT task_type, {LATENCY_BUCKET}, count(*), min(latency_ms), "
            f"max(latency_ms), min(ts), max(ts) FROM {self.table} WHERE TRUE{self.filter} "
            "GROUP BY 1, 2", self.params)

    def bucket_bounds(self, pairs: Sequence[tuple[str, Any]]
                      ) -> dict[tuple[str, Any], tuple[float, float]]:
        raise AssertionError("the histogram gives every bucket's bounds")

    def time_spans(self, buckets: dict[str, list[Any]]) -> dict[str, tuple[float, float]]:
        raise AssertionError("the histogram gives every task type's first and last step")

    def bucket_latencies(self, pairs: Sequence[tuple[str, Any]]
                         ) -> dict[tuple[str, Any], list[float]]:
        # one statement for every bucket (planning over every day partition is not free)
        out: dict[tuple[str, Any], list[float]] = {pair: [] for pair in pairs}
        if pairs:
            for task, bucket, latency in self._rows(
                    "SELECT v.t, v.b, e.latency_ms FROM unnest(%s::text[], %s::int[]) AS v(t, b) "
                    f"CROSS JOIN LATERAL (SELECT latency_ms FROM {self.table} WHERE "
                    f"task_type = v.t AND {LATENCY_BUCKET} = v.b{self.filter}) AS e",
                    [[t for t, _ in pairs], [b for _, b in pairs], *self.params]):
                out[task, bucket].append(latency)
        return out

    def message_counts(self, top: int | None) -> Iterable[Sequence[Any]]:
        grouped = (
            "WITH k AS (SELECT task_type, coalesce(error_type, '') AS et, error_group AS eg, "
            f"count(*) AS n, max(ts) AS last FROM {self.table} WHERE error_group IS NOT NULL"
            f"{self.filter} GROUP BY 1, 2, 3) ")
        if top is None:
            return self._rows(grouped + "SELECT task_type, et, eg, n, last FROM k",
                              self.params)
        # ranked as Python ranks strings: by code point (the "C" collation)
        return self._rows(
            grouped + "SELECT task_type, et, eg, n, last FROM (SELECT *, row_number() OVER "
            '(PARTITION BY task_type ORDER BY n DESC, et COLLATE "C", eg COLLATE "C") AS r '
            "FROM k) AS t WHERE r <= %s UNION ALL SELECT NULL, et, eg, n, last FROM (SELECT "
            "et, eg, sum(n) AS n, max(last) AS last, row_number() OVER (ORDER BY sum(n) DESC, "
            'et COLLATE "C", eg COLLATE "C") AS r FROM k GROUP BY et, eg) AS o WHERE r <= %s',
            [*self.params, top, top])

    def ungrouped_messages(self) -> Iterable[Sequence[Any]]:
        return self._rows(
            f"SELECT task_type, error_type, error_message, ts FROM {self.table} "
            f"WHERE error_group IS NULL AND error_message <> ''{self.filter}", self.params)

    def examples(self, keys: Sequence[tuple[str, str, str]]
                 ) -> dict[tuple[str, str, str], tuple[float, str]]:
        if not keys:
            return {}
        rows = self._rows(
            "SELECT v.t, v.et, v.eg, e.ts, e.error_message FROM unnest(%s::text[], "
            "%s::text[], %s::text[]) AS v(t, et, eg) CROSS JOIN LATERAL (SELECT ts, "
            f"error_message FROM {self.table} WHERE task_type = v.t AND (error_type = v.et "
            "OR v.et = '' AND error_type IS NULL) AND error_group = v.eg"
            f"{self.filter} ORDER BY ts DESC LIMIT 1) AS e",
            [[k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys], *self.params])
        return {(t, et, eg): (ts, message) for t, et, eg, ts, message in rows}


def _table(backend: PostgresBackend) -> str:
    return _table_of(backend.schema)


def _table_of(schema: str) -> str:
    return f'"{schema}".events'  # a plain SQL name, checked by parse_url


def summarize(backend: PostgresBackend, where: StepFilter, *,
              top_messages: int) -> EventSummary | None:
    """The summary of ``where`` in SQL; ``None`` when the schema predates migration 5."""
    import psycopg

    try:
        with backend.pool().connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            ready = conn.execute(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attname = 'error_group' AND NOT attisdropped",
                (_table(backend),)).fetchone()
            if ready is None:
                return None
            # Every grouped query reads its index, one day partition at a time: the planner,
            # which knows nothing of the latency bucket's values nor of how much cheaper an
            # index-only scan of a narrow index is than a scan of the whole rows, would
            # otherwise read every row (twice as long).
            conn.execute("SET LOCAL enable_seqscan = off")
            conn.execute("SET LOCAL enable_partitionwise_aggregate = on")
            return assemble(_Source(conn, _table(backend), where), top_messages=top_messages)
    except psycopg.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {_one_line(exc)}") from None


def list_steps(backend: PostgresBackend, where: StepFilter, *, limit: int,
               cursor: str | None, after: bool = False) -> StepPage:
    """Up to ``limit`` steps newest first (ties by ctid), after ``cursor`` (``[ts, ctid]``);
    with ``after``, the steps past ``cursor`` oldest first. Filtered by model or label (newest
    first), the walk reads only the time ranges that :func:`_ranges` finds can hold such
    steps (a value no step has: a few index probes instead of every step)."""
    import psycopg

    check_limit(limit)
    terms, params = _and(where)
    at: float | None = None
    if cursor is not None:
        ts, tid = decode_cursor(cursor, str, backend.url, lambda k: bool(_TID.fullmatch(k)))
        terms += f" AND (ts, ctid) {'>' if after else '<'} (%s, %s::tid)"
        params += [ts, tid]
        at = float(ts)
    order = "ts, ctid" if after else "ts DESC, ctid DESC"
    dim = None if after else rolled_dim(where)
    if dim is not None and not backend.read_only:
        from closedloop.store.postgres import _rollup

        try:
            with backend.pool().connection() as conn:
                _rollup.refresh(conn, backend.schema, dim[0])
        except psycopg.Error as exc:
            raise StoreError(f"cannot update the roll-up of store {backend.url}: "
                             f"{_one_line(exc)}") from None

    def walk(conn: psycopg.Connection[Any], extra: str = "", values: Sequence[Any] = (),
             want: int = limit if after else limit + 1) -> list[Any]:
        return conn.execute(
            f"SELECT ts, ctid::text AS k, {_FIELDS} FROM {_table(backend)} WHERE TRUE{terms}"
            f"{extra} ORDER BY {order} LIMIT %s", [*params, *values, want]).fetchall()

    try:
        with backend.pool().connection() as conn:
            if dim is None:
                rows = walk(conn)
            else:
                with conn.transaction():  # one snapshot: the roll-up and the rows it names
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    ranges = _ranges(conn, backend.schema, where, *dim)
                    if ranges is None:
                        rows = walk(conn)
                    else:
                        rows = []
                        for low, high in ranges:  # newest first, disjoint: the order is kept
                            if at is not None and low is not None and low > at:
                                continue
                            extra, values = "", []
                            if high is not None:
                                extra, values = " AND ts < %s", [high]
                            if low is not None:
                                extra += " AND ts >= %s"
                                values.append(low)
                            rows += walk(conn, extra, values, want=limit + 1 - len(rows))
                            if len(rows) > limit:
                                break
    except psycopg.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {_one_line(exc)}") from None
    found = [(r[0], r[1], StepEvent(*r[2:])) for r in rows]
    return page_after(found) if after else page(found, limit)


def _ranges(conn: psycopg.Connection[Any], schema: str, where: StepFilter, dim: str,
            value: str) -> list[tuple[float | None, float | None]] | None:
    """The time ranges ``[low, high)`` (None: unbounded), newest first, that hold every step
    of ``where``: the rows the roll-up never counts (a ts that is not finite: the range
    from infinity up), the hours ``dim``'s roll-up has ``value`` in, the hours of the
    matching rows it does not cover yet (``xact`` from ``covered``), and all below its
    floor; None without a usable roll-up of ``dim``."""
    from closedloop.store.postgres import _rollup

    found = _rollup.state(conn, schema, dim)
    if found is None or not found.usable:
        return None
    since, until = where.since, where.until
    low = found.floor if since is None else max(found.floor, exact_hour(since))
    high = (1 << 62) if until is None or not math.isfinite(until) else exact_hour(until) + 1
    task, more = ((" AND task_type = %s", [where.task_type]) if where.task_type is not None
                  else ("", []))
    hours = {int(r[0]) for r in conn.execute(
        f'SELECT DISTINCT hour FROM "{schema}".learn_rollup WHERE dim = %s AND hour >= %s '
        f"AND hour < %s AND value = %s{task}", [dim, low, high, value, *more]).fetchall()}
    sql, params = _and(where)
    hours.update(h for r in conn.execute(
        f"SELECT ts FROM {_table_of(schema)} WHERE xact >= %s AND ts < 'Infinity'{sql}",
        [found.covered, *params]).fetchall() if (h := exact_hour(r[0])) >= found.floor)
    ranges: list[tuple[float | None, float | None]] = [(math.inf, None)]
    for h in sorted(hours, reverse=True):
        if ranges[-1][0] == (h + 1) * 3600.0:
            ranges[-1] = (h * 3600.0, ranges[-1][1])
        else:
            ranges.append((h * 3600.0, (h + 1) * 3600.0))
    floor = found.floor * 3600.0
    if since is None or since < floor:
        if ranges[-1][0] == floor:
            ranges[-1] = (None, ranges[-1][1])
        else:
            ranges.append((None, floor))
    return ranges


def task_types(backend: PostgresBackend) -> list[str]:
    """Every task type with a stored step, sorted: a loose scan of ``events_task``
    (each day partition's)."""
    import psycopg

    try:
        with backend.pool().connection() as conn:
            rows = conn.execute(task_types_sql(_table(backend))).fetchall()
    except psycopg.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {_one_line(exc)}") from None
    return sorted(r[0] for r in rows)  # in code point order, as the other backends
