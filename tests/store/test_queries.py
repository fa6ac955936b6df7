"""The query port on every backend: summaries computed where the events are equal the Python
pass over the same events, and step listings page through every step exactly once.

Parametrized over memory, SQLite and PostgreSQL (``any_url``), see ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.learn import build_report, report_from_store
from closedloop.store import (
    MAX_PAGE,
    EventBackend,
    EventQuery,
    EventSummary,
    MemoryBackend,
    SQLiteBackend,
    StepFilter,
    Store,
    summarize_events,
)

T0 = 1_790_000_000.0
MESSAGES = (
    "instance_matches_request: i-{id:x} is a {a}.large, requested {b}.xlarge",
    "plan_schema: [error] json_invalid at plan: trailing comma at line 1 column {n}",
    "no tag 'owner' on the plan",
    "RuntimeError: model timed out after {n} s",
    "[bold]markup[/] and «unicode» {n}",
)


def step(i: int, rng: random.Random, *, latency: float | None = None,
         task_type: str | None = None, ts: float | None = None) -> cl.StepEvent:
    """A varied step: every outcome, error type, validation state and message shape."""
    outcome = rng.choice(["succeeded", "succeeded", "failed", "failed", "error", "blocked",
                          "paused", "suggested", "escalated"])
    error = {"succeeded": None, "suggested": None, "escalated": None,
             "failed": rng.choice(["validation", "verification"]), "error": "agent",
             "blocked": "blocked", "paused": "paused"}[outcome]
    message = None
    if error is not None and rng.random() < 0.9:
        message = rng.choice(MESSAGES).format(id=rng.getrandbits(40), a=rng.choice("tmc"),
                                              b=rng.choice("tmc"), n=rng.randrange(100))
    if outcome == "escalated" and rng.random() < 0.5:
        message = "an outcome from a newer closedloop, with no error type"  # key ("", ...)
    return cl.StepEvent(
        ts=T0 + i * 1.5 if ts is None else ts, trace_id=f"{i:032x}", agent_id="a",
        task_type=task_type or rng.choice(["deploy", "plan", "review/東京"]),
        autonomy="autonomous", outcome=outcome, attempts=rng.choice([0, 1, 1, 2, 3]),
        input_tokens=rng.randrange(10_000), output_tokens=rng.randrange(2_000),
        latency_ms=rng.lognormvariate(3, 1.5) if latency is None else latency,
        validation_passed=rng.choice([None, True, False]),
        verification_passed=rng.choice([None, True, False]), error_type=error,
        error_message=message, propose_ms=1.0, validate_ms=1.0, act_ms=1.0, verify_ms=1.0,
        detail=None,
        # two in three steps priced; binary fractions, so that every backend's sum is exact
        cost_usd=None if i % 3 == 0 else (i % 7) / 1024)


def record(url: str, events: Sequence[cl.StepEvent]) -> Store:
    store = cl.open_store(url, batch_size=97)
    for e in events:
        store.record(e)
    assert store.flush()
    return store


@pytest.fixture
def varied(any_url: str) -> Iterator[Store]:
    """A store of 600 varied steps."""
    rng = random.Random(3)
    store = record(any_url, [step(i, rng) for i in range(600)])
    yield store
    store.close()


def same(got: EventSummary, want: EventSummary) -> None:
    """Equal summaries; a mean summed in SQL may differ from an exact sum in its last bits."""
    assert [r.task_type for r in got.rows] == [r.task_type for r in want.rows]
    for g, w in zip((*got.rows, got.overall), (*want.rows, want.overall), strict=True):
        mean, wanted = g.latency_mean_ms, w.latency_mean_ms
        assert (mean is None) == (wanted is None)
        if mean is not None:
            assert mean == pytest.approx(wanted, rel=1e-12)
        if g.cost_usd is not None and w.cost_usd is not None:
            assert g.cost_usd == pytest.approx(w.cost_usd, rel=1e-12)
        assert dataclasses.replace(g, latency_mean_ms=None, cost_usd=None) == \
            dataclasses.replace(w, latency_mean_ms=None, cost_usd=None)
        assert (g.cost_usd is None) == (w.cost_usd is None)


def python_pass(store: Store, where: StepFilter, top_messages: int = 3) -> EventSummary:
    events = store.events(since=where.since, until=where.until, task_type=where.task_type)
    return summarize_events((e for e in events if where.matches(e)), top_messages=top_messages)


def test_cost_and_cached_tokens_are_summed_in_sql_as_in_python(any_url: str) -> None:
    # schema v3's cost and prompt-cache figures: per task type and overall, SQL and the
    # Python pass agree; steps without a cost are not priced (a total of none is None)
    rng = random.Random(23)
    events = []
    for i in range(400):
        e = step(i, rng)
        if i % 4:
            e = e._replace(cost_usd=round(rng.uniform(0.0001, 0.05), 6),
                           cached_input_tokens=rng.randrange(0, 500))
        if e.task_type == "deploy":  # one task type never priced
            e = e._replace(cost_usd=None, cached_input_tokens=None)
        events.append(e)
    with record(any_url, events) as store:
        summary = store.summary()
        same_costs(summary, python_pass(store, StepFilter()))
        same(summary, python_pass(store, StepFilter()))
        report = report_from_store(store).to_dict()
    priced = [e for e in events if e.cost_usd is not None]
    assert summary.overall.priced == len(priced) > 0
    assert summary.overall.cost_usd == pytest.approx(sum(e.cost_usd for e in priced))
    assert summary.overall.cached_input_tokens == sum(e.cached_input_tokens or 0
                                                      for e in events)
    rows = {r["task_type"]: r for r in report["task_types"]}
    assert rows["deploy"]["cost"] == {"total_usd": None, "priced": 0,
                                      "per_success_usd": None}
    assert report["overall"]["cost"]["priced"] == len(priced)
    assert report["overall"]["tokens"]["cached_input_total"] == \
        summary.overall.cached_input_tokens


def same_costs(got: EventSummary, want: EventSummary) -> None:
    """Equal cost figures; a cost summed in SQL may differ in its last bits."""
    for g, w in zip((*got.rows, got.overall), (*want.rows, want.overall), strict=True):
        assert (g.priced, g.cached_input_tokens) == (w.priced, w.cached_input_tokens)
        assert (g.cost_usd is None) == (w.cost_usd is None)
        if g.cost_usd is not None:
            assert g.cost_usd == pytest.approx(w.cost_usd, rel=1e-12)


@pytest.mark.parametrize("top_messages", [0, 1, 3, 50])
def test_the_summary_equals_the_python_pass(varied: Store, top_messages: int) -> None:
    summary = varied.summary(top_messages=top_messages)
    same(summary, python_pass(varied, StepFilter(), top_messages))
    assert summary.overall.runs == 600
    assert len(summary.overall.messages) == min(top_messages, 50)
    assert summary.overall.outcomes["escalated"] > 0  # an outcome this version does not know


@pytest.mark.parametrize("where", [
    StepFilter(since=T0 + 300.0),
    StepFilter(since=T0 + 100.0, until=T0 + 700.0),
    StepFilter(until=T0 + 850.5),
    StepFilter(task_type="review/東京"),
    StepFilter(since=T0 + 880.0, task_type="plan"),  # a window of a few rows
    StepFilter(outcome="failed", error_type="verification"),
    StepFilter(task_type="nothing"),
], ids=repr)
def test_the_summary_of_a_window_equals_the_python_pass(varied: Store,
                                                        where: StepFilter) -> None:
    got = varied.summary(since=where.since, until=where.until, task_type=where.task_type,
                         outcome=where.outcome, error_type=where.error_type)
    same(got, python_pass(varied, where))


def test_the_report_is_the_same_whether_computed_in_the_store_or_in_python(
        varied: Store) -> None:
    # the promise: `closedloop report` prints what it printed before, on any backend
    from_store = report_from_store(varied, top_messages=5).to_dict()
    from_events = build_report(varied.events(), top_messages=5).to_dict()
    for got, want in zip([from_store["overall"], *from_store["task_types"]],
                         [from_events["overall"], *from_events["task_types"]], strict=True):
        assert got["latency"].pop("mean_ms") == pytest.approx(want["latency"].pop("mean_ms"),
                                                              rel=1e-12)
    assert json.dumps(from_store, sort_keys=True) == json.dumps(from_events, sort_keys=True)


def _latency_runs() -> list[tuple[str, list[float]]]:
    rng = random.Random(5)
    return [
        ("constant", [12.5] * 40),  # one bucket, minimum = maximum
        ("two values", [1.0] * 21 + [900.0] * 19),
        ("crowded bucket", [20.0 + i * 1e-6 for i in range(60)] + [5.0, 5000.0]),
        ("extremes", [0.0, -3.0, 1e-300, 5e-4, 0.001, 1e12, 2.5e15, 9.3e15, 1e300, 7.0]),
        ("ties", [3.0, 3.0, 3.0, 4.0, 4.0, 2.0]),
        ("one", [42.0]),
        ("spread", [rng.lognormvariate(2, 3) for _ in range(300)]),
    ]


def test_latency_percentiles_are_exact_for_any_distribution(any_url: str) -> None:
    rng = random.Random(9)
    events = [step(i, rng, latency=latency, task_type=task)
              for task, run in _latency_runs() for i, latency in enumerate(run)]
    rng.shuffle(events)
    with record(any_url, events) as store:
        got = store.summary()
        same(got, python_pass(store, StepFilter()))
    spread = next(r for r in got.rows if r.task_type == "spread")
    ordered = sorted(e.latency_ms for e in events if e.task_type == "spread")
    assert spread.latency_p50_ms == ordered[149]  # nearest rank: ceil(0.5 * 300) = 150
    assert spread.latency_p95_ms == ordered[284]


def test_message_groups_rank_by_count_then_by_code_point(any_url: str) -> None:
    rng = random.Random(1)
    texts = ["Zeta fails", "alpha fails", "Äpfel fail", "zeta fails", "_under"]
    events = [step(i, rng, task_type="t")._replace(
        outcome="failed", error_type="validation", error_message=text)
        for i, text in enumerate(t for t in texts for _ in range(2))]
    with record(any_url, events) as store:
        groups = [m.group for m in store.summary(top_messages=10).overall.messages]
    assert groups == sorted(texts)


def test_a_groups_example_is_its_most_recent_message_across_task_types(any_url: str) -> None:
    rng = random.Random(2)
    failed = [("a", "disk 1 full"), ("b", "disk 2 full"), ("a", "disk 3 full"),
              ("b", "disk 4 full")]
    events = [step(i, rng, task_type=t)._replace(
        outcome="failed", error_type="executor", error_message=m) for i, (t, m) in
        enumerate(failed)]
    with record(any_url, list(reversed(events))) as store:
        summary = store.summary()
    (overall,) = summary.overall.messages
    assert (overall.group, overall.count, overall.example) == ("disk <*> full", 4,
                                                                "disk 4 full")
    assert [r.messages[0].example for r in summary.rows] == ["disk 3 full", "disk 4 full"]


def test_an_empty_window_has_an_empty_summary(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        summary = store.summary()
    assert summary.rows == ()
    assert summary.overall.runs == 0
    assert summary.overall.latency_p50_ms is None
    assert summary.overall.first_ts is None


# ----- rows stored before the error_group column existed ------------------------------------

V2_SQLITE = """
CREATE TABLE events (ts REAL NOT NULL, trace_id TEXT NOT NULL, agent_id TEXT NOT NULL,
    task_type TEXT NOT NULL, autonomy TEXT NOT NULL, outcome TEXT NOT NULL,
    attempts INTEGER NOT NULL, input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL,
    latency_ms REAL NOT NULL, validation_passed INTEGER, verification_passed INTEGER,
    error_type TEXT, error_message TEXT, propose_ms REAL NOT NULL, validate_ms REAL NOT NULL,
    act_ms REAL NOT NULL, verify_ms REAL NOT NULL, detail TEXT);
