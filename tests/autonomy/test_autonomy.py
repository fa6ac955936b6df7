"""Progressive autonomy in the loop: stored levels decide the gate, evidence earns promotions,
a change detector demotes, and the store failing never makes a step more autonomous."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

import closedloop as cl
from _doubles import Executor
from closedloop.autonomy import (
    AutonomyLevels,
    AutonomyPolicy,
    Decisions,
    LevelKey,
    LevelStore,
    count_events,
    wilson_lower,
)
from closedloop.control import CaptureSink, FaultControl, MemoryLedger
from closedloop.store import MemoryLevelStore


@pytest.fixture
def store() -> Iterator[cl.Store]:
    s = cl.open_store("memory://")
    yield s
    s.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()  # events are stamped by the real wall clock

    def __call__(self) -> float:
        return self.now


def echo(task: Any, attempt: cl.Attempt) -> Any:
    return task


def outcomes(results: list[cl.StepResult[Any, Any]]) -> list[str]:
    return [r.outcome.value for r in results]


# ----- the loop follows the stored level ----------------------------------------------------

def test_an_unpinned_loop_runs_at_the_stored_level(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0)
    executor = Executor()
    loop = cl.Loop(echo, task_type="provision", executor=executor, store=store, levels=levels,
                   approver=lambda task, proposal: proposal != "no")
    assert not loop.pinned
    assert loop.run("a").outcome is cl.Outcome.SUCCEEDED  # nothing stored: the default
    levels.set("provision", "suggest", by="alice", reason="new agent")
    assert loop.run("b").outcome is cl.Outcome.SUGGESTED
    levels.set("provision", "approve", by="alice", reason="agreement earned")
    assert outcomes([loop.run("c"), loop.run("no")]) == ["succeeded", "rejected"]
    assert executor.calls == 2  # "a" and "c"
    store.flush()
    assert [e.autonomy for e in store.events()] == ["autonomous", "suggest", "approve",
                                                    "approve"]


def _levels_asked(loop: cl.Loop, task_input: Any) -> tuple[int, cl.StepResult[Any, Any]]:
    """How many Level actions a step of ``loop`` yielded (stored-level lookups asked)."""
    from closedloop.loop import Level
    from closedloop.loop._machine import step_machine

    asked = 0
    machine = step_machine(loop._spec, task_input, "0" * 32)
    try:
        action = next(machine)
        while True:
            asked += isinstance(action, Level)
            action = machine.send(action.fn(*action.args))
    except StopIteration as stop:
        return asked, stop.value


def test_a_fresh_level_is_taken_from_memory_and_a_change_is_asked_again(
        store: cl.Store) -> None:
    clock = Clock()
    levels = AutonomyLevels(store, cache_s=60.0, clock=clock)
    loop = cl.Loop(echo, task_type="provision", executor=Executor(), store=store,
                   levels=levels, guards=())
    assert _levels_asked(loop, "a")[0] == 1  # read from the store
    asked, result = _levels_asked(loop, "b")
    assert (asked, result.outcome) == (0, cl.Outcome.SUCCEEDED)  # known: no action
    levels.set("provision", "suggest", by="alice", reason="new agent")  # forgets the memo
    asked, result = _levels_asked(loop, "c")
    assert (asked, result.outcome) == (1, cl.Outcome.SUGGESTED)
    asked, result = _levels_asked(loop, "d")
    assert (asked, result.outcome) == (0, cl.Outcome.SUGGESTED)  # the new level, from memory
    clock.now += 60.0  # stale: asked again
    assert _levels_asked(loop, "e")[0] == 1


def test_a_loop_with_a_classifier_always_asks_its_level(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=60.0)
    levels.set("provision", "suggest", by="alice", reason="scaling is new",
               action_class="scale")
    common: dict[str, Any] = {"task_type": "provision", "executor": Executor(), "store": store,
                              "levels": levels, "guards": (), "agent_id": "a"}
    plain = cl.Loop(echo, **common)
    assert plain.run(1).ok and plain.run(2).ok  # the unclassified level, memoised
    classified = cl.Loop(echo, classify=lambda proposal: "scale", **common)
    found = [_levels_asked(classified, i) for i in range(3)]
    assert [(asked, r.outcome) for asked, r in found] == [(1, cl.Outcome.SUGGESTED)] * 3


async def test_arun_follows_the_stored_level_of_the_action_class(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0)
    levels.set("db", "autonomous", by="alice", reason="replicas are safe",
               action_class="create_replica")
    levels.set("db", "approve", by="alice", reason="always a human", action_class="drop",
               ceiling="approve")
    levels.set("db", "suggest", by="alice", reason="everything else")

    async def agent(task: str, attempt: cl.Attempt) -> dict[str, str]:
        return {"op": task}

    async def executor(proposal: dict[str, str]) -> str:
        return "done"

    loop = cl.Loop(agent, task_type="db", executor=executor, store=store, levels=levels,
                   classify=lambda p: p["op"] if p["op"] != "other" else None)
    results = [await loop.arun(op) for op in ("create_replica", "drop", "other")]
    assert outcomes(results) == ["succeeded", "awaiting_approval", "suggested"]
    store.flush()
    assert [(e.autonomy, (e.detail or {}).get("autonomy")) for e in store.events()] == [
        ("autonomous", {"class": "create_replica", "source": "stored"}),
        ("approve", {"class": "drop", "source": "stored"}),
        ("suggest", None)]


def test_an_agent_level_beats_the_any_agent_level(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0)
    levels.set("t", "suggest", by="a", reason="r")
    levels.set("t", "autonomous", by="a", reason="r", agent_id="trusted")
    trusted = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                      agent_id="trusted")
    other = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                    agent_id="new")
    assert outcomes([trusted.run(1), other.run(1)]) == ["succeeded", "suggested"]


def test_a_policy_ceiling_caps_a_class_whatever_is_stored(store: cl.Store) -> None:
    policy = AutonomyPolicy(ceilings={"delete_database": "approve"})
    levels = AutonomyLevels(store, policy=policy, cache_s=0.0)
    levels.set("db", "autonomous", by="a", reason="r")
    loop = cl.Loop(echo, task_type="db", executor=Executor(), store=store, levels=levels,
                   classify=lambda p: p)
    assert outcomes([loop.run("delete_database"), loop.run("create_replica")]) == [
        "awaiting_approval", "succeeded"]


def test_a_pinned_loop_ignores_stored_levels(store: cl.Store) -> None:
    levels = AutonomyLevels(store)
    levels.set("t", "suggest", by="a", reason="r")
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                   autonomy="autonomous")
    assert loop.pinned and loop.run(1).ok
    with pytest.raises(cl.ConfigError, match="classify"):
        cl.Loop(echo, task_type="t", autonomy="approve", classify=lambda p: "x")


def test_reads_are_cached_for_cache_s(store: cl.Store) -> None:
    clock = Clock()
    levels = AutonomyLevels(store, cache_s=5.0, clock=clock)
    other = AutonomyLevels(store)  # another process changing the level
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels)
    assert loop.run(1).ok
    other.set("t", "suggest", by="a", reason="r")
    clock.now += 4.9
    assert loop.run(2).ok  # still the cached level
    clock.now += 0.2
    assert loop.run(3).outcome is cl.Outcome.SUGGESTED


def test_the_default_runtime_gives_every_loop_on_a_store_the_same_levels(
        store: cl.Store) -> None:
    rt = cl.current_runtime()
    levels = rt.levels_for(store)
    assert levels is not None and levels is rt.levels_for(store)
    levels.set("t", "suggest", by="a", reason="r")
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store)
    assert loop.run(1).outcome is cl.Outcome.SUGGESTED


# ----- failing closed -----------------------------------------------------------------------

class Flaky(MemoryLevelStore):
    """A level store that can be made unreadable."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def levels(self, task_type: str | None = None) -> list[Any]:
        if self.down:
            raise cl.ControlUnavailable("disk I/O error")
        return super().levels(task_type)


