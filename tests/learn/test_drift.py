"""Drift detection's decision logic (DriftMonitor): signals, firings, re-arming, budgets."""

from __future__ import annotations

import random
from typing import Any

import pytest

import closedloop as cl
from closedloop.learn import DriftMonitor, DriftPolicy


def event(i: int, *, task: str = "t", passed: bool | None = True, attempts: int = 1,
          latency: float = 100.0, cost: float | None = None, model: str | None = None,
          outcome: str | None = None, tokens: int = 0) -> cl.StepEvent:
    return cl.StepEvent(
        ts=1_800_000_000.0 + i, trace_id=f"{i:032x}", agent_id="a", task_type=task,
        autonomy="autonomous", outcome=outcome or ("succeeded" if passed is not False
                                                   else "failed"),
        attempts=attempts, input_tokens=tokens, output_tokens=0, latency_ms=latency,
        validation_passed=True, verification_passed=passed,
        error_type=None if passed is not False else "verification", error_message=None,
        propose_ms=0.0, validate_ms=0.0, act_ms=0.0, verify_ms=0.0, detail=None,
        step_id=f"s{i}", model=model, cost_usd=cost)


def run(monitor: DriftMonitor, events: Any) -> list[Any]:
    return [f for e in events for f in monitor.observe(e)]


def test_verification_drop_fires_once_with_its_evidence() -> None:
    rng = random.Random(7)
    monitor = DriftMonitor(DriftPolicy(reask_rate=None, exceedance=None))
    stable = run(monitor, (event(i, passed=rng.random() < 0.98) for i in range(3000)))
    assert stable == []
    drifted = run(monitor, (event(3000 + i, passed=rng.random() < 0.85) for i in range(400)))
    assert len(drifted) >= 1
    first = drifted[0]
    assert first.signal == "verification" and first.task_type == "t"
    assert first.actions == ("alert",)
    assert first.evidence["detector"]["kind"] == "bernoulli_cusum"
    assert first.evidence["last_step_id"].startswith("s")
    assert "verification pass rate dropped" in first.reason


def test_rearm_after_a_firing_suppresses_a_storm() -> None:
    policy = DriftPolicy(reask_rate=None, exceedance=None, rearm_steps=1000)
    monitor = DriftMonitor(policy)
    firings = run(monitor, (event(i, passed=False) for i in range(600)))
    assert len(firings) == 1  # every step fails: one firing, then 1000 steps re-arming
    snap = monitor.snapshot()[0]
    assert snap["rearming"] > 0 and snap["firings"] == 1
    no_rearm = DriftMonitor(DriftPolicy(reask_rate=None, exceedance=None, rearm_steps=0))
    assert len(run(no_rearm, (event(i, passed=False) for i in range(600)))) > 1


def test_reask_rate_rise_fires() -> None:
    rng = random.Random(3)
    monitor = DriftMonitor(DriftPolicy(verified_pass_rate=None, exceedance=None))
    assert run(monitor, (event(i, attempts=2 if rng.random() < 0.03 else 1)
                         for i in range(2000))) == []
    found = run(monitor, (event(2000 + i, attempts=2 if rng.random() < 0.4 else 1)
                          for i in range(300)))
    assert [f.signal for f in found][:1] == ["reask"]


def test_latency_learns_its_p95_then_detects_slow_steps() -> None:
    rng = random.Random(5)
    monitor = DriftMonitor(DriftPolicy(verified_pass_rate=None, reask_rate=None,
                                       learn_steps=500))
    assert run(monitor, (event(i, latency=rng.lognormvariate(5, 0.3)) for i in range(3000))) == []
    assert monitor.snapshot()[0]["phase"] == "watching"
    found = run(monitor, (event(3000 + i, latency=rng.lognormvariate(5.4, 0.3))
                          for i in range(500)))
    assert found and found[0].signal == "latency"
    assert found[0].evidence["threshold"] > 100


def test_cost_per_success_counts_the_failures_before_a_success() -> None:
    rng = random.Random(9)
    monitor = DriftMonitor(DriftPolicy(verified_pass_rate=None, reask_rate=None))
    # in control: every step succeeds at about 1 cent
    assert run(monitor, (event(i, cost=rng.uniform(0.009, 0.011), latency=100)
                         for i in range(2000))) == []
    # now every other step fails: each success carries two steps' cost
    found = run(monitor, (event(2000 + i, cost=rng.uniform(0.009, 0.011), latency=100,
                                passed=i % 2 == 0) for i in range(400)))
    assert [f.signal for f in found][:1] == ["cost_per_success"]


