"""The learning layer's aggregations (:mod:`closedloop.store._learn`) in PostgreSQL.

Each is one grouped query in a REPEATABLE READ, READ ONLY transaction; the server hashes the
groups and spreads the scan over its parallel workers (the time filter prunes day
partitions). Expressions are spelled to give exactly what SQLite and the Python pass give
(truncating casts, the same latency buckets, input sizes and periods).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from closedloop._errors import StoreError
from closedloop._figures import message_group
from closedloop.store._learn import (
    Dimension,
    ExampleKey,
    FactorCell,
    FactorMargins,
    FailureCell,
    SeriesCell,
    cells_from_rows,
    check_window,
    factor_cells_from_rows,
    factor_rows_sql,
    failure_cells_from_rows,
    margins_from_rows,
)
from closedloop.store._query import StepFilter
from closedloop.store.postgres import _rollup
from closedloop.store.postgres._backend import _one_line
from closedloop.store.postgres._query import _and, _table

if TYPE_CHECKING:
    import psycopg

    from closedloop.store.postgres._backend import PostgresBackend

_T = TypeVar("_T")
BUCKET = _rollup.BUCKET
":func:`~closedloop.store._learn.latency_bucket` in SQL."
SIZE = _rollup.SIZE
_FAILED = _rollup.FAILED
_REFUSED = _rollup.REFUSED
_SUMS = _rollup.SERIES_SUMS


def _period(window: str) -> str:
    length, offset = check_window(window)
    return f"trunc((ts - {offset!r}) / {length!r})::bigint"


def _read(backend: PostgresBackend, work: Callable[[psycopg.Connection[Any], str], _T]
          ) -> _T | None:
    """``work(conn, table)`` in one read-only snapshot; None when the schema predates the
    queries (no ``error_group`` column)."""
    import psycopg

    table = _table(backend)
    try:
        with backend.pool().connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            ready = conn.execute(
                "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                "AND attname = 'error_group' AND NOT attisdropped", (table,)).fetchone()
            if ready is None:
                return None
            # The planner cannot know how few groups these expressions make (hours, buckets,
            # labels): it expects one per row and sorts every row to group them, 4-5x slower
            # than hashing the few groups in memory; and, expecting a costly query, compiles
            # its expressions (JIT), which took longer than it saved (0.36 s of 3.3 s).
            conn.execute("SET LOCAL enable_sort = off")
            conn.execute("SET LOCAL work_mem = '64MB'")
            conn.execute("SET LOCAL jit = off")
            return work(conn, table)
    except psycopg.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {_one_line(exc)}") from None


def _grouped(backend: PostgresBackend, where: StepFilter, select: str, *extra: str,
             params: Sequence[Any] = (), groups: int) -> list[Any] | None:
    def work(conn: psycopg.Connection[Any], table: str) -> list[Any]:
        sql, values = _and(where)
        terms = "".join(f" AND {t}" for t in extra)
        return conn.execute(
            f"SELECT {select} FROM {table} WHERE TRUE{terms}{sql} GROUP BY "
            f"{', '.join(str(i) for i in range(1, groups + 1))}", [*params, *values]).fetchall()

    return _read(backend, work)


def _plain(where: StepFilter) -> bool:
    """True when ``where`` filters by time and task type only (what the roll-up keeps)."""
    return where == StepFilter(since=where.since, until=where.until,
                               task_type=where.task_type)


def _rolled(backend: PostgresBackend, where: StepFilter, dim: str, select: str, *extra: str,
            params: Sequence[Any] = (), groups: int,
            read: Callable[[psycopg.Connection[Any], str, tuple[int, int]], list[Any]]
            ) -> list[Any] | None:
    """``SELECT {select} FROM events WHERE … GROUP BY 1..groups`` over ``where``'s steps,
    the whole hours ``dim``'s roll-up covers (:mod:`closedloop.store.postgres._rollup`)
    read from it by ``read(conn, schema, hours)`` instead; a writable handle first folds
    the new rows into it (starting it)."""
    if not _plain(where):
        return _grouped(backend, where, select, *extra, params=params, groups=groups)
    if not backend.read_only:
        _fold(backend, dim)

    def work(conn: psycopg.Connection[Any], table: str) -> list[Any]:
        sql, values = _and(where)

        def run(terms: Sequence[str], more: Sequence[Any]) -> list[Any]:
            also = "".join(f" AND {t}" for t in (*extra, *terms))
            return conn.execute(
                f"SELECT {select} FROM {table} WHERE TRUE{also}{sql} GROUP BY "
                f"{', '.join(str(i) for i in range(1, groups + 1))}",
                [*params, *more, *values]).fetchall()

        return _rollup.rolled(conn, backend.schema, dim, since=where.since, until=where.until,
                              run=run, read=lambda span: read(conn, backend.schema, span))

    return _read(backend, work)


def _fold(backend: PostgresBackend, dim: str) -> None:
    import psycopg

    try:
        with backend.pool().connection() as conn:
            _rollup.refresh(conn, backend.schema, dim)
    except psycopg.Error as exc:
        raise StoreError(f"cannot update the roll-up of store {backend.url}: "
                         f"{_one_line(exc)}") from None


def series(backend: PostgresBackend, where: StepFilter, *, by: Dimension,
           window: str) -> list[SeriesCell] | None:
    """Per value of ``by`` and period: the figures of :class:`SeriesCell` (the whole hours
    the roll-up covers from it)."""
    value, params = (("labels ->> %s", [by.label]) if by.column == "label"
                     else (by.column, []))
    rows = _rolled(backend, where, str(by), f"{value}, {_period(window)}, {BUCKET}, {_SUMS}",
                   params=params, groups=3,
                   read=lambda conn, schema, span: _rollup.series_rows(
                       conn, schema, str(by), window, span=span, task_type=where.task_type))
    return None if rows is None else cells_from_rows(rows)


def factor_counts(backend: PostgresBackend, where: StepFilter) -> list[FactorCell] | None:
    """Steps and failures per model, versions, labels, hour of day and input size."""
    rows = _grouped(
        backend, where, "model, agent_version, prompt_version, labels::text, "
        f"{_rollup.HOUR_OF_DAY}, {SIZE}, count(*), count(*) FILTER (WHERE "
        f"{_FAILED})", f"NOT {_REFUSED}", groups=6)
    return None if rows is None else factor_cells_from_rows(rows)


def factor_margins(backend: PostgresBackend, where: StepFilter) -> FactorMargins | None:
    """Steps and failures per value of each factor alone: the roll-up's whole hours, the
    rest counted from the events."""
    if not _plain(where):
        return None
    if not backend.read_only:
        _fold(backend, _rollup.FACTORS)

    def work(conn: psycopg.Connection[Any], table: str) -> list[Any]:
        sql, values = _and(where)

        def run(terms: Sequence[str], more: Sequence[Any]) -> list[Any]:
            also = "".join(f" AND {t}" for t in terms)
            return conn.execute(factor_rows_sql(_rollup.factor_select(table, f"{also}{sql}")),
                                [*more, *values]).fetchall()

        return _rollup.rolled(conn, backend.schema, _rollup.FACTORS, since=where.since,
                              until=where.until, run=run,
                              read=lambda span: _rollup.factor_rows(
                                  conn, backend.schema, span, where.task_type))

    rows = _read(backend, work)
    return None if rows is None else margins_from_rows(rows)


def failure_counts(backend: PostgresBackend, where: StepFilter, *,
                   window: str) -> list[FailureCell] | None:
    """Failed steps per error type, message group, task type, model and period (the whole
    hours the roll-up covers from it); steps stored before messages were grouped are
    grouped here (Python)."""
    period = _period(window)
    rows = _rolled(backend, where, _rollup.FAILURES,
                   f"coalesce(error_type, ''), coalesce(error_group, ''), task_type, model, "
                   f"{period}, count(*), min(ts), max(ts)", _rollup.GROUPED_FAILURE, groups=5,
                   read=lambda conn, schema, span: _rollup.failure_rows(
                       conn, schema, window, span, where.task_type))
    if rows is None:
        return None

    def legacy(conn: psycopg.Connection[Any], table: str) -> list[Any]:
        sql, values = _and(where)
        return [(et, message_group(m), task, model, p, 1, ts, ts)
                for et, m, task, model, p, ts in conn.execute(
                    f"SELECT error_type, error_message, task_type, model, {period}, ts FROM "
                    f"{table} WHERE error_group IS NULL AND error_message <> '' AND "
                    f"{_FAILED}{sql}", values).fetchall()]

    return failure_cells_from_rows([*rows, *(_read(backend, legacy) or [])])


def failure_examples(backend: PostgresBackend, where: StepFilter, keys: Sequence[ExampleKey],
                     *, per_key: int) -> dict[ExampleKey, list[tuple[float, str]]] | None:
    """The newest ``per_key`` ``(ts, trace_id)`` of each key's failed steps, one statement."""
    def work(conn: psycopg.Connection[Any], table: str
             ) -> dict[ExampleKey, list[tuple[float, str]]]:
        out: dict[ExampleKey, list[tuple[float, str]]] = {k: [] for k in keys}
        sql, values = _and(where)
        grouped = [k for k in keys if k[2]]
        plain = [k for k in keys if not k[2]]
        rows: list[Any] = []
        if grouped:  # by seek on events_groups
            rows += conn.execute(
                "SELECT v.t, v.et, v.eg, e.ts, e.trace_id FROM unnest(%s::text[], %s::text[], "
                "%s::text[]) AS v(t, et, eg) CROSS JOIN LATERAL (SELECT ts, trace_id FROM "
                f"{table} WHERE task_type = v.t AND (error_type = v.et OR v.et = '' AND "
                "error_type IS NULL) AND error_group = v.eg AND "
                f"{_FAILED}{sql} ORDER BY ts DESC LIMIT %s) AS e",
                [[k[0] for k in grouped], [k[1] for k in grouped], [k[2] for k in grouped],
                 *values, per_key]).fetchall()
        if plain:  # failures without a message: back through events_task
            rows += conn.execute(
                "SELECT v.t, v.et, '', e.ts, e.trace_id FROM unnest(%s::text[], %s::text[]) "
                "AS v(t, et) CROSS JOIN LATERAL (SELECT ts, trace_id FROM "
                f"{table} WHERE task_type = v.t AND coalesce(error_type, '') = v.et AND "
                "error_group IS NULL AND coalesce(error_message, '') = '' AND "
                f"{_FAILED}{sql} ORDER BY ts DESC LIMIT %s) AS e",
                [[k[0] for k in plain], [k[1] for k in plain], *values, per_key]).fetchall()
        for t, et, eg, ts, trace in rows:
            out[t, et, eg].append((ts, trace))
        return {k: sorted(v, reverse=True) for k, v in out.items()}

    return _read(backend, work)


