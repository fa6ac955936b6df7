"""The per-key decision logic: pacing, adaptation, breaker — all on an injected clock."""

from __future__ import annotations

import heapq

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop import ConfigError
from closedloop.control import BreakerState, Grant, KeyState, Limits, Signal

FIXED = Limits(initial_rate=10.0, slow_start=1.0)  # a constant rate until told otherwise


def go(state: KeyState, limits: Limits, now: float) -> float:
    """Drive one caller through the queue as a driver would; return when it may go."""
    grant = state.acquire(limits, now)
    while not grant.ready:
        now += grant.wait
        grant = state.confirm(limits, now, grant.ticket) if grant.reserved else state.acquire(
            limits, now)
    return now


def test_the_first_call_goes_at_once() -> None:
    assert KeyState().acquire(FIXED, 0.0).ready


def test_queued_calls_are_spaced_one_interval_apart() -> None:
    state = KeyState()
    grants = [state.acquire(FIXED, 0.0) for _ in range(4)]
    assert [g.ticket for g in grants] == [0, 1, 2, 3]
    assert grants[0].wait == 0.0
    assert grants[3].wait == pytest.approx(0.25)  # capped by max_sleep, then confirmed
    assert go(KeyState(), FIXED, 0.0) == 0.0


def test_a_waiter_goes_when_its_turn_comes() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    grant = state.acquire(FIXED, 0.0)
    assert grant.wait == pytest.approx(0.1)
    assert state.confirm(FIXED, 0.1, grant.ticket).ready


def test_overload_sets_the_ceiling_to_the_delivered_rate_and_backs_off() -> None:
    limits = Limits(initial_rate=20.0, slow_start=1.0)
    state = KeyState()
    now = 0.0
    for _ in range(60):  # three seconds at 20/s, all succeeding
        now = go(state, limits, now)
        state.feedback(limits, now, Signal.OK, admitted_at=now)
    state.feedback(limits, now, Signal.OVERLOADED, admitted_at=now)
    assert state.ceiling == pytest.approx(20.0, rel=0.1)
    assert state.rate(limits, now) == pytest.approx(0.9 * state.ceiling)


def test_after_the_first_429_the_ceiling_becomes_what_was_delivered_since() -> None:
    limits = Limits(initial_rate=100.0, slow_start=1.0)
    state = KeyState()
    state.acquire(limits, 0.0)
    state.feedback(limits, 1.0, Signal.OVERLOADED, admitted_at=0.9)  # burst hid the limit
    assert state.ceiling == pytest.approx(100.0)  # provisional: the rate that was sent
    for i in range(10):  # the downstream then delivers 20/s
        state.feedback(limits, 1.0 + 0.05 * (i + 1), Signal.OK, admitted_at=1.0)
    state.feedback(limits, 1.5, Signal.OVERLOADED, admitted_at=1.4)
    assert state.ceiling == pytest.approx(20.0)
    assert state.rate(limits, 1.5) == pytest.approx(0.9 * 20.0)


def test_calls_sent_before_a_decrease_do_not_decrease_the_rate_again() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    state.feedback(FIXED, 1.0, Signal.OVERLOADED, admitted_at=0.9)
    after_first = state.rate(FIXED, 1.0)
    state.feedback(FIXED, 1.05, Signal.OVERLOADED, admitted_at=0.95)
    assert state.rate(FIXED, 1.05) >= after_first
    assert state.counts["decreases"] == 1


def test_the_rate_climbs_back_to_the_ceiling_after_an_overload() -> None:
    limits = Limits(initial_rate=20.0, slow_start=1.0)
    state = KeyState(ceiling=20.0, rate0=18.0, since=0.0)
    assert state.rate(limits, 0.0) == pytest.approx(18.0)
    assert state.rate(limits, 1.0) == pytest.approx(20.0, rel=0.01)  # the plateau


def test_the_rate_does_not_grow_while_nobody_waits() -> None:
    limits = Limits(initial_rate=10.0, slow_start=8.0)
    state = KeyState()
    state.acquire(limits, 0.0)
    state.acquire(limits, 100.0)  # a long idle spell, then one call
    assert state.rate(limits, 100.0) < 20.0


def test_slow_start_grows_the_rate_while_callers_queue() -> None:
    limits = Limits(initial_rate=10.0, slow_start=4.0)
    state = KeyState()
    for _ in range(50):
        state.acquire(limits, 0.0)
    state.acquire(limits, 1.0)
    assert state.rate(limits, 1.0) == pytest.approx(40.0, rel=0.05)


