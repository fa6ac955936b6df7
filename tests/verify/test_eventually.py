"""Polling until the state converges or a deadline passes, with an injected clock."""

from __future__ import annotations

from typing import Any

import pytest

import closedloop as cl
from closedloop.verify import AsyncEventually, Eventually


class Lagging:
    """A verifier that fails until the clock reaches ``ready_at``."""

    name = "lagging"

    def __init__(self, now: list[float], ready_at: float, unknown: bool = False) -> None:
        self.now = now
        self.ready_at = ready_at
        self.unknown = unknown
        self.calls = 0

    def __call__(self, intent: Any, result: Any) -> cl.Verdict:
        self.calls += 1
        if self.now[0] >= self.ready_at:
            return cl.Verdict.ok()
        if self.unknown:
            return cl.Verdict.cannot_tell("endpoint refused the connection")
        return cl.Verdict.fail(cl.Issue(code="state", message="pending, expected running"))


def fake_time() -> tuple[list[float], Any, Any]:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    return now, (lambda: now[0]), sleep


def test_immediate_pass_is_returned_unchanged() -> None:
    now, clock, sleep = fake_time()
    verdict = Eventually(Lagging(now, 0.0), clock=clock, sleep=sleep)(None, None)
    assert verdict.passed
    assert verdict.issues == ()


def test_converging_state_passes_and_records_the_wait() -> None:
    now, clock, sleep = fake_time()
    inner = Lagging(now, 3.0)
    verdict = Eventually(inner, timeout=30, interval=1, backoff=2, clock=clock,
                         sleep=sleep)(None, None)
    assert verdict.passed
    assert inner.calls == 3  # t = 0, 1, 3
    (note,) = verdict.issues
    assert (note.code, note.severity) == ("converged", cl.Severity.WARNING)
    assert note.message == "state converged after 3 checks over 3.00 s"


def test_deadline_returns_the_last_failure_with_the_wait() -> None:
    now, clock, sleep = fake_time()
    verdict = Eventually(Lagging(now, 100.0), timeout=10, interval=1, backoff=2,
                         clock=clock, sleep=sleep)(None, None)
    assert not verdict.passed
    assert [i.code for i in verdict.issues] == ["state", "not_converged"]
    assert now[0] == 10.0  # slept exactly up to the deadline, not past it


def test_unknown_until_the_deadline_stays_unknown() -> None:
    now, clock, sleep = fake_time()
    verdict = Eventually(Lagging(now, 100.0, unknown=True), timeout=5, interval=1,
                         clock=clock, sleep=sleep)(None, None)
    assert verdict.unknown is not None
    assert "still unknown after" in verdict.unknown


def test_interval_backs_off_up_to_the_maximum() -> None:
    now, clock, _ = fake_time()
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    Eventually(Lagging(now, 100.0), timeout=40, interval=1, backoff=2, max_interval=8,
               clock=clock, sleep=sleep)(None, None)
    assert slept == [1, 2, 4, 8, 8, 8, 8, 1]


def test_a_crashing_verifier_propagates() -> None:
    def broken(intent: Any, result: Any) -> None:
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        Eventually(broken)(None, None)


def test_bad_options_are_config_errors() -> None:
    with pytest.raises(cl.ConfigError):
        Eventually(lambda i, r: None, timeout=0)


async def test_async_polling_awaits_async_verifiers() -> None:
    now, clock, _ = fake_time()

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    inner = Lagging(now, 2.0)

    async def verifier(intent: Any, result: Any) -> cl.Verdict:
        return inner(intent, result)

    verdict = await AsyncEventually(verifier, timeout=30, interval=1, clock=clock,
                                    sleep=sleep)(None, None)
    assert verdict.passed
    assert [i.code for i in verdict.issues] == ["converged"]


async def test_async_polling_in_the_loop(memory_store: cl.Store) -> None:
    now, clock, _ = fake_time()

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    loop = cl.Loop(lambda t, a: "p", task_type="poll", executor=lambda p: "done",
                   verifiers=[AsyncEventually(Lagging(now, 2.0), timeout=30, interval=1,
                                              clock=clock, sleep=sleep)],
                   store=memory_store)
    result = await loop.arun("x")
    assert result.outcome is cl.Outcome.SUCCEEDED
    assert result.verification[0].check == "lagging"
