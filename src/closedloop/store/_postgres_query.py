"""The query port (:class:`~closedloop.store.EventQueries`) of the PostgreSQL backend.

A summary reads one snapshot, on two connections at once (the second imports the first's
exported snapshot and computes the latency figures) over the window (the time filter prunes
day partitions): a hash aggregation gives the counts and sums per
combination, a second the latency histogram (each day through its ``events_latency``, then
added up), a third the failure-message groups (``events_groups``); then only the latencies of
a percentile's bucket are read (``events_latency``) and the most recent message of each listed
group. A step listing walks ``events_ts`` (or ``events_task_type_ts``) backwards, ties
broken by the row's physical address (``ctid``: events are never updated, so it is stable for
as long as a reader pages; partitions keep equal timestamps together).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from closedloop._errors import StoreError
from closedloop._events import EVENT_FIELDS, StepEvent
from closedloop.store._postgres import LATENCY_BUCKET, _one_line
from closedloop.store._query import (
    EventSummary,
    StepFilter,
    StepPage,
    check_limit,
    decode_cursor,
    page,
)
from closedloop.store._sqlsummary import summarize as assemble

if TYPE_CHECKING:
    import psycopg

    from closedloop.store._postgres import PostgresBackend

_TID = re.compile(r"\(\d{1,10},\d{1,5}\)")
_GROUP_COLUMNS = ("task_type, outcome, error_type, validation_passed, verification_passed, "
                  "attempts")
_FIELDS = ", ".join(EVENT_FIELDS)


def _and(where: StepFilter) -> tuple[str, list[Any]]:
    """The filter's terms to append to a WHERE clause."""
    terms = [f" AND {column} {op} %s" for column, op, _ in where.columns()]
    return "".join(terms), [v for *_, v in where.columns()]


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
            f"sum(latency_ms) FROM {self.table} WHERE TRUE{self.filter} "
            f"GROUP BY {_GROUP_COLUMNS}", self.params)

    def histogram(self) -> Iterable[Sequence[Any]]:
        # Each day's partition is grouped through its own events_latency, in the index's
        # order, then the days are added up: merging the partitions' indexes into one order
        # first costs twice as much.
        self.conn.execute("SET LOCAL enable_partitionwise_aggregate = on")
        try:
            return self._rows(
                f"SELECT task_type, {LATENCY_BUCKET}, count(*), min(latency_ms), "
                f"max(latency_ms), min(ts), max(ts) FROM {self.table} WHERE TRUE{self.filter} "
                "GROUP BY 1, 2", self.params)
        finally:
            self.conn.execute("SET LOCAL enable_partitionwise_aggregate = off")

    def bucket_bounds(self, task_type: str, bucket: Any) -> tuple[float, float]:
        raise AssertionError("the histogram gives every bucket's bounds")

    def time_span(self, task_type: str, buckets: Sequence[Any]) -> tuple[float, float]:
        raise AssertionError("the histogram gives every task type's first and last step")

    def bucket_latencies(self, task_type: str, bucket: Any) -> list[float]:
        return [r[0] for r in self._rows(
            f"SELECT latency_ms FROM {self.table} WHERE task_type = %s "
            f"AND {LATENCY_BUCKET} = %s{self.filter}", [task_type, bucket, *self.params])]

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

    def example(self, task_type: str, error_type: str, group: str) -> tuple[float, str] | None:
        kind = "error_type = %s" if error_type else "coalesce(error_type, '') = %s"
        rows = self._rows(
            f"SELECT ts, error_message FROM {self.table} WHERE task_type = %s AND {kind} "
            f"AND error_group = %s{self.filter} ORDER BY ts DESC LIMIT 1",
            [task_type, error_type, group, *self.params])
        return (rows[0][0], rows[0][1]) if rows else None


def _table(backend: PostgresBackend) -> str:
    return f'"{backend.schema}".events'  # a plain SQL name, checked by parse_url


def summarize(backend: PostgresBackend, where: StepFilter, *,
              top_messages: int) -> EventSummary | None:
    """The summary of ``where`` in SQL; ``None`` when the schema predates migration 5."""
    import psycopg
    from psycopg import sql

    try:
        pool = backend.pool()
        with pool.connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            ready = conn.execute(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attname = 'error_group' AND NOT attisdropped",
                (_table(backend),)).fetchone()
            if ready is None:
                return None
            snapshot = conn.execute("SELECT pg_export_snapshot()").fetchone()
            assert snapshot is not None
            # the latency figures on a second connection, in the very same snapshot
            with pool.connection() as other, other.transaction():
                other.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                other.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                    sql.Literal(snapshot[0])))
                return assemble(_Source(conn, _table(backend), where),
                                top_messages=top_messages,
                                alongside=_Source(other, _table(backend), where))
    except psycopg.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {_one_line(exc)}") from None


def list_steps(backend: PostgresBackend, where: StepFilter, *, limit: int,
               cursor: str | None) -> StepPage:
    """Up to ``limit`` steps newest first (ties by ctid), after ``cursor`` (``[ts, ctid]``)."""
    import psycopg

    check_limit(limit)
    terms, params = _and(where)
    if cursor is not None:
        ts, tid = decode_cursor(cursor, str, backend.url, lambda k: bool(_TID.fullmatch(k)))
        terms += " AND (ts, ctid) < (%s, %s::tid)"
        params += [ts, tid]
    try:
        with backend.pool().connection() as conn:
            rows = conn.execute(
                f"SELECT ts, ctid::text AS k, {_FIELDS} FROM {_table(backend)} WHERE TRUE{terms} "
                "ORDER BY ts DESC, ctid DESC LIMIT %s",
                [*params, limit + 1]).fetchall()
    except psycopg.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {_one_line(exc)}") from None
    return page([(r[0], r[1], StepEvent(*r[2:])) for r in rows], limit)