def test_never_read_and_unreadable_is_at_most_approve(store: cl.Store) -> None:
    flaky = Flaky()
    flaky.down = True
    levels = AutonomyLevels(store, levels=flaky, cache_s=0.0)
    executor = Executor()
    loop = cl.Loop(echo, task_type="t", executor=executor, store=store, levels=levels)
    result = loop.run(1)
    assert result.outcome is cl.Outcome.AWAITING_APPROVAL and executor.calls == 0
    assert result.event is not None and result.event.detail is not None
    assert result.event.detail["autonomy"] == {"class": None, "source": "unreadable"}
    # at `approve` without an inline approver, the step waits as a durable request
    assert result.approval_id is not None
    assert result.event.detail["approval"] == {"request_id": result.approval_id}
    assert levels.unreadable == 1
    suggest = AutonomyLevels(store, levels=flaky, default="suggest")
    assert suggest.resolve("t").level is cl.Autonomy.SUGGEST  # min(default, approve)


def test_unreadable_keeps_the_last_level_read_however_old(store: cl.Store) -> None:
    flaky, clock = Flaky(), Clock()
    levels = AutonomyLevels(store, levels=flaky, cache_s=1.0, clock=clock)
    levels.set("t", "suggest", by="a", reason="r")
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels)
    assert loop.run(1).outcome is cl.Outcome.SUGGESTED
    flaky.down = True
    clock.now += 3600
    result = loop.run(2)
    assert result.outcome is cl.Outcome.SUGGESTED
    assert result.event is not None
    assert result.event.detail == {"autonomy": {"class": None, "source": "last known"}}


