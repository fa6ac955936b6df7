"""The hourly roll-up of the learning layer (SQLite and PostgreSQL): what trends, failure
clusters and factors read from it equals the scan (the Python pass over the same events),
whatever was rolled up when: events written after it (late ones, for hours it already
covers), pruned by retention, renumbered by VACUUM, windows cutting hours, timestamps at a
hair of an hour's boundary; on PostgreSQL, writers whose transactions commit out of order.
"""

from __future__ import annotations

import math
import random
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import closedloop as cl
from closedloop.store import (
    Dimension,
    Store,
    factor_events,
    failure_events,
    margins_of_cells,
    parse_dimension,
    period_steps_events,
)
from closedloop.store import series_events as scan
from closedloop.store.sqlite import _rollup

from .conftest import PG_URL, _pg_admin
from .test_learn_queries import _same_cells, step

T0 = 1_790_000_000.0 - 1_790_000_000.0 % 3600  # an hour's start
MAX_PERIODS = 10_000  # a series' longest span (closedloop.store._learn)
DIMENSIONS = ("task_type", "model", "agent_version", "prompt_version", "label:tier",
              "label:region")


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writable query folds new rows in, a few rows a transaction."""
    monkeypatch.setattr(_rollup, "REFRESH_ROWS", 1)
    monkeypatch.setattr(_rollup, "CHUNK", 7)
    try:
        from closedloop.store.postgres import _rollup as pg_rollup
    except ImportError:  # pragma: no cover - without the postgres extra
        return
    monkeypatch.setattr(pg_rollup, "REFRESH_ROWS", 1)


@contextmanager
def _fresh(kind: str) -> Iterator[str]:
    """A new store's URL of ``kind``, removed afterwards (one per hypothesis example)."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{Path(tmp) / 'rollup.db'}"
        return
    admin = _pg_admin()
    name = f"closedloop_test_{uuid.uuid4().hex[:12]}"
    try:
        yield f"{PG_URL}?schema={name}"
    finally:
        admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        admin.close()


def _at(ts: float, rng: random.Random, i: int) -> cl.StepEvent:
    return step(i, rng)._replace(ts=ts, trace_id=f"{i:032x}")


def _times(draw: Any, n: int) -> list[float]:
    hours = st.integers(0, 60)
    near = st.sampled_from((0.0, 1e-9, -1e-9, 1799.5, 3599.999999))
    out = []
    for _ in range(n):
        h, d = draw(hours), draw(near)
        ts = T0 + h * 3600.0 + d
        if d == 0.0 and draw(st.booleans()):
            ts = math.nextafter(ts, -math.inf)  # an ulp before the hour
        out.append(ts)
    return out


@st.composite
def histories(draw: Any) -> dict[str, Any]:
    batches = [_times(draw, draw(st.integers(0, 25))) for _ in range(draw(st.integers(1, 4)))]
    # 1970, below the floor (not within 1e-6 s of 0: PostgreSQL refuses a division of such
    # a time by 3600 that underflows to 0, in the scan as in the roll-up)
    early = draw(st.lists(st.just(0.0) | st.floats(1e-6, 1_300_000.0), max_size=3))
    return {"batches": [*batches[:-1], batches[-1] + early],
            "refresh": draw(st.lists(st.booleans(), min_size=4, max_size=4)),
            "prune": draw(st.none() | st.integers(0, 60).map(lambda h: T0 + h * 3600.0 + 7.5)),
            "after": _times(draw, draw(st.integers(0, 10))),
            "seed": draw(st.integers(0, 1000))}


def _record(store: Store, events: list[cl.StepEvent]) -> None:
    for e in events:
        store.record(e)
    assert store.flush()


def _refresh(store: Store) -> None:
    """A query through a writable handle folds the new rows into its roll-up."""
    store.period_steps()
    store.failure_counts()
    store.series(by="label:tier", window="week")
    store.factor_margins()


def _check(store: Store, events: list[cl.StepEvent], rng: random.Random) -> None:
    for _ in range(3):
        by, window = rng.choice(DIMENSIONS), rng.choice(("hour", "day", "week"))
        since = rng.choice([None, T0 + rng.choice([0.0, 3600.0, 5000.5, 1e-9])])
        until = rng.choice([None, T0 + rng.choice([7200.0, 86400.0, 40.5 * 3600])])
        task = rng.choice([None, "plan"])
        chosen = [e for e in events if (since is None or e.ts >= since)
                  and (until is None or e.ts < until) and (task is None or e.task_type == task)]
        want = scan(chosen, parse_dimension(by), window)
        periods = [c.period for c in want]
        if periods and max(periods) - min(periods) >= MAX_PERIODS:  # 1970 and now, by hour
            with pytest.raises(cl.ConfigError):
                store.series(by=by, window=window, since=since, until=until, task_type=task)
        else:
            _same_cells(store.series(by=by, window=window, since=since, until=until,
                                     task_type=task), want)
        assert store.period_steps(window=window, since=since, until=until,
                                  task_type=task) == period_steps_events(chosen, window)
        assert store.failure_counts(window=window, since=since, until=until,
                                    task_type=task) == failure_events(chosen, window)
        assert store.factor_margins(since=since, until=until, task_type=task) == \
            margins_of_cells(factor_events(chosen))


