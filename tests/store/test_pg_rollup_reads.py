"""What PostgreSQL's roll-up reads cost stays small: the page ranges of ``events_xact``
(the transaction watermark's BRIN index) get their summaries from the fold, so that
``xact >= covered`` reads only the rows written since, not every partition's last pages."""

from __future__ import annotations

import random
from typing import Any

import pytest

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
        assert store.series(by="task_type", window="day")  # folds, then summarizes
        assert _unsummarized(backend) == 0


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
