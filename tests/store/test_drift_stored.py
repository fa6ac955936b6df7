"""Drift detection through real loops on every backend: the actions (alert, pause, halt,
demote), the firing records and detector states in the store, `closedloop status`, budgets
configured through closedloop.configure, and online scoring."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry

import closedloop as cl
from closedloop.autonomy import AutonomyLevels
from closedloop.cli import main
from closedloop.control import CaptureSink, FaultControl, ledger_for_store
from closedloop.learn import DriftGuard, DriftPolicy, OnlineScorer, recorded_firings
from closedloop.store import level_store_for, span_store_for
from closedloop.telemetry import Metrics

FAIL_FAST = DriftPolicy(verified_pass_rate=(0.98, 0.90), reask_rate=None, exceedance=None,
                        false_alarm_steps=1000)


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


def echo(task: Any, attempt: cl.Attempt) -> Any:
    return task


def executor(proposal: Any) -> Any:
    return proposal


def failing_after(n: int) -> Any:
    seen = [0]

    def verify(intent: object, result: object) -> bool:
        seen[0] += 1
        return seen[0] <= n

    return verify


def setup(store: cl.Store, policy: DriftPolicy, **kw: Any) -> tuple[Any, ...]:
    kw.setdefault("save_every", 0)  # no saver thread outliving the test's schema
    sink = CaptureSink()
    fault = FaultControl(ledger=ledger_for_store(store), sinks=[sink], halt_after=10**6,
                         halt_rate=1.0, min_samples=10**6)
    guard = DriftGuard(policy=policy, store=store, fault_control=fault, sinks=[sink], **kw)
    return sink, fault, guard


@pytest.mark.parametrize("action", ["pause", "halt"])
def test_a_drift_pauses_or_halts_through_fault_control_and_is_recorded(
        store: cl.Store, action: str) -> None:
    policy = DriftPolicy(verified_pass_rate=(0.98, 0.90), reask_rate=None, exceedance=None,
                         false_alarm_steps=1000, actions=("alert", action), pause_for=120.0)
    sink, fault, guard = setup(store, policy)
    loop = cl.Loop(echo, task_type="deploy", executor=executor, store=store,
                   guards=[fault, guard], verifiers=[failing_after(50)])
    outcomes = [loop.run(i).outcome.value for i in range(80)]
    refused = "paused" if action == "pause" else "halted"
    assert refused in outcomes
    first = outcomes.index(refused)
    assert 50 < first < 70  # the drift at step 50 is caught within a few failures
    assert set(outcomes[first:]) == {refused}
    assert [a.kind for a in sink.alerts] == ["drift", refused]
    if action == "pause":
        assert "resumes by itself after 120s" in sink.alerts[1].action
    (stop,) = fault.ledger.stops()
    assert stop.kind.value == refused and stop.evidence["signal"] == "verification"
    if action == "pause":  # lifts itself after the policy's pause_for
        assert stop.until is not None and stop.until - stop.at == pytest.approx(120.0)
    else:  # only a human lifts it
        assert stop.until is None
    (firing,) = recorded_firings(level_store_for(store))
    assert firing.signal == "verification" and firing.actions == ("alert", action)
    assert firing.evidence["observations"] > 0


def test_a_drift_demotes_autonomy_through_the_levels(store: cl.Store) -> None:
    levels = AutonomyLevels(store, sinks=[], cache_s=0.0)
    policy = DriftPolicy(verified_pass_rate=(0.98, 0.90), reask_rate=None, exceedance=None,
                         false_alarm_steps=1000, actions=("demote",), demote_to="suggest")
    _, fault, guard = setup(store, policy, levels=levels)
    loop = cl.Loop(echo, task_type="deploy", executor=executor, store=store, levels=levels,
                   guards=[fault, guard], verifiers=[failing_after(30)])
    outcomes = [loop.run(i).outcome.value for i in range(60)]
    assert "suggested" in outcomes
    (change,) = levels.levels.history(task_type="deploy")
    assert change.kind == "demoted" and change.new == "suggest"
    assert change.evidence["signal"] == "verification"


def test_a_failing_action_is_counted_and_the_others_still_run(store: cl.Store) -> None:
    policy = DriftPolicy(verified_pass_rate=(0.98, 0.90), reask_rate=None, exceedance=None,
                         false_alarm_steps=1000, actions=("demote", "alert"))
    sink, fault, guard = setup(store, policy)  # no levels: the demotion cannot run
    loop = cl.Loop(echo, task_type="deploy", executor=executor, store=store,
                   guards=[fault, guard], verifiers=[failing_after(0)])
    for i in range(30):
        loop.run(i)
    assert guard.failed_actions == 1
    assert [a.kind for a in sink.alerts] == ["drift"]


def test_detector_states_survive_a_restart(store: cl.Store) -> None:
    _, fault, guard = setup(store, FAIL_FAST)
    loop = cl.Loop(echo, task_type="deploy", executor=executor, store=store,
                   guards=[fault, guard], verifiers=[failing_after(10**6)])
    for i in range(300):
        loop.run(i)
    guard.save()
    before = guard.monitor.snapshot()
    _, fault2, again = setup(store, FAIL_FAST)
    loop2 = cl.Loop(echo, task_type="deploy", executor=executor, store=store,
                    guards=[fault2, again], verifiers=[failing_after(10**6)])
    loop2.run(0)
    (after,) = again.monitor.snapshot()
    assert after["observations"] == before[0]["observations"] + 1


def test_online_scores_are_recorded_and_their_drift_detected(store: cl.Store) -> None:
    policy = DriftPolicy(verified_pass_rate=None, reask_rate=None, exceedance=None,
                         learn_steps=50, false_alarm_steps=1000, actions=("alert",))
    sink, fault, guard = setup(store, policy)
    loop = cl.Loop(echo, task_type="answer", executor=executor, store=store,
                   guards=[fault, guard])

    def quality(event: cl.StepEvent) -> float | None:
        n = int(event.proposal or "0")
        if n == 13:
            raise ValueError("the judge failed")
        return 0.9 + 0.01 * (n % 5) if n < 200 else 0.5

    scorer = OnlineScorer(store, {"quality": quality}, guard=guard, since=0.0)
    for i in range(150):
        loop.run(i)
    assert scorer.run_once() == 150
    assert scorer.failed == 1 and scorer.scored == 149
    assert scorer.run_once() == 0  # each step is scored once
    for i in range(200, 260):
        loop.run(i)
    scorer.run_once()
    assert [a.kind for a in sink.alerts][:1] == ["drift"]
    assert guard.fired[0].signal == "score:quality"
    stored = span_store_for(store).scores(name="quality")
    assert len([s for s in stored if s.label is None]) == 149 + 60
    # the judge's failure is recorded too, as a score with its error
    assert [(s.label, s.comment) for s in stored if s.label is not None] == [
        ("scorer_failed", "ValueError: the judge failed")]


def test_prometheus_exposes_drift_state_and_firings(store: cl.Store) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    _, fault, guard = setup(store, FAIL_FAST, metrics=metrics)
    loop = cl.Loop(echo, task_type="deploy", executor=executor, store=store,
                   guards=[fault, guard], verifiers=[failing_after(20)])
    for i in range(22):
        loop.run(i)
    state = registry.get_sample_value("closedloop_drift_state",
                                      {"task_type": "deploy", "signal": "verification"})
    assert state is not None and 0 < state < 1
    for i in range(40):
        loop.run(i)
    assert registry.get_sample_value("closedloop_drift_firings_total",
                                     {"task_type": "deploy", "signal": "verification"}) == 1


def test_a_budget_configured_in_configure_pauses_a_burning_task_type(any_url: str) -> None:
    rt = cl.configure(store=any_url, drift=DriftPolicy(
        verified_pass_rate=None, reask_rate=None, exceedance=None, budget_usd_per_min=0.5))
    try:
        def spender(task: Any, attempt: cl.Attempt) -> Any:
            attempt.record_usage(100, 10, cost_usd=0.1)
            return task

        loop = cl.Loop(spender, task_type="expensive", executor=executor)
        outcomes = [loop.run(i).outcome.value for i in range(10)]
        assert outcomes[:6] == ["succeeded"] * 6  # 0.6 USD > 0.5 at the sixth step
        assert set(outcomes[6:]) == {"paused"}
        (stop,) = rt.fault_control_for(rt.store).ledger.stops()
        assert stop.evidence["signal"] == "burn_usd"
    finally:
        cl.reset()


def test_drift_configured_per_task_type_watches_only_those(any_url: str) -> None:
    rt = cl.configure(store=any_url, drift={"watched": FAIL_FAST})
    try:
        for task_type in ("watched", "other"):
            loop = cl.Loop(echo, task_type=task_type, executor=executor,
                           verifiers=[failing_after(10**6)])
            loop.run(1)
        guard = rt.drift_for(rt.store)
        assert guard is not None
        guard.flush()  # fed in the background: what the loops queued so far
        assert {row["task_type"] for row in guard.monitor.snapshot()} == {"watched"}
    finally:
        cl.reset()


def test_bad_drift_configuration_is_a_config_error() -> None:
    with pytest.raises(cl.ConfigError):
        cl.configure(store="memory://", drift={"t": "fast"})  # type: ignore[dict-item]
    cl.reset()


@pytest.fixture
def file_url(shared_url: str) -> str:
    return shared_url


def test_status_shows_the_firings(file_url: str) -> None:
    store = cl.open_store(file_url)
    try:
        _, fault, guard = setup(store, DriftPolicy(
            verified_pass_rate=(0.98, 0.90), reask_rate=None, exceedance=None,
            false_alarm_steps=1000, actions=("alert",)))
        loop = cl.Loop(echo, task_type="d[b]x", executor=executor, store=store,
                       guards=[fault, guard], verifiers=[failing_after(0)])
        for i in range(20):
            loop.run(i)
        store.flush()
    finally:
        store.close()
    runner = CliRunner()
    result = runner.invoke(main, ["status", "--store", file_url, "--json"])
    assert result.exit_code == 0, result.output
    (firing,) = json.loads(result.output)["drift"]
    assert firing["task_type"] == "d[b]x" and firing["signal"] == "verification"
    shown = runner.invoke(main, ["status", "--store", file_url])
    assert shown.exit_code == 0
    assert "Drift and budget detections" in shown.output and "d[b]x" in shown.output
