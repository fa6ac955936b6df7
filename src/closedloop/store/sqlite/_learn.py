"""The learning layer's aggregations (:mod:`closedloop.store._learn`) in SQLite.

Each is one grouped query. SQLite groups by sorting, and the columns these queries group by
(model, versions, labels, periods) are in no index: a query reads the table, and over most
of the store it is split in two halves by rowid, read at once on two connections (sqlite3
runs a query without the GIL), each half in chunks of :data:`_CHUNK` rows (smaller sorts),
the rows of every chunk added up in Python. A time window holding
less than 1/8 of the rows is read through ``events_ts`` instead, on one connection. Each
half reads one snapshot of its own; since halves never share a row, a step written between
the two snapshots is counted at most once (in the second half, or not at all).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from closedloop._errors import StoreError
from closedloop.store._learn import (
    FAILURE_OUTCOMES,
    REFUSAL_OUTCOMES,
    WINDOW_OFFSETS,
    WINDOWS,
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
    latency_bucket_sql,
    margins_from_rows,
    series_sums,
)
from closedloop.store._query import StepFilter
from closedloop.store.sqlite import _rollup
from closedloop.store.sqlite._query import _and, _where

if TYPE_CHECKING:
    from closedloop.store.sqlite._backend import SQLiteBackend

_T = TypeVar("_T")
_NARROW = 8
_CHUNK = 32_768
"""Rows per grouped query over the table (by rowid)."""
_MMAP_BYTES = 256 << 20
BUCKET = latency_bucket_sql()
":func:`~closedloop.store._learn.latency_bucket` in SQL."
SIZE = _rollup.SIZE
""":func:`~closedloop.store._learn.size_code` in SQLite."""
_FAILED = f"outcome IN ({', '.join(repr(o) for o in FAILURE_OUTCOMES)})"
_REFUSED = f"outcome IN ({', '.join(repr(o) for o in REFUSAL_OUTCOMES)})"
_SUMS = series_sums("outcome = 'succeeded'", _FAILED,
                    "validation_passed IS NOT NULL AND attempts > 1")
_NEEDED = frozenset({"model", "labels", "cost_usd", "error_group"})


def _period(window: str) -> str:
    length, offset = check_window(window)
    return f"CAST((ts - {offset!r}) / {length!r} AS INTEGER)"


def _connect(backend: SQLiteBackend) -> sqlite3.Connection:
    conn = backend._reader()
    conn.execute(f"PRAGMA mmap_size = {_MMAP_BYTES}")
    return conn


def _ready(conn: sqlite3.Connection) -> bool:
    return _NEEDED.issubset(r[1] for r in conn.execute("PRAGMA table_info(events)"))


def _runner(where: StepFilter, select: str, *extra: str, params: Sequence[Any] = (),
            groups: int) -> Callable[..., list[Any]]:
    """``run(conn, index, *terms, more=...)``: ``SELECT {select} FROM events {index} WHERE
    … GROUP BY 1..groups`` with ``terms`` (their values ``more``) added to ``where``."""
    def run(conn: sqlite3.Connection, index: str, *terms: str,
            more: Sequence[Any] = ()) -> list[Any]:
        sql, values = _where(where, *extra, *terms)
        return conn.execute(
            f"SELECT {select} FROM events {index}{sql} GROUP BY "
            f"{', '.join(str(i) for i in range(1, groups + 1))}",
            [*params, *more, *values]).fetchall()

    return run


def _grouped(backend: SQLiteBackend, where: StepFilter, select: str, *extra: str,
             params: Sequence[Any] = (), groups: int) -> list[Any] | None:
    """``SELECT {select} FROM events WHERE … GROUP BY 1..groups`` over the store, in two
    halves read at once (see the module's docstring); None for a store too old."""
    run = _runner(where, select, *extra, params=params, groups=groups)
    return _read(backend, lambda conn, other: _split(conn, other, where, run))


def _split(conn: sqlite3.Connection, other: Callable[[], sqlite3.Connection],
           where: StepFilter, run: Callable[..., list[Any]]) -> list[Any]:
    if _narrow(conn, where):
        return run(conn, "INDEXED BY events_ts")
    top = conn.execute("SELECT max(rowid) FROM events").fetchone()[0]
    return [] if top is None else _halves(conn, other, run, 0, int(top))


def _halves(conn: sqlite3.Connection, other: Callable[[], sqlite3.Connection],
            run: Callable[..., list[Any]], low: int, top: int) -> list[Any]:
    """``run`` over the rows ``low < rowid <= top``: two halves at once, in chunks."""
    def chunks(c: sqlite3.Connection, low: int, high: int) -> list[Any]:
        # SQLite sorts the rows of a GROUP BY: many small sorts cost less than one large one
        # (a million rows: 1.8 s of CPU in chunks of 20,000 rows against 2.8 s in one)
        rows: list[Any] = []
        for start in range(low, high, _CHUNK):
            rows += run(c, "NOT INDEXED", "rowid > ?", "rowid <= ?",
                        more=[start, min(start + _CHUNK, high)])
        return rows

    if top - low <= _CHUNK:
        return chunks(conn, low, top)
    middle = (low + top) // 2
    second = other()
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(chunks, second, middle, top)
        rows = chunks(conn, low, middle)
        return rows + later.result()


def _rolled(backend: SQLiteBackend, where: StepFilter, dim: str, *,
            run: Callable[..., list[Any]],
            rolled: Callable[[sqlite3.Connection, tuple[int, int]], list[Any]],
            whole: Callable[[sqlite3.Connection, Callable[[], sqlite3.Connection]],
                            list[Any]] | None = None) -> list[Any] | None:
    """The rows of ``run`` over ``where``'s steps, the whole hours ``dim``'s roll-up covers
    (:mod:`closedloop.store.sqlite._rollup`) read from it by ``rolled(conn, hours)``
    instead (without one: ``whole(conn, other)``, by default every row); a writable handle
    first folds new rows into the roll-up (starting it)."""
    if not backend.read_only:
        with backend._maintenance("update the roll-up of") as conn:
            _rollup.refresh(conn, dim)

    def work(conn: sqlite3.Connection, other: Callable[[], sqlite3.Connection]) -> list[Any]:
        found = _rollup.state(conn, dim)
        span = None if found is None or not found.usable else _rollup.hours(
            where.since, where.until, found.floor)
        if found is None or span is None:
            return (whole or (lambda c, o: _split(c, o, where, run)))(conn, other)
        low, high = span[0] * 3600.0, span[1] * 3600.0
        rows = rolled(conn, span)
        # the edges and the hours below the floor, then the rows written since
        rows += run(conn, "INDEXED BY events_ts", "ts < ?", more=[low])
        rows += run(conn, "INDEXED BY events_ts", "ts >= ?", more=[high])
        top = conn.execute("SELECT max(rowid) FROM events").fetchone()[0] or 0

        def inside(c: sqlite3.Connection, index: str, *terms: str,
                   more: Sequence[Any] = ()) -> list[Any]:
            return run(c, index, *terms, "ts >= ?", "ts < ?", more=[*more, low, high])

        return rows + _halves(conn, other, inside, found.covered, int(top))

    return _read(backend, work)


def _narrow(conn: sqlite3.Connection, where: StepFilter) -> bool:
    """True when the time window holds less than 1/_NARROW of the rows."""
    if where.since is None and where.until is None:
        return False
    low = conn.execute("SELECT min(ts) FROM events").fetchone()[0]
    high = conn.execute("SELECT max(ts) FROM events").fetchone()[0]
    if low is None or ((where.since is None or where.since <= low)
                       and (where.until is None or where.until > high)):
        return False  # the window holds every row
    total = conn.execute("SELECT count(*) FROM events INDEXED BY events_ts").fetchone()[0]
    sql, params = _where(StepFilter(since=where.since, until=where.until))
    inside = conn.execute(f"SELECT count(*) FROM events INDEXED BY events_ts{sql}",
                          params).fetchone()[0]
    return bool(inside * _NARROW < total)


def _read(backend: SQLiteBackend,
          work: Callable[[sqlite3.Connection, Callable[[], sqlite3.Connection]], _T]
          ) -> _T | None:
    """``work(conn, other)`` in a read transaction; ``other()`` opens a second connection
    (closed afterwards). None when the schema predates the queries."""
    opened: list[sqlite3.Connection] = []

    def other() -> sqlite3.Connection:
        conn = _connect(backend)
        opened.append(conn)
        conn.execute("BEGIN")
        return conn

    try:
        try:
            conn = other()
            if not _ready(conn):
                return None
            return work(conn, other)
        finally:
            for conn in opened:
                conn.close()
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read store {backend.url}: {exc}") from None


def series(backend: SQLiteBackend, where: StepFilter, *, by: Dimension,
           window: str) -> list[SeriesCell] | None:
    """Per value of ``by`` and period: the figures of :class:`SeriesCell` (the whole hours
    the roll-up covers from it)."""
    value, params = (("json_extract(labels, ?)", [f'$."{by.label}"']) if by.column == "label"
                     else (by.column, []))
    run = _runner(where, f"{value}, {_period(window)}, {BUCKET}, {_SUMS}", params=params,
                  groups=3)
    rows = _rolled(backend, where, str(by), run=run, rolled=lambda conn, span: _rollup.series_rows(
        conn, by, window, span, where.task_type))
    return None if rows is None else cells_from_rows(rows)


def factor_counts(backend: SQLiteBackend, where: StepFilter) -> list[FactorCell] | None:
    """Steps and failures per model, versions, labels, hour of day and input size."""
    rows = _grouped(
        backend, where, "model, agent_version, prompt_version, labels, "
        f"CAST(ts / 3600.0 AS INTEGER) % 24, {SIZE}, count(*), sum(CASE WHEN {_FAILED} "
        "THEN 1 END)", f"NOT {_REFUSED}", groups=6)
    return None if rows is None else factor_cells_from_rows(rows)


def factor_margins(backend: SQLiteBackend, where: StepFilter) -> FactorMargins | None:
    """Steps and failures per value of each factor alone: the roll-up's whole hours, the
    rest counted from the events."""
    def run(conn: sqlite3.Connection, index: str, *terms: str,
            more: Sequence[Any] = ()) -> list[Any]:
        sql, values = _where(where, *terms)
        return conn.execute(factor_rows_sql(_rollup.factor_select(f"{index}{sql}")),
                            [*more, *values]).fetchall()

    rows = _rolled(backend, where, _rollup.FACTORS, run=run,
                   rolled=lambda conn, span: _rollup.factor_rows(conn, span, where.task_type))
    return None if rows is None else margins_from_rows(rows)


def failure_counts(backend: SQLiteBackend, where: StepFilter, *,
                   window: str) -> list[FailureCell] | None:
    """Failed steps per error type, message group, task type, model and period; steps
    stored before messages were grouped are grouped here (Python)."""
    period = _period(window)
    run = _runner(where, f"coalesce(error_type, ''), coalesce(error_group, ''), task_type, "
                  f"model, {period}, count(*), min(ts), max(ts)", _rollup.GROUPED_FAILURE,
                  groups=5)
    rows = _rolled(backend, where, _rollup.FAILURES, run=run,
                   rolled=lambda conn, span: _rollup.failure_rows(conn, window, span,
                                                                  where.task_type))
    if rows is None:
        return None

    def legacy(conn: sqlite3.Connection, _: object) -> list[Any]:
        sql, values = _and(where)
        return _legacy(conn.execute(
            f"SELECT error_type, error_message, task_type, model, {period}, ts FROM events "
            f"INDEXED BY events_ungrouped WHERE error_group IS NULL AND error_message <> '' "
            f"AND {_FAILED}{sql}", values).fetchall())

    return failure_cells_from_rows([*rows, *(_read(backend, legacy) or [])])


def _legacy(rows: Sequence[Any]) -> list[Any]:
    from closedloop._figures import message_group

    return [(et, message_group(m), task, model, p, 1, ts, ts)
            for et, m, task, model, p, ts in rows]


def failure_examples(backend: SQLiteBackend, where: StepFilter, keys: Sequence[ExampleKey],
                     *, per_key: int) -> dict[ExampleKey, list[tuple[float, str]]] | None:
    """The newest ``per_key`` ``(ts, trace_id)`` of each key's failed steps (by seek)."""
    def work(conn: sqlite3.Connection, _: object) -> dict[ExampleKey, list[tuple[float, str]]]:
        sql, values = _and(where)
        out = {}
        for task, error_type, group in keys:
            kind = "error_type = ?" if error_type else "(error_type IS NULL OR error_type = ?)"
            if group:
                query = (f"SELECT ts, trace_id FROM events INDEXED BY events_groups WHERE "
                         f"task_type = ? AND {kind} AND error_group = ? AND {_FAILED}{sql} "
                         "ORDER BY ts DESC, rowid DESC LIMIT ?")
                args = [task, error_type, group, *values, per_key]
            else:
                query = (f"SELECT ts, trace_id FROM events INDEXED BY events_ts WHERE "
                         f"task_type = ? AND {kind} AND error_group IS NULL AND "
                         f"coalesce(error_message, '') = '' AND {_FAILED}{sql} "
                         "ORDER BY ts DESC, rowid DESC LIMIT ?")
                args = [task, error_type, *values, per_key]
            out[task, error_type, group] = sorted(
                ((r[0], r[1]) for r in conn.execute(query, args).fetchall()), reverse=True)
        return out

    return _read(backend, work)


def period_steps(backend: SQLiteBackend, where: StepFilter, *,
                 window: str) -> dict[int, int] | None:
    """Steps per period: the roll-up's whole hours, the rest counted on the indexes."""
    if where.outcome is not None or where.error_type is not None:
        rows = _grouped(backend, where, f"{_period(window)}, count(*)", groups=1)
        return None if rows is None else _summed(rows)
    run = _runner(where, f"{_period(window)}, count(*)", groups=1)
    rows = _rolled(backend, where, "task_type", run=run,
                   rolled=lambda conn, span: _rollup.period_rows(conn, window, span,
                                                                 where.task_type),
                   whole=lambda conn, other: _counted(conn, other, where, window, run))
    return None if rows is None else _summed(rows)


def _counted(conn: sqlite3.Connection, other: Callable[[], sqlite3.Connection],
             where: StepFilter, window: str, run: Callable[..., list[Any]]) -> list[Any]:
    """Steps per period without the roll-up: counted on the time index, one range per
    period (of one task type: grouped on ``events_latency``, which holds its times in
    order); grouped by ``run`` over every row when some step is older than 1970-01-12
    (before that a period is not one range: its index is truncated toward zero)."""
    length, offset = WINDOWS[window], WINDOW_OFFSETS[window]
    if where.task_type is not None:
        sql, values = _where(where)
        return conn.execute(
            f"SELECT {_period(window)}, count(*) FROM events INDEXED BY events_latency"
            f"{sql} GROUP BY 1", values).fetchall()
    low = conn.execute("SELECT min(ts) FROM events").fetchone()[0]
    high = conn.execute("SELECT max(ts) FROM events").fetchone()[0]
    if low is None:
        return []
    if low < WINDOWS["week"] + WINDOW_OFFSETS["week"]:
        return _split(conn, other, where, run)
    low = max(low, where.since) if where.since is not None else low
    high = min(high, where.until) if where.until is not None else high
    out = []
    for p in range(int((low - offset) / length), int((high - offset) / length) + 1):
        start, end = p * length + offset, (p + 1) * length + offset
        if where.since is not None:
            start = max(start, where.since)
        if where.until is not None:
            end = min(end, where.until)
        n = conn.execute("SELECT count(*) FROM events INDEXED BY events_ts WHERE "
                         "ts >= ? AND ts < ?", [start, end]).fetchone()[0]
        if n:
            out.append((p, int(n)))
    return out


def _summed(rows: Sequence[Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for p, n in rows:
        out[int(p)] = out.get(int(p), 0) + int(n)
    return out


def fold_rollups(backend: SQLiteBackend) -> int:
    """Fold the rows written since into every roll-up (the trends' by task type, the
    failure clusters', the factors' and each one a query started), each when enough rows
    wait (:data:`~closedloop.store.sqlite._rollup.REFRESH_ROWS`); how many it folded. What
    :class:`~closedloop.store._keeper.RollupKeeper` runs, so that read-only readers (the CLI)
    find them current."""
    folded = 0
    with backend._maintenance("update the roll-ups of") as conn:
        try:
            started = [r[0] for r in conn.execute("SELECT dim FROM learn_rollup_state")]
        except sqlite3.OperationalError:  # a store from before the roll-up
            return 0
        for dim in dict.fromkeys(["task_type", _rollup.FAILURES, _rollup.FACTORS, *started]):
            folded += bool(_rollup.refresh(conn, dim))
    return folded