def period_steps(backend: PostgresBackend, where: StepFilter, *,
                 window: str) -> dict[int, int] | None:
    """Steps per period (the whole hours the roll-up covers from it)."""
    rows = _rolled(backend, where, "task_type", f"{_period(window)}, count(*)", groups=1,
                   read=lambda conn, schema, span: _rollup.period_rows(
                       conn, schema, window, span, where.task_type))
    if rows is None:
        return None
    out: dict[int, int] = {}
    for p, n in rows:
        out[int(p)] = out.get(int(p), 0) + int(n)
    return out


def fold_rollups(backend: PostgresBackend) -> int:
    """Fold the rows committed since into every roll-up (the trends' by task type, the
    failure clusters', the factors' and each one a query started), each when enough rows
    wait and no other process is folding it; how many it folded. What
    :class:`~closedloop.store._keeper.RollupKeeper` runs, so that read-only readers (the CLI)
    find them current."""
    import psycopg

    schema = backend.schema
    folded = 0
    try:
        with backend.pool().connection() as conn:
            found = conn.execute("SELECT to_regclass(%s)",
                                 (f'"{schema}".learn_rollup_state',)).fetchone()
            if found is None or found[0] is None:
                return 0  # a schema from before the roll-up
            started = [r[0] for r in conn.execute(
                f'SELECT dim FROM "{schema}".learn_rollup_state').fetchall()]
            for dim in dict.fromkeys(["task_type", _rollup.FAILURES, _rollup.FACTORS,
                                      *started]):
                folded += bool(_rollup.refresh(conn, schema, dim))
    except psycopg.Error as exc:
        raise StoreError(f"cannot update the roll-ups of store {backend.url}: "
                         f"{_one_line(exc)}") from None
    return folded
