"""What the roll-up reads cost stays small: on PostgreSQL the page ranges of ``events_xact``
(the transaction watermark's BRIN index) get their summaries from the fold, so that
``xact >= covered`` reads only the rows written since, not every partition's last pages; on
both backends daily and weekly series read their whole days from ``learn_rollup_day``."""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

import _services
import closedloop as cl

from .test_learn_rollup import T0, _at, _record


def _unsummarized(backend: Any) -> int:
    """How many page ranges of ``events_xact`` had no summary (summarizing them)."""
    from closedloop.store.postgres import _rollup

    with backend.pool().connection() as conn:
        return _rollup.summarize(conn, backend.schema)


def test_a_fold_summarizes_the_watermarks_page_ranges(pg_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from closedloop.store.postgres import _rollup

    monkeypatch.setattr(_rollup, "REFRESH_ROWS", 1)
    rng = random.Random(2)
    day = [_at(T0 + i * 8.0, rng, i) for i in range(10_000)]  # one partition, ~200 pages
    with cl.open_store(pg_url) as store:
        backend: Any = store.backend
        _record(store, day[:100])  # the first range: summarized from the empty partition on
        assert store.series(by="task_type", window="day")
        assert _unsummarized(backend) == 0
        _record(store, day[100:5000])
        assert _unsummarized(backend) == 1  # the second range (partial): no summary yet
        _record(store, day[5000:])
        _settled(backend)
        assert store.series(by="task_type", window="day")  # folds, then summarizes
        assert _unsummarized(backend) == 0


def _settled(backend: Any) -> None:
    """Wait until every transaction that wrote a row has ended in the cluster's eyes (the
    tests of other processes may hold the snapshot's xmin back: then nothing can be
    folded)."""
    with backend.pool().connection() as conn:
        newest = conn.execute(f'SELECT max(xact) FROM "{backend.schema}".events').fetchone()
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            xmin = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
                                ).fetchone()
            if xmin is not None and newest is not None and xmin[0] > newest[0]:
                return
            time.sleep(0.2)
    _services.unavailable("a transaction elsewhere in the cluster holds the watermark back")


def test_rolled_reads_equal_the_scan_after_summaries(pg_url: str) -> None:
    """Rows written into summarized ranges after the fold widen those summaries (the
    inserts keep them): a read finds them among the rows the roll-up does not cover."""
    from closedloop.store import series_events
    from closedloop.store._learn import Dimension

    from .test_learn_queries import _same_cells

    rng = random.Random(3)
    events = [_at(T0 + i * 600.0, rng, i) for i in range(200)]
    with cl.open_store(pg_url) as store:
        _record(store, events)
        store.series(by="task_type", window="day")
        late = [_at(T0 + i * 611.0 + 1.0, rng, 200 + i) for i in range(20)]
        _record(store, late)  # fewer than REFRESH_ROWS: read from the events
        events += late
        _same_cells(store.series(by="task_type", window="day"),
                    series_events(events, Dimension("task_type"), "day"))


def test_daily_and_weekly_series_read_whole_days_from_the_days_table(pg_url: str) -> None:
    """With the hourly rows of the whole days gone, a daily or weekly series still equals
    the scan: those days were read from ``learn_rollup_day`` (the edge hours, kept, from
    ``learn_rollup``); an hourly series reads the hours (and so misses them)."""
    rng = random.Random(4)
    events = [_at(T0 + i * 1000.0 + 0.5, rng, i) for i in range(400)]  # ~4.6 days
    with cl.open_store(pg_url) as store:
        _record(store, events)
        backend: Any = store.backend
        _settled(backend)
        for by in ("task_type", "label:tier"):
            store.series(by=by, window="day")  # starts the roll-up of each (days included)
        first = int(T0 // 86400) + 1
        with backend.pool().connection() as conn:
            gone = conn.execute(
                f'DELETE FROM "{backend.schema}".learn_rollup WHERE hour >= %s AND hour < %s',
                (first * 24, (first + 3) * 24)).rowcount
            assert gone > 0
    _days_answer(pg_url, events)


def test_sqlite_daily_and_weekly_series_read_whole_days_from_the_days_table(
        tmp_path: Path) -> None:
    """SQLite's ``learn_rollup_day``, as PostgreSQL's: with the hourly rows of the whole
    days gone, daily and weekly series and steps per period still equal the scan."""
    rng = random.Random(5)
    events = [_at(T0 + i * 1000.0 + 0.5, rng, i) for i in range(400)]
    path = tmp_path / "days.db"
    with cl.open_store(f"sqlite:///{path}") as store:
        _record(store, events)
        for by in ("task_type", "label:tier"):
            store.series(by=by, window="day")  # starts the roll-up of each (days included)
    first = int(T0 // 86400) + 1
    conn = sqlite3.connect(path)
    with conn:
        assert conn.execute("DELETE FROM learn_rollup WHERE hour >= ? AND hour < ?",
                            (first * 24, (first + 3) * 24)).rowcount > 0
    conn.close()
    _days_answer(f"sqlite:///{path}", events)


def _days_answer(url: str, events: list[cl.StepEvent]) -> None:
    """Daily and weekly series and steps per period equal the scan; hourly ones do not (the
    hours of the whole days are gone)."""
    from closedloop.store import parse_dimension, period_steps_events, series_events

    from .test_learn_queries import _same_cells

    since, until = T0 + 7200.0, T0 + 4 * 86400.0 + 3600.0
    chosen = [e for e in events if since <= e.ts < until]
    with cl.open_store(url, read_only=True, create=False) as reader:
        for by in ("task_type", "label:tier"):
            for window in ("day", "week"):
                _same_cells(reader.series(by=by, window=window, since=since, until=until),
                            series_events(chosen, parse_dimension(by), window))
                assert reader.period_steps(window=window, since=since, until=until) == \
                    period_steps_events(chosen, window)
        hours = reader.series(by="task_type", window="hour", since=since, until=until)
        assert sum(c.steps for c in hours) < len(chosen)