def test_a_client_error_neither_slows_down_nor_counts_against_the_downstream() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    for _ in range(10):
        state.feedback(FIXED, 0.5, Signal.REJECTED, admitted_at=0.0)
    assert state.rate(FIXED, 0.5) == pytest.approx(10.0)
    assert state.breaker is BreakerState.CLOSED


def test_consecutive_unavailability_opens_the_breaker() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    for i in range(FIXED.failure_threshold):
        state.feedback(FIXED, 0.1 * i, Signal.UNAVAILABLE, admitted_at=0.0)
    assert state.breaker is BreakerState.OPEN
    grant = state.acquire(FIXED, 0.5)
    assert not grant.reserved
    assert grant.reason == "circuit open"


def test_a_success_between_failures_keeps_the_breaker_closed() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    for i in range(FIXED.failure_threshold * 2):
        signal = Signal.OK if i % 3 == 2 else Signal.TIMEOUT
        state.feedback(FIXED, 0.01 * i, signal, admitted_at=0.0)
    assert state.breaker is BreakerState.CLOSED


def _tripped() -> KeyState:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    for _ in range(FIXED.failure_threshold):
        state.feedback(FIXED, 0.0, Signal.UNAVAILABLE, admitted_at=0.0)
    return state


def test_a_half_open_breaker_lets_only_the_probes_through() -> None:
    state = _tripped()
    later = FIXED.open_for + 0.01
    probe = state.acquire(FIXED, later)
    other = state.acquire(FIXED, later)
    assert probe.ready
    assert probe.probe
    assert not other.reserved
    assert state.breaker is BreakerState.HALF_OPEN


def test_a_successful_probe_closes_the_breaker() -> None:
    state = _tripped()
    later = FIXED.open_for + 0.01
    state.acquire(FIXED, later)
    state.feedback(FIXED, later + 0.1, Signal.OK, admitted_at=later)
    assert state.breaker is BreakerState.CLOSED
    assert state.acquire(FIXED, later + 0.1).reserved


def test_a_failed_probe_reopens_the_breaker() -> None:
    state = _tripped()
    later = FIXED.open_for + 0.01
    state.acquire(FIXED, later)
    state.feedback(FIXED, later + 0.1, Signal.UNAVAILABLE, admitted_at=later)
    assert state.breaker is BreakerState.OPEN


def test_the_breaker_stays_open_as_long_as_the_downstream_asks() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    for _ in range(FIXED.failure_threshold):
        state.feedback(FIXED, 0.0, Signal.UNAVAILABLE, admitted_at=0.0, retry_after=1.5)
    assert not state.acquire(FIXED, 1.4).ready


def test_a_long_retry_after_pauses_the_whole_key() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    state.feedback(FIXED, 0.1, Signal.OVERLOADED, admitted_at=0.0, retry_after=30.0)
    grant = state.acquire(FIXED, 1.0)
    assert not grant.reserved
    assert grant.wait == pytest.approx(29.1)


def test_a_short_retry_after_only_delays_the_refused_call() -> None:
    state = KeyState()
    state.acquire(FIXED, 0.0)
    state.feedback(FIXED, 0.1, Signal.OVERLOADED, admitted_at=0.0, retry_after=1.0)
    assert state.acquire(FIXED, 0.2).reserved


def test_invalid_limits_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="backoff"):
        Limits(backoff=1.5)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.floats(min_value=0.5, max_value=500.0),
    burst=st.integers(min_value=1, max_value=5),
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=120),
    window=st.floats(min_value=0.01, max_value=3.0),
)
def test_the_bucket_never_grants_more_than_its_rate_plus_burst_over_any_window(
    rate: float, burst: int, gaps: list[float], window: float
) -> None:
    limits = Limits(initial_rate=rate, min_rate=min(0.2, rate), slow_start=1.0, burst=burst)
    state = KeyState()
    # callers arrive after the given gaps; events are processed in time order, as they
    # would be by many tasks sharing one clock
    queue: list[tuple[float, int, Grant | None]] = []
    now = 0.0
    for i, gap in enumerate(gaps):
        now += gap
        heapq.heappush(queue, (now, i, None))
    times = []
    while queue:
        now, i, grant = heapq.heappop(queue)
        if grant is None or not grant.reserved:
            grant = state.acquire(limits, now)
        else:
            grant = state.confirm(limits, now, grant.ticket)
        if grant.ready:
            times.append(now)
        else:
            heapq.heappush(queue, (now + grant.wait, i, grant))
    times.sort()
    j = 0
    for i, t in enumerate(times):
        while times[j] < t - window:
            j += 1
        assert i - j + 1 <= rate * window + burst + 1e-6