CREATE INDEX events_ts ON events (ts);
CREATE TABLE spans (trace_id TEXT NOT NULL, span_id TEXT NOT NULL, parent_id TEXT,
    name TEXT NOT NULL, kind INTEGER NOT NULL, start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL, status INTEGER NOT NULL, status_message TEXT,
    attributes TEXT NOT NULL, events TEXT, content TEXT);
CREATE TABLE scores (ts REAL NOT NULL, trace_id TEXT NOT NULL, span_id TEXT,
    name TEXT NOT NULL, value REAL, label TEXT, comment TEXT, source TEXT NOT NULL);
PRAGMA user_version = 2;
"""


def v2_file(path: Path, events: Sequence[cl.StepEvent]) -> str:
    """A SQLite store as closedloop wrote it before migrations 3-5, holding ``events``."""
    conn = sqlite3.connect(path)
    conn.executescript(V2_SQLITE)
    conn.executemany(f"INSERT INTO events VALUES ({', '.join('?' * 19)})",
                     [e.to_row()[:19] for e in events])  # the v2 columns
    conn.commit()
    conn.close()
    return f"sqlite:///{path}"


def test_an_older_sqlite_store_migrated_groups_its_old_messages_when_read(
        tmp_path: Path) -> None:
    rng = random.Random(4)
    old = [step(i, rng) for i in range(300)]
    new = [step(i, rng) for i in range(300, 500)]
    url = v2_file(tmp_path / "v2.db", old)
    with record(url, new) as store:  # opening it migrates it
        assert isinstance(store.backend, SQLiteBackend)
        same(store.summary(top_messages=4), python_pass(store, StepFilter(), 4))
        same(store.summary(since=T0 + 400), python_pass(store, StepFilter(since=T0 + 400)))


def test_an_older_store_opened_read_only_is_summarized_in_python(tmp_path: Path) -> None:
    rng = random.Random(6)
    url = v2_file(tmp_path / "v2.db", [step(i, rng) for i in range(200)])
    with cl.open_store(url, read_only=True) as store:
        assert store.backend.summarize(StepFilter(), top_messages=3) is None  # type: ignore[attr-defined]
        same(store.summary(), python_pass(store, StepFilter()))
    conn = sqlite3.connect(tmp_path / "v2.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2  # never migrated


def test_postgres_rows_without_a_group_are_grouped_when_read(pg_url: str) -> None:
    psycopg = pytest.importorskip("psycopg")
    rng = random.Random(8)
    with record(pg_url, [step(i, rng) for i in range(300)]) as store:
        schema = pg_url.rsplit("schema=", 1)[1]
        with psycopg.connect(pg_url.split("?", maxsplit=1)[0], autocommit=True) as conn:
            conn.execute(f'UPDATE "{schema}".events SET error_group = NULL WHERE ts < %s',
                         (T0 + 200,))
        same(store.summary(top_messages=4), python_pass(store, StepFilter(), 4))


def test_the_writer_stores_each_messages_group(shared_url: str, tmp_path: Path) -> None:
    rng = random.Random(10)
    events = [step(i, rng) for i in range(50)]
    with record(shared_url, events):
        pass
    if shared_url.startswith("sqlite"):
        conn = sqlite3.connect(tmp_path / "events.db")
        rows = conn.execute("SELECT error_message, error_group FROM events").fetchall()
    else:
        psycopg = pytest.importorskip("psycopg")
        schema = shared_url.rsplit("schema=", 1)[1]
        with psycopg.connect(shared_url.split("?", maxsplit=1)[0]) as pg:
            rows = pg.execute(f'SELECT error_message, error_group FROM "{schema}".events'
                              ).fetchall()
    assert len(rows) == 50
    from closedloop.learn import message_group

    assert all(g == (message_group(m) if m else None) for m, g in rows)
    assert any(g is not None and "<*>" in g for _, g in rows)


# ----- a backend without the query port ----------------------------------------------------

class PlainBackend:
    """An event backend with only the base port (a third party's, say)."""

    url = "plain://"

    def __init__(self) -> None:
        self.inner = MemoryBackend()
        self.reads = 0

    def write_batch(self, events: Sequence[cl.StepEvent]) -> None:
        self.inner.write_batch(events)

    def iter_events(self, query: EventQuery) -> Iterator[cl.StepEvent]:
        self.reads += 1
        return self.inner.iter_events(query)

    def count(self) -> int:
        return self.inner.count()

    def close(self) -> None:
        pass


def test_a_backend_without_the_port_is_read_once_per_report() -> None:
    backend = PlainBackend()
    assert isinstance(backend, EventBackend)
    rng = random.Random(12)
    with Store(backend) as store:
        for i in range(100):
            store.record(step(i, rng))
        assert store.flush()
        report = report_from_store(store, since=T0 + 30)
        assert backend.reads == 1
        assert report.to_dict() == build_report(store.events(since=T0 + 30),
                                                since=T0 + 30).to_dict()
        first = store.steps(limit=7, task_type="plan")
        second = store.steps(limit=7, task_type="plan", cursor=first.next_cursor)
    wanted = sorted((e for e in backend.inner.iter_events(EventQuery())
                     if e.task_type == "plan"), key=lambda e: e.ts, reverse=True)
    assert [*first.steps, *second.steps] == wanted[:14]


# ----- step listings ------------------------------------------------------------------------

def all_pages(store: Store, limit: int, **where: Any) -> list[cl.StepEvent]:
    out: list[cl.StepEvent] = []
    cursor = None
    while True:
        page = store.steps(limit=limit, cursor=cursor, **where)
        assert len(page.steps) <= limit
        out.extend(page.steps)
        assert len(out) <= 1000, "the cursor does not move on"
        if page.next_cursor is None:
            return out
        assert len(page.steps) == limit
        cursor = page.next_cursor


def newest_first(events: Sequence[cl.StepEvent]) -> list[tuple[float, str]]:
    return sorted(((e.ts, e.trace_id) for e in events), reverse=True, key=lambda k: k[0])


@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_pages_hold_every_step_once_newest_first(varied: Store, limit: int) -> None:
    listed = all_pages(varied, limit)
    assert len(listed) == 600
    assert [e.ts for e in listed] == sorted((e.ts for e in listed), reverse=True)
    assert {e.trace_id for e in listed} == {e.trace_id for e in varied.events()}


@pytest.mark.parametrize("where", [
    {"task_type": "plan"}, {"outcome": "failed"}, {"error_type": "agent"},
    {"since": T0 + 150.0, "until": T0 + 600.0}, {"task_type": "deploy", "outcome": "error"},
], ids=repr)
def test_pages_list_only_matching_steps(varied: Store, where: dict[str, Any]) -> None:
    flt = StepFilter(**where)
    wanted = [e for e in varied.events() if flt.matches(e)]
    listed = all_pages(varied, 11, **where)
    assert sorted(listed) == sorted(wanted)
    assert [e.ts for e in listed] == sorted((e.ts for e in wanted), reverse=True)


def test_steps_recorded_at_the_same_instant_are_paged_without_loss(any_url: str) -> None:
    rng = random.Random(13)
    events = [step(i, rng, ts=T0 + i // 10) for i in range(95)]  # ten per timestamp
    with record(any_url, events) as store:
        listed = all_pages(store, 4)
    assert sorted(e.trace_id for e in listed) == sorted(e.trace_id for e in events)
    assert [e.ts for e in listed] == sorted((e.ts for e in events), reverse=True)


def test_a_page_ends_with_no_cursor_when_nothing_follows(varied: Store) -> None:
    assert varied.steps(limit=MAX_PAGE).next_cursor is None
    page = varied.steps(limit=600)
    assert len(page.steps) == 600
    assert page.next_cursor is None
    nothing = varied.steps(task_type="nothing")
    assert (nothing.steps, nothing.next_cursor) == ((), None)


def test_new_steps_never_enter_later_pages(any_url: str) -> None:
    rng = random.Random(14)
    with record(any_url, [step(i, rng) for i in range(30)]) as store:
        before = all_pages(store, 30)
        first = store.steps(limit=10)
        store.record(step(99, rng, ts=T0 + 1000))  # the newest step of all
        assert store.flush()
        second = store.steps(limit=10, cursor=first.next_cursor)
        assert store.steps(limit=1).steps[0].trace_id == f"{99:032x}"
    assert list(second.steps) == before[10:20]


@pytest.mark.parametrize("cursor", ["garbage", "", "W10", "WzEsMiwzXQ", "WyJ4IiwxXQ",
                                    "WzEuNSwiKDEsMikgT1IgMT0xIl0", "WzEuNSxudWxsXQ", "%%"])
def test_a_cursor_that_is_not_this_stores_is_a_config_error(any_url: str,
                                                            cursor: str) -> None:
    with cl.open_store(any_url) as store, pytest.raises(cl.ConfigError, match="cursor"):
        store.steps(cursor=cursor)


def test_a_cursor_of_a_sqlite_store_is_refused_by_postgres_and_back(tmp_path: Path,
                                                                     pg_url: str) -> None:
    rng = random.Random(15)
    events = [step(i, rng) for i in range(5)]
    with record(f"sqlite:///{tmp_path / 'a.db'}", events) as lite, \
            record(pg_url, events) as pg:
        lite_cursor = lite.steps(limit=2).next_cursor
        pg_cursor = pg.steps(limit=2).next_cursor
        assert lite_cursor is not None and pg_cursor is not None
        with pytest.raises(cl.ConfigError, match="cursor"):
            pg.steps(cursor=lite_cursor)
        with pytest.raises(cl.ConfigError, match="cursor"):
            lite.steps(cursor=pg_cursor)


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE + 1, True])
def test_a_page_size_out_of_range_is_a_config_error(any_url: str, limit: int) -> None:
    with cl.open_store(any_url) as store, pytest.raises(cl.ConfigError, match="page size"):
        store.steps(limit=limit)


# ----- the indexes the queries read ---------------------------------------------------------

def _plan(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> str:
    return " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))


def test_sqlite_summary_queries_read_their_indexes_in_order(tmp_path: Path) -> None:
    from closedloop.store.sqlite import _query as q  # the queries themselves

    rng = random.Random(16)
    with record(f"sqlite:///{tmp_path / 'events.db'}", [step(i, rng) for i in range(50)]):
        pass
    conn = sqlite3.connect(tmp_path / "events.db")
    plans: list[str] = []

    class Explaining(q._Source):
        def _rows(self, sql: str, params: Sequence[Any]) -> list[Any]:
            plans.append(_plan(conn, sql, params))
            return super()._rows(sql, params)

    for where in (StepFilter(), StepFilter(since=T0 + 10.0, task_type="plan")):
        source = Explaining(conn, where)
        plans.clear()
        source.groups()
        source.histogram()
        source.bucket_latencies([("plan", 42)])
        source.examples([("plan", "agent", "x")])
        source.message_counts(3)
        groups, histogram, bucket, example, messages = plans
        # no row is sorted to be grouped: the index's order is the GROUP BY's
        assert "COVERING INDEX events_report" in groups and "TEMP B-TREE" not in groups
        assert "COVERING INDEX events_latency" in histogram
        assert "TEMP B-TREE" not in histogram
        assert "SEARCH events USING COVERING INDEX events_latency" in bucket
        assert "SEARCH events USING INDEX events_groups" in example
        assert "TEMP B-TREE" not in example
        assert "events USING COVERING INDEX events_groups" in messages
    listed: list[str] = []
    real = sqlite3.Connection.execute

    class Listing(sqlite3.Connection):
        def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
            plan = real(self, "EXPLAIN QUERY PLAN " + sql, params)
            listed.append(" | ".join(r[3] for r in plan))
            return real(self, sql, params)

    backend = SQLiteBackend(tmp_path / "events.db")
    backend._reader = lambda: sqlite3.connect(  # type: ignore[method-assign]
        tmp_path / "events.db", factory=Listing)
    backend.list_steps(StepFilter(task_type="plan"), limit=5, cursor=None)
    (listing,) = listed
    assert "SCAN events USING INDEX events_ts" in listing and "TEMP B-TREE" not in listing


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_step_by_its_id_and_a_runs_steps_are_index_look_ups(kind: str, tmp_path: Path,
                                                               request: Any) -> None:
    # approvals find a step by id, multi-step runs list their steps: neither reads every row
    rng = random.Random(19)
    events = [step(i, rng)._replace(step_id=f"{i:032x}", run_id=f"run-{i % 7}" if i % 3 else None)
              for i in range(300)]
    by_step = "SELECT ts FROM {s}events WHERE step_id = '00000000000000000000000000000005'"
    by_run = "SELECT ts, step_id FROM {s}events WHERE run_id = 'run-2' ORDER BY ts"
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'events.db'}"
        with record(url, events):
            pass
        conn = sqlite3.connect(tmp_path / "events.db")
        assert "USING INDEX events_step" in _plan(conn, by_step.format(s=""), ())
        run_plan = _plan(conn, by_run.format(s=""), ())
        assert "USING INDEX events_run" in run_plan and "TEMP B-TREE" not in run_plan
        return
    psycopg = pytest.importorskip("psycopg")
    url = request.getfixturevalue("pg_url")
    schema = url.rsplit("schema=", 1)[1]
    with record(url, events), psycopg.connect(url.split("?", maxsplit=1)[0]) as conn:
        conn.execute("SET enable_seqscan = off")  # 300 rows: the index must be usable at all
        # each day partition has the index (named after the partition and its columns)
        for sql, index in ((by_step, "_step_id_idx"), (by_run, "_run_id_ts_idx")):
            plan = "\n".join(r[0] for r in conn.execute(
                "EXPLAIN " + sql.format(s=f'"{schema}".')))
            sorts = [line for line in plan.splitlines() if line.lstrip(" ->").startswith("Sort  ")]
            assert index in plan and "Seq Scan" not in plan and not sorts, plan


def test_latency_figures_read_alongside_count_the_same_steps_as_the_rest(
        tmp_path: Path) -> None:
    from closedloop.store._sqlsummary import summarize
    from closedloop.store.sqlite import _query as q

    rng = random.Random(17)
    path = tmp_path / "events.db"
    with record(f"sqlite:///{path}", [step(i, rng) for i in range(200)]) as store:
        early = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        early.execute("BEGIN")
        early.execute("SELECT count(*) FROM events").fetchone()  # its snapshot: 200 steps
        for i in range(200, 260):
            store.record(step(i, rng))
        assert store.flush()
        late = sqlite3.connect(path, isolation_level=None)
        late.execute("BEGIN")
        got = summarize(q._Source(late, StepFilter()), top_messages=3,
                        alongside=q._Source(early, StepFilter()))
        same(got, python_pass(store, StepFilter()))
        assert got.overall.runs == 260


def test_an_older_store_opened_read_only_lists_its_steps(tmp_path: Path) -> None:
    rng = random.Random(18)
    events = [step(i, rng) for i in range(30)]
    url = v2_file(tmp_path / "v2.db", events)
    with cl.open_store(url, read_only=True) as store:
        listed = all_pages(store, 7, outcome="failed")
    failed = [e for e in events if e.outcome == "failed"]
    assert [e.trace_id for e in listed] == [e.trace_id for e in
                                           sorted(failed, key=lambda e: -e.ts)]


def test_cost_is_summed_per_task_type_over_priced_steps_only(any_url: str) -> None:
    def priced(i: int, task: str, outcome: str, cost: float | None) -> cl.StepEvent:
        return step(i, random.Random(i), task_type=task)._replace(
            outcome=outcome, cost_usd=cost, error_type=None, error_message=None)

    store = record(any_url, [
        priced(0, "plan", "succeeded", 0.25), priced(1, "plan", "failed", 0.5),
        priced(2, "plan", "succeeded", None), priced(3, "apply", "succeeded", None),
        priced(4, "plan", "succeeded", 0.125)])
    try:
        summary = store.summary()
        by_task = {r.task_type: r for r in summary.rows}
        assert (by_task["plan"].cost_usd, by_task["plan"].priced) == (0.875, 3)
        assert (by_task["apply"].cost_usd, by_task["apply"].priced) == (None, 0)
        assert (summary.overall.cost_usd, summary.overall.priced) == (0.875, 3)
        assert store.summary(outcome="succeeded").overall.cost_usd == 0.375
        report = report_from_store(store)
        assert report.row("plan").cost.per_success_usd == 0.875 / 3
        assert report.row("apply").cost.to_dict() == {"total_usd": None, "priced": 0,
                                                      "per_success_usd": None}
    finally:
        store.close()


# ----- model and label filters, and "anything newer" ----------------------------------------

def labelled(i: int, rng: random.Random) -> cl.StepEvent:
    return step(i, rng)._replace(model=rng.choice(["gpt-x", "claude-y", None]),
                                 run_id=rng.choice(["run-1", "run-2", None]),
                                 labels=rng.choice([{"tier": "gold"}, {"tier": "free"},
                                                    {"region": "eu"}, None]))


@pytest.mark.parametrize("where", [
    {"model": "gpt-x"}, {"label": ("tier", "gold")}, {"label": ("region", "eu")},
    {"model": "claude-y", "label": ("tier", "free"), "outcome": "failed"},
    {"run_id": "run-1"}, {"run_id": "run-2", "label": ("tier", "gold")},
], ids=repr)
def test_pages_filter_by_model_label_and_run(any_url: str, where: dict[str, Any]) -> None:
    rng = random.Random(16)
    with record(any_url, [labelled(i, rng) for i in range(120)]) as store:
        wanted = [e for e in store.events() if StepFilter(**where).matches(e)]
        listed = all_pages(store, 9, **where)
    assert wanted and sorted(listed) == sorted(wanted)
    assert [e.ts for e in listed] == sorted((e.ts for e in wanted), reverse=True)


@pytest.mark.parametrize("label", [("no spaces allowed", "x"), ('a"b', "x"), ("k",)])
def test_a_label_filter_that_is_no_label_is_a_config_error(label: Any) -> None:
    with pytest.raises(cl.ConfigError, match="label"):
        StepFilter(label=label)


def test_a_label_filter_is_parsed_from_key_equals_value() -> None:
    from closedloop.store import parse_label_filter

    assert parse_label_filter("tier=gold=x") == ("tier", "gold=x")
    with pytest.raises(cl.ConfigError, match="KEY=VALUE"):
        parse_label_filter("tier")


def test_steps_after_a_pages_head_are_the_newer_ones_oldest_first(any_url: str) -> None:
    rng = random.Random(17)
    with record(any_url, [step(i, rng, ts=T0 + i // 3) for i in range(30)]) as store:
        head = store.steps(limit=5).head_cursor
        assert store.steps_after(head).steps == ()
        assert store.steps_after(head).next_cursor is None
        late = [step(100 + i, rng, ts=T0 + 20 + i // 2) for i in range(7)]
        for e in late:
            store.record(e)
        assert store.flush()
        first = store.steps_after(head, limit=4)
        second = store.steps_after(first.next_cursor, limit=4)
        assert store.steps_after(second.next_cursor).steps == ()
    assert [e.trace_id for e in (*first.steps, *second.steps)] == [e.trace_id for e in late]


def test_steps_after_keep_the_filters(any_url: str) -> None:
    rng = random.Random(18)
    with record(any_url, [labelled(i, rng) for i in range(40)]) as store:
        everything = store.steps_after(None, label=("tier", "gold"), limit=MAX_PAGE)
        wanted = [e for e in store.events() if (e.labels or {}).get("tier") == "gold"]
        head = store.steps(label=("tier", "gold")).head_cursor
    assert list(everything.steps) == sorted(wanted, key=lambda e: e.ts)
    assert everything.next_cursor == head


def test_a_backend_without_the_port_lists_steps_after_a_cursor_too() -> None:
    rng = random.Random(19)
    with Store(PlainBackend()) as store:
        for i in range(20):
            store.record(labelled(i, rng))
        assert store.flush()
        head = store.steps(limit=3, model="gpt-x").head_cursor
        store.record(labelled(50, rng)._replace(ts=T0 + 500, model="gpt-x"))
        store.record(labelled(51, rng)._replace(ts=T0 + 501, model="claude-y"))
        assert store.flush()
        new = store.steps_after(head, model="gpt-x")
    assert [e.trace_id for e in new.steps] == [f"{50:032x}"]