def test_a_crashing_classifier_runs_nothing_more_autonomous(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0)
    levels.set("t", "approve", by="a", reason="r")
    levels.set("t", "autonomous", by="a", reason="r", action_class="safe")

    def classify(p: object) -> str:
        raise RuntimeError("boom")

    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                   classify=classify)
    result = loop.run(1)
    assert result.outcome is cl.Outcome.AWAITING_APPROVAL
    assert result.event is not None and result.event.detail is not None
    assert result.event.detail["autonomy"]["class"] == "unclassified"


def test_a_lookup_that_raises_in_the_machine_fails_closed(store: cl.Store) -> None:
    class Broken(AutonomyLevels):
        def resolver(self, *args: Any) -> Any:
            def boom(proposal: object) -> Any:
                raise RuntimeError("no")
            return boom

    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store,
                   levels=Broken(store))
    assert loop.run(1).outcome is cl.Outcome.AWAITING_APPROVAL


# ----- evidence and promotion ---------------------------------------------------------------

def test_wilson_lower_bound() -> None:
    assert wilson_lower(0, 0) == 0.0
    assert wilson_lower(50, 50) == pytest.approx(0.9287, abs=1e-4)
    assert wilson_lower(95, 100) == pytest.approx(0.8882, abs=1e-4)
    assert wilson_lower(950, 1000) < 0.95 < wilson_lower(990, 1000)


def test_suggestions_with_agreement_earn_approve_and_only_then(store: cl.Store) -> None:
    clock = Clock()
    policy = AutonomyPolicy(min_decisions=20, min_agreement=0.8)
    levels = AutonomyLevels(store, policy=policy, clock=clock, cache_s=0.0)
    levels.set("t", "suggest", by="alice", reason="start")
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels)
    steps = [loop.run(i).event for i in range(40)]
    key = LevelKey(task_type="t")
    (found,) = levels.recommend()
    assert not found.ready and found.target == "approve"
    assert found.evidence.suggestions == 40 and found.evidence.agreement.trials == 0
    assert "20 more suggestions with feedback" in " ".join(found.needs)
    for i, event in enumerate(steps[:30]):
        assert event is not None and event.step_id is not None
        levels.record_feedback(event.step_id, agreed=i != 3, by="bob")
    found = levels.assess(key)
    assert found.ready, found.needs
    assert (found.evidence.agreement.successes, found.evidence.agreement.trials) == (29, 30)
    assert levels.resolve("t").level is cl.Autonomy.SUGGEST  # recommended, not applied
    (_applied,) = levels.recommend(apply=True, by="carol")
    assert levels.resolve("t").level is cl.Autonomy.APPROVE
    change = levels.levels.history(task_type="t")[0]
    assert (change.kind, change.old, change.new, change.by) == ("promoted", "suggest",
                                                                 "approve", "carol")
    assert change.evidence["agreement"]["trials"] == 30
    # the evidence starts again at the new level: nothing counts yet
    assert levels.assess(key).evidence.approval.trials == 0