def _history(kind: str, history: dict[str, Any]) -> None:
    rng = random.Random(history["seed"])
    with _fresh(kind) as url:
        events: list[cl.StepEvent] = []
        with cl.open_store(url, batch_size=5) as store:
            for batch, refresh in zip(history["batches"], history["refresh"], strict=False):
                new = [_at(ts, rng, len(events) + i) for i, ts in enumerate(batch)]
                _record(store, new)
                events += new
                if refresh:
                    _refresh(store)
            if history["prune"] is not None:
                cl.store.prune(store, history["prune"])
                events = [e for e in events if e.ts >= _kept(kind, history["prune"])]
            late = [_at(ts, rng, len(events) + i) for i, ts in enumerate(history["after"])]
            _record(store, late)
            events += late
            with cl.open_store(url, read_only=True, create=False) as reader:
                _check(reader, events, rng)  # what is rolled up, the rest read from events
            _check(store, events, rng)  # folded in first


def _kept(kind: str, before: float) -> float:
    """The oldest time retention keeps: PostgreSQL drops whole days."""
    return before if kind == "sqlite" else math.floor(before / 86400) * 86400.0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_trends_read_from_the_rollup_equal_the_scan(history: dict[str, Any]) -> None:
    _history("sqlite", history)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_postgres_rollup_equals_the_scan(history: dict[str, Any]) -> None:
    _history("postgresql", history)


def test_a_vacuum_that_renumbers_the_rows_is_noticed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'v.db'}"
    rng = random.Random(3)
    events = [_at(T0 + i * 600.0, rng, i) for i in range(60)]
    with cl.open_store(url, batch_size=7) as store:
        _record(store, events)
        _refresh(store)
        cl.store.prune(store, T0 + 3 * 3600.0)  # a gap at the start of the rowids
        events = [e for e in events if e.ts >= T0 + 3 * 3600.0]
    conn = sqlite3.connect(tmp_path / "v.db")
    conn.execute("VACUUM")
    conn.close()
    with cl.open_store(url, read_only=True, create=False) as reader:
        _same_cells(reader.series(by="model", window="hour"),
                    scan(events, Dimension("model"), "hour"))
    with cl.open_store(url) as store:
        _same_cells(store.series(by="model", window="hour"),
                    scan(events, Dimension("model"), "hour"))


def test_the_writer_never_touches_the_rollup(tmp_path: Path) -> None:
    rng = random.Random(5)
    with cl.open_store(f"sqlite:///{tmp_path / 'w.db'}") as store:
        _record(store, [_at(T0 + i * 60.0, rng, i) for i in range(100)])
    conn = sqlite3.connect(tmp_path / "w.db")
    assert conn.execute("SELECT count(*) FROM learn_rollup").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM learn_failures").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM learn_rollup_state").fetchone()[0] == 0
    conn.close()


def _insert_copy(conn: Any, schema: str, source: str, event: cl.StepEvent) -> None:
    """Insert (in ``conn``'s open transaction) the stored row of trace ``source`` again as
    ``event`` (its ts and trace id), through the parent table as the writer does."""
    columns = [r[0] for r in conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND "
        "table_name = 'events' AND column_name <> 'xact' ORDER BY ordinal_position",
        (schema,)).fetchall()]
    picked = ", ".join("%s" if c in ("ts", "trace_id") else c for c in columns)
    values = [event.ts if c == "ts" else event.trace_id
              for c in columns if c in ("ts", "trace_id")]
    conn.execute(f'INSERT INTO "{schema}".events ({", ".join(columns)}) SELECT {picked} '
                 f'FROM "{schema}".events WHERE trace_id = %s', [*values, source])


def _equal_everywhere(store: Store, events: list[cl.StepEvent]) -> None:
    for by in ("task_type", "label:tier"):
        _same_cells(store.series(by=by, window="hour"), scan(events, parse_dimension(by),
                                                             "hour"))
    assert store.failure_counts(window="hour") == failure_events(events, "hour")
    assert store.factor_margins() == margins_of_cells(factor_events(events))
    assert store.period_steps(window="hour") == period_steps_events(events, "hour")


