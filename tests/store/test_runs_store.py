"""The run port on every backend: records written by a Run, read back, listed newest first a
page at a time, summarised, pruned; the steps of one run read through events_run."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import closedloop as cl
from closedloop.runs import RunRecord
from closedloop.store import EventQuery, run_store_for
from closedloop.store.sqlite import MIGRATIONS, SCHEMA_VERSION


def record(run_id: str, started: float, outcome: str = "succeeded", **kw: object) -> RunRecord:
    return RunRecord(run_id=run_id, name=f"task {run_id}", started=started,
                     ended=started + 2.0, outcome=outcome, **kw)  # type: ignore[arg-type]


def test_a_runs_record_and_its_steps_are_read_back(any_url: str) -> None:
    store = cl.open_store(any_url)
    try:
        lp = cl.Loop(lambda task, attempt: task, task_type="t", store=store, guards=())
        lp.run("outside")
        with cl.Run("triage", store=store, max_steps=2, labels={"tier": "gold"}) as run:
            lp.run(1)
            lp.run(2)
            lp.run(3)
        assert store.flush()
        got = store.runs().get_run(run.run_id)
        assert got == run.record()
        assert got is not None and got.outcome == "budget_exceeded"
        assert got.budgets == {"max_steps": 2} and got.labels == {"tier": "gold"}
        steps = list(store.backend.iter_events(EventQuery(run_id=run.run_id)))
        assert [e.outcome for e in steps] == ["succeeded", "succeeded", "budget_exceeded"]
        assert store.runs().get_run("nope") is None
    finally:
        store.close()


def test_runs_are_listed_newest_first_a_page_at_a_time(any_url: str) -> None:
    store = cl.open_store(any_url)
    try:
        runs = store.runs()
        runs.put_runs([record(f"r{i}", 1000.0 + i // 2, outcome="halted" if i % 3 == 0
                              else "succeeded", steps=i, input_tokens=10, cost_usd=0.5)
                       for i in range(7)])
        runs.put_runs([record("r6", 1003.0, outcome="aborted", steps=6)])  # the last wins
        seen, cursor = [], None
        while True:
            page = runs.list_runs(limit=3, cursor=cursor)
            seen += [r.run_id for r in page.runs]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == ["r6", "r5", "r4", "r3", "r2", "r1", "r0"]
        assert [r.run_id for r in runs.list_runs(outcome="halted").runs] == ["r3", "r0"]
        assert [r.run_id for r in runs.list_runs(since=1002.0).runs] == ["r6", "r5", "r4"]
        summary = runs.summarize_runs(since=1001.0)
        assert summary.runs == 5 and summary.steps == 2 + 3 + 4 + 5 + 6
        assert dict(summary.outcomes) == {"halted": 1, "succeeded": 3, "aborted": 1}
        assert summary.input_tokens == 40 and summary.cost_usd == pytest.approx(2.0)
        assert summary.mean_duration_s == pytest.approx(2.0)
        assert runs.prune_runs(1001.0) == 2
        assert [r.run_id for r in runs.list_runs(limit=10).runs][-1] == "r2"
        with pytest.raises(cl.ConfigError, match="cursor"):
            runs.list_runs(cursor="garbage!")
        with pytest.raises(cl.ConfigError, match="limit"):
            runs.list_runs(limit=0)
    finally:
        store.close()


def test_an_empty_store_summarises_no_runs(any_url: str) -> None:
    store = cl.open_store(any_url)
    try:
        summary = store.runs().summarize_runs()
        assert (summary.runs, summary.cost_usd, summary.mean_duration_s) == (0, None, None)
        assert store.runs().list_runs().runs == []
    finally:
        store.close()


def test_sqlite_reads_runs_through_their_indexes(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    cl.open_store(f"sqlite:///{path}").close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        plan = " ".join(r[3] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM events WHERE run_id = ? ORDER BY ts", ("x",)))
        assert "events_run" in plan and "TEMP B-TREE" not in plan
        plan = " ".join(r[3] for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM runs ORDER BY started DESC, run_id DESC LIMIT 5"))
        assert "runs_started" in plan and "TEMP B-TREE" not in plan
    finally:
        conn.close()


def test_a_sqlite_store_of_the_schema_before_runs_is_read_as_having_none(
        tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    before = next(i for i, m in enumerate(MIGRATIONS) if "CREATE TABLE IF NOT EXISTS runs" in m)
    for version in range(before):
        conn.executescript(MIGRATIONS[version])
    conn.execute(f"PRAGMA user_version = {before}")
    conn.commit()
    conn.close()
    store = cl.open_store(f"sqlite:///{path}", read_only=True)
    try:
        assert store.runs().list_runs().runs == []
        assert store.runs().get_run("x") is None
    finally:
        store.close()
    with cl.open_store(f"sqlite:///{path}") as store:  # opened to write: migrated
        assert run_store_for(store) is not None
        store.record_run(record("r", 1.0))
        assert store.flush()
        assert store.runs().get_run("r") == record("r", 1.0)


def test_automatic_retention_prunes_run_records_with_the_events(any_url: str) -> None:
    from closedloop.store import Retention

    store = cl.open_store(any_url)
    try:
        store.runs().put_runs([record("old", 1_000.0), record("new", 9_000.0)])
        Retention(keep=5_000.0, clock=lambda: 10_000.0)(store.backend)
        assert [r.run_id for r in store.runs().list_runs().runs] == ["new"]
    finally:
        store.close()
