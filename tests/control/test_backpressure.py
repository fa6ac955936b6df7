"""Backpressure around calls: retries, Retry-After, budget, deadline, both drivers."""

from __future__ import annotations

import random
from collections.abc import Callable

import httpx
import pytest

from closedloop.control import (
    Backpressure,
    CircuitOpen,
    Grant,
    Limits,
    LocalRates,
    RetryBudget,
    RetryPolicy,
)

from ._clock import FakeClock


def _error(status: int, retry_after: str | None = None) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1/")
    headers = {"Retry-After": retry_after} if retry_after else None
    return httpx.HTTPStatusError("x", request=request,
                                 response=httpx.Response(status, headers=headers,
                                                         request=request))


def _flaky(*failures: BaseException) -> Callable[[], str]:
    pending = list(failures)

    def call() -> str:
        if pending:
            raise pending.pop(0)
        return "ok"
    return call


def _bp(clock: FakeClock, **kwargs: object) -> Backpressure:
    return Backpressure(clock=clock, sleep=clock.sleep, asleep=clock.asleep,
                        rng=random.Random(1), **kwargs)  # type: ignore[arg-type]


def test_a_429_is_retried_after_its_retry_after() -> None:
    clock = FakeClock()
    bp = _bp(clock)
    assert bp.call("llm", _flaky(_error(429, "1.5"))) == "ok"
    assert max(clock.slept) >= 1.5


def test_a_client_error_is_not_retried() -> None:
    clock = FakeClock()
    bp = _bp(clock)
    calls = []

    def bad() -> str:
        calls.append(1)
        raise _error(400)
    with pytest.raises(httpx.HTTPStatusError):
        bp.call("llm", bad)
    assert len(calls) == 1


def test_retries_stop_at_max_attempts_with_a_note() -> None:
    clock = FakeClock()
    bp = _bp(clock, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(httpx.HTTPStatusError) as info:
        bp.call("llm", _flaky(*[_error(503) for _ in range(5)]))
    assert "3 attempts made" in "".join(info.value.__notes__)


def test_a_spent_retry_budget_stops_retries() -> None:
    clock = FakeClock()
    bp = _bp(clock, budget_ratio=0.0, budget_min_per_second=0.0)
    with pytest.raises(httpx.HTTPStatusError) as info:
        bp.call("llm", _flaky(_error(503)))
    assert "retry budget" in "".join(info.value.__notes__)


def test_the_budget_caps_retries_at_a_fraction_of_calls() -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0.0, ttl=10.0)
    for _ in range(100):
        budget.record_call(0.0)
    granted = sum(budget.try_withdraw(1.0) for _ in range(50))
    assert granted == 10


def test_full_jitter_stays_within_the_exponential_bound() -> None:
    policy = RetryPolicy(base=0.1, cap=2.0)
    rng = random.Random(3)
    for retry in range(1, 10):
        assert 0.0 <= policy.backoff(retry, rng) <= min(2.0, 0.1 * 2 ** (retry - 1))


def test_an_open_circuit_fails_fast_when_the_deadline_is_short() -> None:
    clock = FakeClock()
    bp = _bp(clock, retry=RetryPolicy(max_attempts=1, deadline=0.1),
             limits=Limits(failure_threshold=1, open_for=30.0))
    with pytest.raises(httpx.HTTPStatusError):
        bp.call("llm", _flaky(_error(503)))
    with pytest.raises(CircuitOpen):
        bp.call("llm", lambda: "never")


def test_the_status_shows_each_key() -> None:
    clock = FakeClock()
    bp = _bp(clock)
    bp.call("openai/gpt-4o", lambda: "ok")
    status = bp.status()
    assert status["openai/gpt-4o"]["breaker"] == "closed"
    assert status["openai/gpt-4o"]["counts"]["ok"] == 1


async def test_the_async_driver_retries_the_same_way() -> None:
    clock = FakeClock()
    bp = _bp(clock)
    failures = [_error(429, "2")]

    async def call() -> str:
        if failures:
            raise failures.pop()
        return "ok"
    assert await bp.acall("llm", call) == "ok"
    assert max(clock.slept) >= 2.0


def test_the_in_flight_count_returns_to_zero_after_a_failure() -> None:
    clock = FakeClock()
    bp = _bp(clock)
    with pytest.raises(ValueError, match="boom"):
        bp.call("llm", _flaky(ValueError("boom")))
    assert bp.status()["llm"]["in_flight"] == 0


def test_the_process_wide_backpressure_is_built_once_and_can_be_reset(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from closedloop.control import LocalRates, default_backpressure, reset_default_backpressure

    monkeypatch.delenv("CLOSEDLOOP_REDIS_URL", raising=False)
    reset_default_backpressure()
    first = default_backpressure()
    assert isinstance(first.backend, LocalRates)
    assert default_backpressure() is first
    reset_default_backpressure()
    assert default_backpressure() is not first
    reset_default_backpressure()


class _Recording(LocalRates):
    """The local backend, noting which tickets callers confirm."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.confirmed: list[int] = []
        self.lateness: list[float] = []

    def confirm(self, key: str, limits: Limits, ticket: int, late: float = 0.0) -> Grant:
        self.confirmed.append(ticket)
        self.lateness.append(late)
        return super().confirm(key, limits, ticket, late)


def test_a_refused_call_retries_from_its_place_in_the_queue() -> None:
    clock = FakeClock()
    backend = _Recording(clock)
    bp = _bp(clock, backend=backend)
    bp.call("llm", lambda: "ok")  # ticket 0
    assert bp.call("llm", _flaky(_error(429, "0.5"))) == "ok"
    assert set(backend.confirmed) == {1}  # the retry went with its first attempt's ticket
    assert backend.state("llm").tickets == 2  # and did not queue again


async def test_the_async_driver_retries_from_its_place_too() -> None:
    clock = FakeClock()
    backend = _Recording(clock)
    bp = _bp(clock, backend=backend)
    failures = [_error(503)]

    async def call() -> str:
        if failures:
            raise failures.pop()
        return "ok"
    assert await bp.acall("llm", call) == "ok"
    assert set(backend.confirmed) == {0}
    assert backend.state("llm").tickets == 1


def test_the_driver_tells_the_key_how_late_a_waiter_woke() -> None:
    clock = FakeClock()
    backend = _Recording(clock)

    def oversleep(seconds: float) -> None:
        clock.sleep(seconds + 0.02)  # a loaded machine wakes it 20 ms late
    bp = Backpressure(clock=clock, sleep=oversleep, backend=backend,
                      limits=Limits(initial_rate=10.0, slow_start=1.0))
    bp.call("llm", lambda: "ok")
    bp.call("llm", lambda: "ok")  # waits for its slot, 100 ms later
    assert backend.lateness == [pytest.approx(0.02)]


def test_the_plan_yields_typed_operations_in_order() -> None:
    from closedloop.control._backpressure import Acquire, Call, Enter, Leave, Report

    clock = FakeClock()
    bp = _bp(clock)
    plan = bp._plan("llm", bp.limits)
    ops = [next(plan)]
    ops.append(plan.send(None))  # entered
    ops.append(plan.send(bp.backend.acquire("llm", bp.limits)))
    ops.append(plan.send("ok"))  # the call's value
    ops.append(plan.send(None))  # reported
    assert [type(op) for op in ops] == [Enter, Acquire, Call, Report, Leave]
    report = ops[3]
    assert isinstance(report, Report)
    assert (report.key, report.signal.value) == ("llm", "ok")
