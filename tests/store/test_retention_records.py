"""Retention of every table that grows, by one rule on every backend (memory, SQLite,
PostgreSQL): settled approval requests and their history, the autonomy audit trail and
feedback, run records; never a request still open, a level, or the record that set a level
in force. And listing approvals writes nothing when nothing is due."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import cast

import pytest

import closedloop as cl
from closedloop._approvals import ApprovalStatus
from closedloop._runstate import RunHalt, RunHaltStore
from closedloop.approvals import list_requests
from closedloop.autonomy import Feedback, LevelKey, LevelRecord
from closedloop.store import (
    approval_store_for,
    level_store_for,
    prune,
    store_info,
)

from .test_approvals import request
from .test_runs_store import record as run_record

DAY = 86_400.0
NOW = time.time()
OLD = NOW - 40 * DAY
BEFORE = NOW - 30 * DAY


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


def _requests(store: cl.Store) -> dict[str, str]:
    """One old request in each state, and a recent rejected one: their ids by name."""
    approvals = approval_store_for(store)
    ids: dict[str, str] = {}

    def made(name: str, i: int, *, at: float = OLD, expires_in: float | None = None) -> str:
        ids[name] = approvals.create(request(i, now=at, expires_in=expires_in)).request_id
        return ids[name]

    made("pending", 1)
    approvals.decide(made("rejected", 2), approve=False, by="alice", reason="no", now=OLD)
    approvals.decide(made("approved", 3), approve=True, by="alice", now=OLD)
    for name, i in (("crashed", 4), ("executed", 5), ("failed", 6), ("executing", 7)):
        approvals.decide(made(name, i), approve=True, by="alice", now=OLD)
        if name == "executing":  # claimed after the reaping below, its lease still runs
            continue
        claim = approvals.claim(ids[name], by="worker", lease_s=60, now=OLD)
        assert claim is not None
        if name != "crashed":
            assert approvals.finish(ids[name], claim.token, ok=name == "executed",
                                    result={"ok": name == "executed"}, now=OLD + 1)
    assert approvals.reap(now=OLD + 120) == [ids["crashed"]]
    assert approvals.claim(ids["executing"], by="worker", lease_s=1e8, now=OLD + 121)
    made("expired", 8, expires_in=10)
    assert approvals.expire(now=OLD + 20) == [ids["expired"]]
    approvals.decide(made("recent", 9, at=NOW), approve=False, by="alice", reason="no",
                     now=NOW)
    return ids


def test_settled_approval_requests_and_their_history_are_pruned_open_ones_never(
        store: cl.Store) -> None:
    approvals = approval_store_for(store)
    ids = _requests(store)
    history = store_info(store).records["approval_history"]
    settled = ("rejected", "expired", "executed", "failed")
    found = [approvals.get(ids[name]) for name in settled]
    gone = sum(len(r.history) for r in found if r is not None)

    dry = prune(store, BEFORE, dry_run=True)
    assert dry.records["approvals"] == 4 and dry.records["approval_history"] == gone
    assert all(approvals.get(i) is not None for i in ids.values())  # a dry run removes nothing

    report = prune(store, BEFORE)
    assert report.records["approvals"] == 4 and report.records["approval_history"] == gone
    left = {name for name, i in ids.items() if approvals.get(i) is not None}
    assert left == {"pending", "approved", "executing", "crashed", "recent"}
    assert {r.request_id for r in approvals.list(limit=50).requests} == {ids[n] for n in left}
    info = store_info(store).records
    assert info["approvals"] == 5 and info["approval_history"] == history - gone
    kept = approvals.get(ids["crashed"])
    assert kept is not None and kept.status is ApprovalStatus.CRASHED and kept.history


def test_the_autonomy_audit_trail_and_feedback_are_pruned_but_never_a_level(
        store: cl.Store) -> None:
    levels = level_store_for(store)

    def level(name: str, at: float, task_type: str = "provision") -> LevelRecord:
        return LevelRecord(key=LevelKey(task_type=task_type), level=name, by="alice", at=at,
                           reason="earned", evidence={})

    levels.set_level(level("suggest", OLD))
    levels.set_level(level("approve", OLD + 1), kind="promoted")  # in force, set long ago
    levels.set_level(level("suggest", OLD, task_type="deploy"))
    levels.set_level(level("approve", NOW, task_type="deploy"), kind="promoted")
    levels.put_feedback(Feedback(step_id="ab" * 16, agreed=True, by="bob", at=OLD))
    levels.put_feedback(Feedback(step_id="cd" * 16, agreed=False, by="bob", at=NOW))

    report = prune(store, BEFORE)
    assert report.records["autonomy_history"] == 2
    assert report.records["autonomy_feedback"] == 1
    assert {(r.key.task_type, r.level) for r in levels.levels()} == {
        ("provision", "approve"), ("deploy", "approve")}
    assert sorted((c.key.task_type, c.new) for c in levels.history(limit=50)) == [
        ("deploy", "approve"), ("provision", "approve")]
    assert [f.step_id for f in levels.feedback()] == ["cd" * 16]
    info = store_info(store).records
    assert (info["autonomy_levels"], info["autonomy_history"], info["autonomy_feedback"]) \
        == (2, 2, 1)


def test_run_records_are_pruned_by_store_prune_too(store: cl.Store) -> None:
    runs = store.runs()
    runs.put_runs([run_record("old", OLD), run_record("new", NOW)])
    assert prune(store, BEFORE, dry_run=True).records["runs"] == 1
    assert store_info(store).records["runs"] == 2
    assert prune(store, BEFORE).records["runs"] == 1
    assert [r.run_id for r in runs.list_runs().runs] == ["new"]
    assert store_info(store).records["runs"] == 1


def test_run_halts_are_pruned_with_the_other_records(store: cl.Store) -> None:
    runs = cast(RunHaltStore, store.runs())
    runs.halt_run(RunHalt(run_id="old", at=OLD, by="alice", reason="stop"))
    runs.halt_run(RunHalt(run_id="new", at=NOW, by="alice", reason="stop"))
    assert store_info(store).records["run_halts"] == 2
    assert prune(store, BEFORE, dry_run=True).records["run_halts"] == 1
    assert prune(store, BEFORE).records["run_halts"] == 1
    assert set(runs.run_halts(["old", "new"])) == {"new"}
    assert store_info(store).records["run_halts"] == 1


def test_the_run_ports_prune_drops_old_halts_by_the_same_rule(store: cl.Store) -> None:
    runs = cast(RunHaltStore, store.runs())
    runs.halt_run(RunHalt(run_id="old", at=OLD, by="alice", reason="stop"))
    runs.halt_run(RunHalt(run_id="new", at=NOW, by="alice", reason="stop"))
    store.runs().put_runs([run_record("old", OLD), run_record("new", NOW)])
    assert store.runs().prune_runs(BEFORE) == 1
    assert set(runs.run_halts(["old", "new"])) == {"new"}


def test_automatic_retention_prunes_the_other_records_too(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        ids = _requests(store)
        store.runs().put_runs([run_record("old", OLD)])
        store.set_retention("30d")
        store.record(cl.StepEvent(
            ts=NOW, trace_id="0" * 32, agent_id="a", task_type="t", autonomy="autonomous",
            outcome="succeeded", attempts=1, input_tokens=0, output_tokens=0, latency_ms=1.0,
            validation_passed=True, verification_passed=True, error_type=None,
            error_message=None, propose_ms=0.0, validate_ms=0.0, act_ms=0.0, verify_ms=0.0,
            detail=None))
        assert store.flush() and store.flush()  # the wake-up after the first ran retention
        approvals = approval_store_for(store)
        assert approvals.get(ids["rejected"]) is None
        assert approvals.get(ids["pending"]) is not None
        assert store.runs().get_run("old") is None


def test_listing_approvals_when_nothing_is_due_needs_no_write(shared_url: str) -> None:
    any_url = shared_url
    with cl.open_store(any_url) as store:
        approvals = approval_store_for(store)
        pending = approvals.create(request(1, now=NOW, expires_in=3600)).request_id
    reader = cl.open_store(any_url, read_only=True)
    try:
        read_only = approval_store_for(reader)
        assert read_only.expire(now=NOW) == [] and read_only.reap(now=NOW) == []
        assert list_requests(store=reader).requests[0].request_id == pending
        with pytest.raises(cl.StoreError, match="read-only"):  # due: it must write, and says so
            read_only.expire(now=NOW + 7200)
    finally:
        reader.close()
    with cl.open_store(any_url) as store:
        assert approval_store_for(store).expire(now=NOW + 7200) == [pending]


def test_store_info_and_prune_on_the_command_line_show_the_other_records(
        shared_url: str) -> None:
    from click.testing import CliRunner

    from closedloop.cli import main

    with cl.open_store(shared_url) as store:
        _requests(store)
        store.runs().put_runs([run_record("old", OLD)])
    runner = CliRunner()
    info = runner.invoke(main, ["store", "info", "--store", shared_url])
    assert info.exit_code == 0, info.output
    assert "approvals  9 request(s), " in info.stdout
    assert "runs       1 run record(s)" in info.stdout
    found = runner.invoke(main, ["store", "info", "--store", shared_url, "--json"])
    assert json.loads(found.stdout)["records"]["approvals"] == 9
    pruned = runner.invoke(main, ["store", "prune", "--older-than", "30d", "--store",
                                  shared_url])
    assert pruned.exit_code == 0, pruned.output
    assert ", 4 approval request(s), " in pruned.stdout
    assert ", 1 run record(s)" in pruned.stdout