def test_approval_and_verification_earn_autonomy(store: cl.Store) -> None:
    clock = Clock()
    policy = AutonomyPolicy(min_decisions=30, min_approval=0.85, min_verification=0.85)
    levels = AutonomyLevels(store, policy=policy, clock=clock, cache_s=0.0)
    levels.set("t", "approve", by="alice", reason="start")
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                   approver=lambda task, p: p % 25 != 0,
                   verifiers=[lambda intent, result: result % 40 != 1])
    for i in range(1, 61):
        loop.run(i)
    found = levels.assess(LevelKey(task_type="t"))
    ev = found.evidence
    assert (ev.approval.successes, ev.approval.trials) == (58, 60)
    assert (ev.verification.successes, ev.verification.trials) == (56, 58)
    assert found.ready and found.target == "autonomous"
    assert levels.review("t") == []  # not opted in: nothing applied
    opted = AutonomyLevels(store, policy=AutonomyPolicy(
        min_decisions=30, min_approval=0.85, min_verification=0.85, auto_promote=True),
        clock=clock)
    (change,) = opted.review("t")
    assert change.new == "autonomous" and "auto-promotion" in change.by


def test_the_approval_contract_counts_executions_rejections_and_expiries() -> None:
    def ev(autonomy: str, outcome: str, error_type: str | None = None,
           verified: bool | None = None) -> cl.StepEvent:
        return cl.StepEvent(ts=10.0, trace_id="0" * 32, agent_id="a", task_type="t",
                            autonomy=autonomy, outcome=outcome, attempts=1, input_tokens=0,
                            output_tokens=0, latency_ms=1.0, validation_passed=True,
                            verification_passed=verified, error_type=error_type,
                            error_message=None, propose_ms=0, validate_ms=0, act_ms=0,
                            verify_ms=0, detail=None, step_id="1" * 32)
    events = [ev("approve", "succeeded", verified=True),
              ev("approve", "failed", "verification", verified=False),
              ev("approve", "error", "executor"),
              ev("approve", "rejected"), ev("approve", "expired"),
              ev("approve", "error", "agent"),  # never reached the gate
              ev("approve", "failed", "validation"),
              ev("autonomous", "succeeded", verified=True)]
    found = count_events(LevelKey(task_type="t"), events, {}, level="approve", since=0.0)
    assert (found.approval.successes, found.approval.trials, found.expired) == (3, 4, 1)
    assert (found.verification.successes, found.verification.trials) == (2, 3)
    # a decision source replaces the counts of steps that went through a durable request;
    # inline approver= decisions (no request named in the event) still count from the events
    plugged = count_events(LevelKey(task_type="t"), events, {}, level="approve", since=0.0,
                           decisions=Decisions(approved=9, rejected=1))
    assert (plugged.approval.successes, plugged.approval.trials) == (12, 14)
    durable = [e._replace(detail={"approval": {"request_id": "r"}}) for e in events]
    plugged = count_events(LevelKey(task_type="t"), durable, {}, level="approve", since=0.0,
                           decisions=Decisions(approved=9, rejected=1, expired=2))
    assert (plugged.approval.successes, plugged.approval.trials, plugged.expired) == (9, 10, 2)


def test_what_it_takes_is_said_in_numbers(store: cl.Store) -> None:
    levels = AutonomyLevels(store, policy=AutonomyPolicy(min_decisions=10))
    levels.set("t", "approve", by="a", reason="r", ceiling="approve")
    found = levels.assess(LevelKey(task_type="t"))
    assert found.target is None and found.needs == ("at its ceiling (approve)",)


# ----- demotion -----------------------------------------------------------------------------

def drifting_verifier(seed: int, change_at: int) -> Any:
    rng = random.Random(seed)
    seen = [0]

    def verify(intent: object, result: object) -> bool:
        seen[0] += 1
        return rng.random() < (0.98 if seen[0] <= change_at else 0.85)

    return verify


def test_a_drop_in_verification_demotes_to_approve_with_an_alert(store: cl.Store) -> None:
    sink = CaptureSink()
    levels = AutonomyLevels(store, sinks=[sink], cache_s=0.0)
    fault = FaultControl(ledger=MemoryLedger(), sinks=[], halt_after=10_000)
    loop = cl.Loop(echo, task_type="provision", executor=Executor(), store=store,
                   levels=levels, guards=[fault, levels.monitor()],
                   verifiers=[drifting_verifier(seed=1, change_at=1000)])
    demoted_at = None
    for i in range(3000):
        result = loop.run(i)
        if result.outcome is cl.Outcome.AWAITING_APPROVAL:
            demoted_at = i
            break
    assert demoted_at is not None and 1000 < demoted_at < 1400
    (alert,) = sink.alerts
    assert alert.kind == "demoted" and alert.subject == "provision"
    (change,) = levels.levels.history(task_type="provision")
    assert (change.kind, change.old, change.new) == ("demoted", None, "approve")
    assert "CUSUM" in change.reason and change.evidence["detector"]["kind"] == "bernoulli_cusum"
    # hysteresis: no promotion back while cooling down, whatever the evidence
    assert any("cooling down" in n for n in levels.assess(LevelKey(task_type="provision")).needs)


