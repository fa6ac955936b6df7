"""Spans and scores in a PostgreSQL store's schema: the span/score port of the PostgreSQL
backend (tables from its migration 3).

- **Ingest**: a batch is one ``COPY`` of its spans plus one upsert of its traces' summaries
  (``traces``), in one transaction under an advisory lock on the schema's spans. The lock
  makes ``seq`` (a sequence) number spans in commit order, so a reader tailing them
  (``closedloop serve --metrics``) never skips a span committed late, and it keeps
  concurrent upserts of one trace from deadlocking. Text PostgreSQL cannot hold (NUL, lone
  surrogates) is replaced by U+FFFD, as for events.
- **Partitions**: ``spans`` is range-partitioned by ``start_ns``, one UTC day per partition
  (``spans_YYYYMMDD``), created on demand; :meth:`PostgresSpanStore.prune` drops the days
  wholly before the cut-off and deletes the rest in chunks. A writer whose partition was
  dropped by another process creates it again.
- **Reads**: a trace listing is one page of the ``traces`` index (keyset, newest first);
  score summaries are aggregated on the server.

Telemetry side of the store: a batch that cannot be written raises (the span pipeline drops
and counts it); reads raise :class:`~closedloop.StoreError` with a one-line reason.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

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
from closedloop.store.postgres._backend import _clean_row, _lock_key, _one_line

if TYPE_CHECKING:
    import psycopg
    from psycopg import sql

    from closedloop.store.postgres._backend import PostgresBackend

DAY_NS = 86_400 * 10**9
_SPAN_TYPES = ("text", "text", "text", "text", "int4", "int8", "int8", "int4", "text", "text",
               "text", "text")
_PRUNE_CHUNK = 50_000
_UPPER = re.compile(r"TO \('?(-?\d+)'?\)")

# ``{s}`` is the quoted schema name
_SQL = {
    "copy": f"COPY {{s}}.spans ({', '.join(SPAN_COLUMNS)}) FROM STDIN (FORMAT BINARY)",
    "merge": """
        INSERT INTO {s}.traces AS t (trace_id, start_ns, end_ns, spans, label_ns, task_type,
                                     outcome)
        SELECT * FROM unnest(%s::text[], %s::int8[], %s::int8[], %s::int8[], %s::int8[],
                             %s::text[], %s::text[])
        ON CONFLICT (trace_id) DO UPDATE SET
            start_ns = LEAST(t.start_ns, EXCLUDED.start_ns),
            end_ns = GREATEST(t.end_ns, EXCLUDED.end_ns),
            spans = t.spans + EXCLUDED.spans,
            task_type = CASE WHEN {relabel} THEN EXCLUDED.task_type ELSE t.task_type END,
            outcome = CASE WHEN {relabel} THEN EXCLUDED.outcome ELSE t.outcome END,
            label_ns = CASE WHEN {relabel} THEN EXCLUDED.label_ns ELSE t.label_ns END
        """.replace("{relabel}", RELABEL.format(new="EXCLUDED", old="t")),
    "trace": f"SELECT {', '.join(SPAN_COLUMNS)} FROM {{s}}.spans WHERE trace_id = %s "
             "ORDER BY start_ns, seq",
    "since": f"SELECT seq, {', '.join(SPAN_COLUMNS)} FROM {{s}}.spans WHERE seq > %s "
             "ORDER BY seq LIMIT %s",
    "cursor": "SELECT coalesce(max(seq), 0) FROM {s}.spans",
    "add_score": f"INSERT INTO {{s}}.scores ({', '.join(SCORE_COLUMNS)}) "
                 "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
    "partitions": "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                  "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                  "JOIN pg_namespace n ON n.oid = p.relnamespace "
                  "WHERE n.nspname = %s AND p.relname = 'spans'",
    "prune_spans": "DELETE FROM {s}.spans WHERE seq IN (SELECT seq FROM {s}.spans "
                   f"WHERE start_ns < %s LIMIT {_PRUNE_CHUNK}) AND start_ns < %s",
    "prune_traces": "DELETE FROM {s}.traces WHERE trace_id IN (SELECT trace_id FROM "
                    f"{{s}}.traces WHERE start_ns < %s LIMIT {_PRUNE_CHUNK})",
    "prune_scores": "DELETE FROM {s}.scores WHERE id IN (SELECT id FROM {s}.scores "
                    f"WHERE ts < %s LIMIT {_PRUNE_CHUNK})",
}


def partition_name(day: int) -> str:
    """``spans_YYYYMMDD`` for a day number (days since 1970-01-01, UTC)."""
    try:
        return "spans_" + time.strftime("%Y%m%d", time.gmtime(day * 86_400))
    except (OverflowError, OSError, ValueError):  # a clock far off: still a valid name
        return f"spans_day{day}".replace("-", "m")


class PostgresSpanStore:
    """Spans and scores in the schema of a :class:`~closedloop.store.postgres.PostgresBackend`,
    on its connection pool."""

    def __init__(self, backend: PostgresBackend) -> None:
        from psycopg import sql

        self._backend = backend
        self.schema = backend.schema
        self.url = backend.url
        self._lock_key = _lock_key("spans", self.schema)
        s = sql.Identifier(self.schema)
        self._q = {name: sql.SQL(text).format(s=s) for name, text in _SQL.items()}
        self._partitions: set[int] = set()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"PostgresSpanStore({self.url!r})"

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        import psycopg

        try:
            with self._backend.pool().connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise StoreError(f"cannot read spans from {self.url}: {_one_line(exc)}") from None

    def _rows(self, query: sql.Composed, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._reading() as conn:
            return conn.execute(query, params).fetchall()

    # ----- writing --------------------------------------------------------------------------
    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        """COPY the batch and merge its traces' summaries, in one transaction."""
        import psycopg
        from psycopg import errors

        if not spans:
            return
        if self._pid != os.getpid():  # a forked child knows nothing of the parent's days
            self._partitions, self._pid = set(), os.getpid()
        days = {s.start_ns // DAY_NS for s in spans}
        rows = [s.to_row() for s in spans]
        rollups = [r.to_row() for r in rollup(spans)]
        with self._backend.pool().connection() as conn:
            if days - self._partitions:
                self._ensure_partitions(conn, days - self._partitions)
            try:
                self._write(conn, rows, rollups)
            except errors.CheckViolation:
                # "no partition for the row": another process pruned a day this one made
                self._partitions.clear()
                self._ensure_partitions(conn, days)
                self._write(conn, rows, rollups)
            except (psycopg.DataError, UnicodeEncodeError):
                # NUL or a lone surrogate somewhere: the same batch with them replaced
                self._write(conn, [_clean_row(r) for r in rows],
                            [_clean_row(r) for r in rollups])

    def _write(self, conn: psycopg.Connection[Any], rows: Sequence[tuple[Any, ...]],
               rollups: Sequence[tuple[Any, ...]]) -> None:
        """The spans and their traces' summaries (:class:`~closedloop._spans.Rollup` rows)."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            with conn.cursor() as cur, cur.copy(self._q["copy"]) as copy:
                copy.set_types(_SPAN_TYPES)
                for row in rows:
                    copy.write_row(row)
            conn.execute(self._q["merge"], [list(c) for c in zip(*rollups, strict=True)])

    def _ensure_partitions(self, conn: psycopg.Connection[Any], days: set[int]) -> None:
        from psycopg import sql

        s = sql.Identifier(self.schema)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            for day in sorted(days):
                conn.execute(sql.SQL(
                    "CREATE TABLE IF NOT EXISTS {}.{} PARTITION OF {}.spans "
                    "FOR VALUES FROM ({}) TO ({})").format(
                        s, sql.Identifier(partition_name(day)), s,
                        sql.Literal(day * DAY_NS), sql.Literal((day + 1) * DAY_NS)))
        self._partitions |= days

    def add_score(self, score: Score) -> None:
        """Insert one score."""
        import psycopg

        try:
            with self._backend.pool().connection() as conn:
                conn.execute(self._q["add_score"], _clean_row(score.to_row()))
        except psycopg.Error as exc:
            raise StoreError(f"cannot write score to {self.url}: {_one_line(exc)}") from None

    # ----- reading --------------------------------------------------------------------------
    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every span of one trace, by start time."""
        rows = self._rows(self._q["trace"], (trace_id.strip().lower(),))
        return [StoredSpan.from_row(r) for r in rows]

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None, cursor: str | None = None) -> TracePage:
        """Traces newest first, one page of the ``traces`` summary's index."""
        from psycopg import sql

        where: list[sql.Composable] = []
        params: list[Any] = []
        if task_type is not None:
            where.append(sql.SQL("task_type = %s"))
            params.append(task_type)
        if since_ns is not None:
            where.append(sql.SQL("start_ns >= %s"))
            params.append(since_ns)
        if cursor is not None:
            where.append(sql.SQL("(start_ns, trace_id) < (%s, %s)"))
            params.extend(decode_cursor(cursor))
        limit = max(0, int(limit))
        query = sql.SQL("SELECT trace_id, start_ns, end_ns, spans, task_type, outcome "
                        "FROM {}.traces{} ORDER BY start_ns DESC, trace_id DESC LIMIT %s").format(
            sql.Identifier(self.schema),
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
        rows = self._rows(query, [*params, limit + 1])
        return page_of([TraceSummary(trace_id=r[0], start_ns=r[1], end_ns=r[2], spans=r[3],
                                     task_type=r[4], outcome=r[5]) for r in rows], limit)

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        """Scores, oldest first."""
        from psycopg import sql

        where: list[sql.Composable] = []
        params: list[Any] = []
        for column, value in (("trace_id", trace_id), ("name", name)):
            if value is not None:
                where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if since is not None:
            where.append(sql.SQL("ts >= %s"))
            params.append(since)
        query = sql.SQL("SELECT {} FROM {}.scores{} ORDER BY ts, id").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in SCORE_COLUMNS),
            sql.Identifier(self.schema),
            sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""))
        return [Score.from_row(r) for r in self._rows(query, params)]

    def score_summary(self, *, since: float | None = None,
                      until: float | None = None) -> list[TaskScores]:
        """Per task type with scores, aggregated on the server: the scores joined to the task
        type of their trace's latest step in the period (through the events' trace index),
        then those task types' steps."""
        from psycopg import sql

        period: list[sql.Composable] = []
        params: list[float] = []
        if since is not None:
            period.append(sql.SQL("ts >= %s"))
            params.append(since)
        if until is not None:
            period.append(sql.SQL("ts < %s"))
            params.append(until)
        s = sql.Identifier(self.schema)
        where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(period) if period else sql.SQL("")
        traced = sql.SQL(" AND ").join([*period, sql.SQL("trace_id IN (SELECT trace_id FROM s)")])
        groups = sql.SQL(
            "WITH s AS (SELECT trace_id, name, value, label, ts FROM {s}.scores{where}), "
            "t AS (SELECT DISTINCT ON (trace_id) trace_id, task_type FROM {s}.events "
            "WHERE {traced} ORDER BY trace_id, ts DESC) "
            "SELECT t.task_type, s.name, to_char(to_timestamp(s.ts) AT TIME ZONE 'UTC', "
            "'YYYY-MM-DD'), s.label, count(s.value), sum(s.value), count(*) "
            "FROM s JOIN t USING (trace_id) GROUP BY 1, 2, 3, 4").format(
                s=s, where=where, traced=traced)
        steps = sql.SQL(
            "SELECT task_type, count(*), count(*) FILTER (WHERE outcome = 'succeeded') "
            "FROM {}.events WHERE {} GROUP BY task_type").format(
                s, sql.SQL(" AND ").join([*period, sql.SQL("task_type = ANY(%s)")]))
        with self._reading() as conn:
            group_rows = conn.execute(groups, [*params, *params]).fetchall()
            tasks = sorted({g[0] for g in group_rows})
            step_rows = conn.execute(steps, [*params, tasks]).fetchall() if tasks else []
        return fold_scores(step_rows, group_rows)

    def spans_since(self, cursor: int, *, limit: int = SPANS_PAGE
                    ) -> tuple[list[StoredSpan], int]:
        """Spans numbered after ``cursor``, in commit order, and the last number read."""
        rows = self._rows(self._q["since"], (cursor, max(1, int(limit))))
        if not rows:
            return [], cursor
        return [StoredSpan.from_row(r[1:]) for r in rows], int(rows[-1][0])

    def span_cursor(self) -> int:
        """The number of the latest span committed (0 when there is none)."""
        return int(self._rows(self._q["cursor"])[0][0])

    # ----- retention ------------------------------------------------------------------------
    def prune(self, before: float) -> Pruned:
        """Drop the day partitions of spans wholly before ``before`` and delete the rest of
        what is older (spans, traces, scores) a chunk per transaction."""
        import psycopg

        cut_ns = int(before * 1e9)
        try:
            with self._backend.pool().connection() as conn:
                # a schema of an older version that nothing migrated (``store prune`` never
                # migrates) may lack these tables: there is nothing of theirs to prune
                have = {row[0] for row in conn.execute(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
                    (self.schema,)).fetchall()}
                spans = traces = scores = 0
                if "spans" in have:
                    spans = self._drop_days(conn, cut_ns)
                    spans += self._chunks(conn, "prune_spans", (cut_ns, cut_ns))
                if "traces" in have:
                    traces = self._chunks(conn, "prune_traces", (cut_ns,))
                if "scores" in have:
                    scores = self._chunks(conn, "prune_scores", (before,))
        except psycopg.Error as exc:
            raise StoreError(f"cannot prune spans in {self.url}: {_one_line(exc)}") from None
        return Pruned(spans=spans, traces=traces, scores=scores)

    def _drop_days(self, conn: psycopg.Connection[Any], cut_ns: int) -> int:
        from psycopg import sql

        dropped = 0
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))
            for name, bound in conn.execute(self._q["partitions"], (self.schema,)).fetchall():
                upper = _UPPER.search(bound or "")
                if upper is None or int(upper.group(1)) > cut_ns:
                    continue
                table = sql.SQL("{}.{}").format(sql.Identifier(self.schema),
                                                sql.Identifier(name))
                row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
                dropped += int(row[0]) if row else 0
                conn.execute(sql.SQL("DROP TABLE {}").format(table))
        self._partitions = {d for d in self._partitions if (d + 1) * DAY_NS > cut_ns}
        return dropped

    def _chunks(self, conn: psycopg.Connection[Any], query: str, params: tuple[Any, ...]) -> int:
        removed = 0
        while True:
            n = conn.execute(self._q[query], params).rowcount
            removed += max(0, n)
            if n < _PRUNE_CHUNK:
                return removed

    def close(self) -> None:
        """Nothing of its own to release: the backend owns the pool."""
