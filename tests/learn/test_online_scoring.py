"""Online scoring owned by the runtime (``configure(scorers=...)``), and drift detection fed
off the agent's thread (``configure(drift=...)``): the same decisions, the agent never waits
for them and never sees a scorer fail."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.learn import DriftGuard, DriftPolicy, OnlineScorer
from closedloop.store import span_store_for

WAIT_S = 30.0


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def quality(event: cl.StepEvent) -> float:
    return 1.0 if event.outcome == "succeeded" else 0.0


def judge_down(event: cl.StepEvent) -> float:
    raise RuntimeError("judge unreachable")


def test_configure_scorers_scores_every_recorded_step_and_records_scorer_failures(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    rt = cl.configure(store=url, scorers=[quality, judge_down])
    scorer = rt.online_scorer
    assert scorer is not None
    loop = cl.Loop(lambda task, attempt: task, task_type="triage")
    results = [loop.run(i) for i in range(20)]
    assert all(r.outcome is cl.Outcome.SUCCEEDED for r in results)  # the agent never saw it
    cl.reset()  # stops the scorer once every recorded step is scored
    assert (scorer.steps, scorer.scored, scorer.failures) == (20, 20, {"judge_down": 20})
    with cl.open_store(url, read_only=True) as store:
        scores = span_store_for(store).scores()
    by_name: dict[str, list[Any]] = {}
    for s in scores:
        by_name.setdefault(s.name, []).append(s)
    assert sorted(s.trace_id for s in by_name["quality"]) == sorted(r.trace_id for r in results)
    assert {s.value for s in by_name["quality"]} == {1.0}
    assert {(s.label, s.comment) for s in by_name["judge_down"]} == {
        ("scorer_failed", "RuntimeError: judge unreachable")}


def test_the_scorer_stops_with_the_runtime_and_one_runtime_owns_one(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    first = cl.configure(store=url, scorers={"q": quality})
    scorer = first.online_scorer
    assert scorer is not None
    second = cl.configure(store=url)  # replaces (and closes) the first runtime
    assert first.online_scorer is None and second.online_scorer is None
    assert scorer not in second.store.sinks
    cl.Loop(lambda task, attempt: task, task_type="t").run(1)
    second.flush()
    assert scorer.steps == 0  # detached: steps recorded afterwards are not its


def test_a_full_scoring_queue_drops_and_counts_instead_of_blocking(
        memory_store: cl.Store) -> None:
    release = threading.Event()

    def slow(event: cl.StepEvent) -> float:
        release.wait(WAIT_S)
        return 1.0

    scorer = OnlineScorer(memory_store, {"slow": slow}, max_queue=5).attach()
    loop = cl.Loop(lambda task, attempt: task, task_type="t", store=memory_store, guards=())
    try:
        for i in range(200):
            loop.run(i)
            if i % 20 == 0:
                memory_store.flush()  # batches reach the scorer while it is stuck
        assert memory_store.flush()  # the store's writer was never held up by the scorer
        assert scorer.stats().dropped > 0
    finally:
        release.set()
        scorer.close()
    stats = scorer.stats()
    assert stats.written + stats.dropped == 200


def test_bad_scorers_fail_in_configure() -> None:
    with pytest.raises(cl.ConfigError, match="distinct __name__"):
        cl.configure(scorers=[lambda e: 1.0])
    with pytest.raises(cl.ConfigError, match="dict of name"):
        cl.configure(scorers="quality")  # type: ignore[arg-type]


def _stream(n: int, seed: int) -> list[cl.StepEvent]:
    rng = random.Random(seed)
    return [cl.StepEvent(
        ts=1_800_000_000.0 + i * 0.01, trace_id=f"{i:032x}", agent_id="a", task_type="t",
        autonomy="autonomous", outcome="succeeded", attempts=1 + (rng.random() < 0.03),
        input_tokens=0, output_tokens=0, latency_ms=rng.lognormvariate(6.0, 0.5),
        validation_passed=True, verification_passed=rng.random() < (0.98 if i < 600 else 0.8),
        error_type=None, error_message=None, propose_ms=0.0, validate_ms=0.0, act_ms=0.0,
        verify_ms=0.0, detail=None) for i in range(n)]


def test_a_background_drift_guard_reaches_the_inline_guards_decisions() -> None:
    policy = DriftPolicy(learn_steps=200)
    inline = DriftGuard(policy=policy, sinks=[], save_every=0)
    background = DriftGuard(policy=policy, sinks=[], save_every=0, background=True)
    try:
        for event in _stream(3000, 7):
            inline.observe(event)
            background.observe(event)
        background.flush()
        assert inline.fired  # the stream drifts
        assert [f.to_dict() for f in background.fired] == [f.to_dict() for f in inline.fired]
    finally:
        background.close()


def test_configured_drift_pauses_the_task_type_from_its_own_thread(tmp_path: Path) -> None:
    rt = cl.configure(store=f"sqlite:///{tmp_path / 'events.db'}",
                      drift=DriftPolicy(actions=("pause",), learn_steps=50,
                                        verified_pass_rate=(0.98, 0.6),
                                        exceedance=None))  # no wall-clock latency signal
    fed_on: set[str] = set()
    rng = random.Random(3)
    seen = [0]

    def verifier(task: object, result: object) -> bool:
        seen[0] += 1
        return seen[0] <= 100 or rng.random() < 0.3

    loop = cl.Loop(lambda task, attempt: task, task_type="deploy", executor=lambda p: p,
                   verifiers=[verifier])
    guard = rt.drift_for(rt.store)
    assert guard is not None and guard._queue is not None  # fed in the background
    original = guard._observe_now

    def spy(event: cl.StepEvent) -> None:
        fed_on.add(threading.current_thread().name)
        original(event)
    guard._observe_now = spy  # type: ignore[method-assign]
    outcomes: list[str] = []

    def paused() -> bool:
        outcomes.append(str(loop.run(len(outcomes)).outcome))
        return outcomes[-1] == "paused"
    wait_for(paused, "the drift guard paused the task type")
    assert fed_on == {"closedloop-drift-feed"}  # never the agent's thread
    assert guard.fired and guard.fired[0].signal == "verification"