def test_per_model_detectors_are_separate() -> None:
    monitor = DriftMonitor(DriftPolicy(reask_rate=None, exceedance=None))
    found = run(monitor, (event(i, passed=i % 2 == 0, model="m1") for i in range(300)))
    run(monitor, (event(i, model="m2") for i in range(300)))
    assert {f.model for f in found} == {"m1"}
    assert {r["model"] for r in monitor.snapshot()} == {"m1", "m2"}
    merged = DriftMonitor(DriftPolicy(reask_rate=None, exceedance=None, by_model=False))
    run(merged, (event(i, model=f"m{i % 2}") for i in range(10)))
    assert {r["model"] for r in merged.snapshot()} == {None}


def test_scores_falling_fire_through_observe_value() -> None:
    rng = random.Random(1)
    monitor = DriftMonitor(DriftPolicy(learn_steps=200))
    for i in range(1000):
        assert monitor.observe_value("t", None, "score:q", rng.gauss(0.8, 0.05),
                                     at=float(i)) == []
    found = []
    for i in range(200):
        found += monitor.observe_value("t", None, "score:q", rng.gauss(0.7, 0.05),
                                       at=1000.0 + i, trace_id="ab" * 16)
    assert found and found[0].signal == "score:q"
    assert found[0].evidence["last_trace_id"] == "ab" * 16
    assert found[0].evidence["detector"]["direction"] == "down"


def test_budget_burn_fires_with_the_budget_actions() -> None:
    monitor = DriftMonitor(DriftPolicy(verified_pass_rate=None, reask_rate=None,
                                       exceedance=None, budget_usd_per_min=1.0))
    # 0.01 USD per second: 0.6 USD a minute, under budget
    assert run(monitor, (event(i, cost=0.01) for i in range(600))) == []
    found = run(monitor, (event(600 + i, cost=0.05) for i in range(60)))
    assert len(found) == 1  # quiet for a minute after a firing
    assert found[0].signal == "burn_usd" and found[0].actions == ("pause", "alert")
    assert found[0].evidence["spent_last_minute"] >= 1.0
    tokens = DriftMonitor(DriftPolicy(verified_pass_rate=None, reask_rate=None,
                                      exceedance=None, budget_tokens_per_min=1000))
    assert [f.signal for f in run(tokens, (event(i, tokens=50) for i in range(30)))] == [
        "burn_tokens"]


def test_refused_steps_and_unwatched_task_types_are_ignored() -> None:
    monitor = DriftMonitor(None, policies={"watched": DriftPolicy(exceedance=None)})
    assert run(monitor, (event(i, task="other", passed=False) for i in range(500))) == []
    assert run(monitor, (event(i, task="watched", passed=False, outcome="paused")
                         for i in range(500))) == []
    assert monitor.snapshot() == []


def test_states_saved_and_loaded_continue() -> None:
    rng = random.Random(2)
    events = [event(i, passed=rng.random() < 0.9, latency=rng.uniform(50, 150), cost=0.01)
              for i in range(1500)]
    whole = DriftMonitor(DriftPolicy(learn_steps=100))
    expected = [(f.signal, f.at) for f in whole.feed(events)]
    first = DriftMonitor(DriftPolicy(learn_steps=100))
    got = [(f.signal, f.at) for f in first.feed(events[:700])]
    second = DriftMonitor(DriftPolicy(learn_steps=100))
    second.load("t", first.state_of("t"))
    got += [(f.signal, f.at) for f in second.feed(events[700:])]
    assert expected and got[: len(expected)] == expected[: len(got)]
    assert len(got) >= len(expected) - 1  # the pending cost of a failure streak is not saved
    with pytest.raises(cl.ConfigError):
        second.load("t", {"x\x1fverification": {"kind": "bernoulli"}})


def test_bad_policies_are_config_errors() -> None:
    for bad in ({"verified_pass_rate": (0.9, 0.98)}, {"actions": ("explode",)},
                {"actions": "alert"}, {"learn_steps": 3}, {"budget_usd_per_min": -1},
                {"reask_rate": (0.5,)}):
        with pytest.raises(cl.ConfigError):
            DriftPolicy(**bad)
    policy = DriftPolicy(signal_actions={"score": ("halt",), "latency": ("pause",)})
    assert policy.actions_for("score:q") == ("halt",)
    assert policy.actions_for("latency") == ("pause",)
    assert policy.actions_for("verification") == ("alert",)
    assert policy.actions_for("burn_usd") == ("pause", "alert")