def test_postgres_writers_committing_out_of_order_lose_and_double_count_nothing(
        pg_url: str, pg_schema: str) -> None:
    """Transaction A inserts first and commits last: a fold in between must neither skip
    A's row for good (a watermark past B's row would) nor count B's row twice."""
    psycopg = pytest.importorskip("psycopg")
    rng = random.Random(11)
    events = [_at(T0 + i * 900.0, rng, i) for i in range(40)]
    with cl.open_store(pg_url, batch_size=7) as store:
        _record(store, events)
        _equal_everywhere(store, events)  # folds everything in
        first = events[3]._replace(ts=T0 + 2 * 3600.0 + 5.0, trace_id="a" * 32)  # late
        second = events[5]._replace(ts=T0 + 2 * 3600.0 + 6.0, trace_id="b" * 32)
        a = psycopg.connect(PG_URL)
        b = psycopg.connect(PG_URL)
        try:
            _insert_copy(a, pg_schema, events[3].trace_id, first)  # A takes its number first
            _insert_copy(b, pg_schema, events[5].trace_id, second)
            b.commit()
            events.append(second)
            _equal_everywhere(store, events)  # folds what is safe: B's row is read from events
            with cl.open_store(pg_url, read_only=True, create=False) as reader:
                _equal_everywhere(reader, events)
            a.commit()
            events.append(first)
            with cl.open_store(pg_url, read_only=True, create=False) as reader:
                _equal_everywhere(reader, events)
            _equal_everywhere(store, events)  # folds A's row, and B's once
            filler = [_at(T0 + 3 * 3600.0 + i, rng, 100 + i) for i in range(3)]
            _record(store, filler)  # later transactions: the watermark passes A and B
            events += filler
            _equal_everywhere(store, events)
            # once no older transaction is running anywhere in the server (other tests
            # share it: wait for that, bounded), the roll-up holds every row exactly once
            conn = psycopg.connect(PG_URL, autocommit=True)
            try:
                top = conn.execute(f'SELECT max(xact) FROM "{pg_schema}".events').fetchone()[0]
                for _ in range(300):
                    _equal_everywhere(store, events)
                    covered = conn.execute(f'SELECT min(covered) FROM "{pg_schema}".'
                                           "learn_rollup_state").fetchone()[0]
                    if covered > top:
                        break
                    time.sleep(0.1)
                assert covered > top, "a transaction older than the test's ran for 30 s"
                assert conn.execute(f'SELECT sum(s0) FROM "{pg_schema}".learn_rollup WHERE '
                                    "dim = 'task_type'").fetchone()[0] == len(events)
            finally:
                conn.close()
        finally:
            a.close()
            b.close()


def test_postgres_writer_never_touches_the_rollup(pg_url: str, pg_schema: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    rng = random.Random(5)
    with cl.open_store(pg_url) as store:
        _record(store, [_at(T0 + i * 60.0, rng, i) for i in range(100)])
    conn = psycopg.connect(PG_URL, autocommit=True)
    try:
        for table in ("learn_rollup", "learn_failures", "learn_factors", "learn_rollup_state"):
            assert conn.execute(f'SELECT count(*) FROM "{pg_schema}".{table}').fetchone()[0] == 0
        # each row records its transaction (the column default)
        assert conn.execute(f'SELECT count(*) FROM "{pg_schema}".events WHERE xact IS NULL'
                            ).fetchone()[0] == 0
    finally:
        conn.close()


def test_factor_margins_keep_label_values_that_json_functions_cut(shared_url: str) -> None:
    """SQLite's JSON functions end a string at an escaped NUL: the margins read the labels
    as the scan does (a hostile label value shows whole on the factors page)."""
    rng = random.Random(7)
    with cl.open_store(shared_url, batch_size=5) as store:
        _record(store, [_at(T0 + i * 700.0, rng, i)._replace(
            labels={"tier": f"v <b>\x00{i % 3}\r\u202e"}) for i in range(30)])
        stored = list(store.events())
        assert store.factor_margins() == margins_of_cells(factor_events(stored))  # folded
        late = [_at(T0 + 5.0, rng, 99)._replace(labels={"tier": "late\x00"}, outcome="failed")]
        _record(store, late)
        stored = list(store.events())
        assert store.factor_margins(since=T0 + 1.0) == margins_of_cells(factor_events(
            e for e in stored if e.ts >= T0 + 1.0))
        assert store.factor_margins() == margins_of_cells(factor_events(stored))
        assert {v for v in store.factor_margins().tables["label:tier"] if v} >= \
            {e.labels["tier"] for e in stored if e.outcome == "failed" and e.labels}