def test_a_stable_agent_is_not_demoted(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0)
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                   guards=[levels.monitor()], verifiers=[drifting_verifier(2, 10**9)])
    assert all(loop.run(i).ok or True for i in range(3000))
    assert levels.levels.history() == [] and levels.resolve("t").level is cl.Autonomy.AUTONOMOUS


def test_failures_that_continue_at_approve_are_halted(store: cl.Store) -> None:
    levels = AutonomyLevels(store, cache_s=0.0, sinks=[])
    levels.set("t", "approve", by="a", reason="demoted earlier")
    fault = FaultControl(ledger=MemoryLedger(), sinks=[])
    executor = Executor()
    loop = cl.Loop(echo, task_type="t", executor=executor, store=store, levels=levels,
                   guards=[fault, levels.monitor()], approver=lambda t, p: True,
                   verifiers=[lambda intent, result: False])
    results = [loop.run(i) for i in range(8)]
    assert outcomes(results)[:5] == ["failed"] * 5
    assert set(outcomes(results)[5:]) == {"halted"} and executor.calls == 5


def test_an_unstorable_demotion_stays_in_force_here(store: cl.Store) -> None:
    class NoWrites(MemoryLevelStore):
        def set_level(self, *args: Any, **kwargs: Any) -> Any:
            raise cl.ControlUnavailable("read-only")

    levels = AutonomyLevels(store, levels=NoWrites(), cache_s=0.0, sinks=[])
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                   guards=[levels.monitor()], verifiers=[lambda i, r: False])
    results = [loop.run(i) for i in range(60)]
    assert "awaiting_approval" in outcomes(results)
    first = outcomes(results).index("awaiting_approval")
    assert set(outcomes(results)[first:]) == {"awaiting_approval"}


def test_the_detector_state_is_saved_and_resumed(store: cl.Store) -> None:
    shared: LevelStore = MemoryLevelStore()
    clock = Clock()
    one = AutonomyLevels(store, levels=shared, sinks=[], clock=clock)
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=one,
                   guards=[one.monitor()], verifiers=[lambda i, r: i % 10 != 0])
    for i in range(1, 100):
        loop.run(i)
    assert shared.detector("autonomy.demote:t:*:") is None  # not a write per step
    clock.now += 30.0
    loop.run(100)
    saved = shared.detector("autonomy.demote:t:*:")
    assert saved is not None and saved["steps"] == 100 and saved["statistic"] > 0
    two = AutonomyLevels(store, levels=shared, sinks=[])  # a restarted process resumes it
    loop2 = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=two,
                    guards=[two.monitor()], verifiers=[lambda i, r: True])
    loop2.run(1)
    assert two._detectors[LevelKey(task_type="t")].state.steps == 101


def test_feedback_needs_a_step_id() -> None:
    levels = AutonomyLevels(levels=MemoryLevelStore())
    with pytest.raises(cl.ConfigError):
        levels.record_feedback("not-a-step", agreed=True)
    assert levels.record_feedback("AB" * 16, agreed=False, by="x").step_id == "ab" * 16


def test_level_names_are_checked() -> None:
    levels = AutonomyLevels(levels=MemoryLevelStore())
    with pytest.raises(cl.ConfigError, match="unknown autonomy level"):
        levels.set("t", "yolo", by="a", reason="r")
    with pytest.raises(cl.ConfigError, match="reason"):
        levels.set("t", "approve", by="a", reason="  ")
    assert time.time() > 0


def test_the_level_lookup_is_no_span_of_its_own(store: cl.Store) -> None:
    from closedloop.telemetry import MemoryExporter, Telemetry

    exporter = MemoryExporter()
    pipeline = Telemetry([exporter])
    levels = AutonomyLevels(store)
    levels.set("t", "approve", by="a", reason="r")
    loop = cl.Loop(echo, task_type="t", executor=Executor(), store=store, levels=levels,
                   approver=lambda t, p: True, telemetry=pipeline)
    assert loop.run(1).ok
    pipeline.shutdown()
    names = [s.name for s in exporter.finished()]
    assert names == ["invoke_agent echo", "closedloop.attempt", "closedloop.gate",
                     "closedloop.act", "closedloop.step"]
