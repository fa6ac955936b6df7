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


def test_the_first_429_halves_the_rate_it_was_sent_at_and_holds_it_for_one_latency() -> None:
    limits = Limits(initial_rate=100.0, slow_start=1.0)
    state = KeyState()
    state.acquire(limits, 0.0)
    state.feedback(limits, 0.2, Signal.OK, admitted_at=0.0)  # one latency: 0.2 s
    state.feedback(limits, 1.0, Signal.OVERLOADED, admitted_at=0.8)  # a burst hid the limit
    assert state.ceiling == pytest.approx(100.0)  # only an upper bound: what was sent
    assert state.rate(limits, 1.0) == pytest.approx(50.0)
    assert state.rate(limits, 1.2) == pytest.approx(50.0)  # held while its calls answer
    assert state.rate(limits, 1.3) > 50.0  # then climbs back towards the bound


def _busy() -> tuple[KeyState, Limits]:
    """A key at 100/s with a long queue of callers (the rate is the limit, not demand)."""
    limits = Limits(initial_rate=100.0, slow_start=1.0)
    state = KeyState()
    for _ in range(500):
        state.acquire(limits, 0.0)
    return state, limits


def _two_429s(oks: int) -> tuple[KeyState, Limits]:
    """A 429 at admission 1.0, ``oks`` successes admitted over the next second, a 429 at 2.0."""
    state, limits = _busy()
    state.feedback(limits, 1.1, Signal.OVERLOADED, admitted_at=1.0)
    for i in range(oks):
        sent = 1.0 + (i + 0.5) / oks
        state.feedback(limits, sent + 0.1, Signal.OK, admitted_at=sent)
    state.feedback(limits, 2.1, Signal.OVERLOADED, admitted_at=2.0)
    return state, limits


def test_what_got_through_between_two_429s_is_the_ceiling_whatever_the_burst() -> None:
    state, limits = _two_429s(23)  # the provider's allowance was empty at both 429s
    assert state.ceiling == pytest.approx(23.0)
    assert state.rate(limits, 2.1) == pytest.approx(0.9 * 23.0)


def test_calls_still_in_flight_are_not_counted_as_missing() -> None:
    state, limits = _busy()
    state.feedback(limits, 1.0, Signal.OVERLOADED, admitted_at=1.0)  # a 429 answered at once
    for i in range(19):  # 20/s admitted, each answered 0.1 s later
        sent = 1.0 + i / 20
        state.feedback(limits, sent + 0.1, Signal.OK, admitted_at=sent)
    # a 429 at 2.0, answered at once: the calls sent in its last 0.1 s are still out
    state.feedback(limits, 2.0, Signal.OVERLOADED, admitted_at=2.0)
    assert state.ceiling == pytest.approx(20.0, rel=0.06)


def test_too_few_successes_between_two_429s_measure_nothing() -> None:
    state, limits = _two_429s(3)
    assert state.ceiling > 2 * 23.0  # not a measurement: the rate it was sent at, a bound
    assert state.rate(limits, 2.1) == pytest.approx(0.5 * state.ceiling)  # halved again


def test_an_interval_in_which_nobody_queued_measures_nothing() -> None:
    limits = Limits(initial_rate=100.0, slow_start=1.0)
    state = KeyState()  # callers come one at a time and go at once: demand was the limit
    go(state, limits, 0.0)
    state.feedback(limits, 1.1, Signal.OVERLOADED, admitted_at=1.0)
    for i in range(23):
        sent = go(state, limits, 1.0 + (i + 0.5) / 23)
        state.feedback(limits, sent + 0.1, Signal.OK, admitted_at=sent)
    state.feedback(limits, 2.1, Signal.OVERLOADED, admitted_at=2.0)
    assert state.ceiling > 2 * 23.0


def test_a_429_soon_after_a_measured_ceiling_steps_down_gently() -> None:
    state, limits = _two_429s(23)
    sent = state.rate(limits, 2.2)
    assert sent < 23.0
    state.feedback(limits, 2.25, Signal.OVERLOADED, admitted_at=2.2)
    assert state.ceiling == pytest.approx(sent)  # still too fast: that rate is the bound
    assert state.rate(limits, 2.25) == pytest.approx(0.9 * sent)  # 0.9x, not halved


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


def test_a_retry_goes_at_the_next_slot_ahead_of_the_queue() -> None:
    state = KeyState()
    first = state.acquire(FIXED, 0.0)
    assert first.ready
    queued = [state.acquire(FIXED, 0.0) for _ in range(5)]
    retry = state.confirm(FIXED, 0.1, first.ticket)  # refused; it asks again with its ticket
    head = state.confirm(FIXED, 0.1, queued[0].ticket)
    assert retry.ready
    assert not head.ready
    assert head.wait == pytest.approx(0.1)


waits: list[float] = []
"""Filled by :func:`_learn`: how long each successful call waited, after the first third."""


def _learn(rate: float, burst: int, *, callers: int = 64, latency: float = 0.1,
           seconds: float = 15.0) -> tuple[KeyState, int, int]:
    """Callers back to back against a token-bucket downstream that refuses on arrival."""
    limits = Limits()
    state = KeyState()
    tokens, last = float(burst), 0.0
    ok = refused = 0
    asked: dict[int, float] = {}
    done: set[int] = set()
    waits.clear()
    queue: list[tuple[float, int, Grant | None]] = [(i * 1e-3, i, None) for i in range(callers)]
    answers: list[tuple[float, int, float, Grant]] = []
    while queue and queue[0][0] < seconds:
        if answers and answers[0][0] <= queue[0][0]:
            now, i, sent, went = heapq.heappop(answers)
            good = i in done
            done.discard(i)
            state.feedback(limits, now, Signal.OK if good else Signal.OVERLOADED,
                           admitted_at=sent)
            # a refused call asks again with its ticket, as Backpressure's retry does
            heapq.heappush(queue, (now, i, None if good else went))
            continue
        now, i, grant = heapq.heappop(queue)
        asked.setdefault(i, now)
        grant = (state.confirm(limits, now, grant.ticket) if grant is not None
                 else state.acquire(limits, now))
        if not grant.ready:
            heapq.heappush(queue, (now + grant.wait, i, grant))
            continue
        tokens = min(float(burst), tokens + (now - last) * rate)
        last = now
        good = tokens >= 1.0
        tokens -= 1.0 if good else 0.0
        ok, refused = ok + good, refused + (not good)
        if good and asked[i] >= seconds / 3:
            waits.append(now - asked[i])
        if good:
            del asked[i]
        if good:
            done.add(i)
        heapq.heappush(answers, (now + latency, i, now, grant))
    return state, ok, refused


@pytest.mark.parametrize(("rate", "burst"), [(20.0, 10), (50.0, 5), (200.0, 5)])
def test_the_ceiling_learned_is_the_downstreams_rate_whatever_its_burst(
    rate: float, burst: int
) -> None:
    state, ok, refused = _learn(rate, burst)
    assert state.ceiling == pytest.approx(rate, rel=0.03)
    assert refused / ok <= 0.05


@pytest.mark.parametrize(("rate", "burst"), [(20.0, 10), (200.0, 10)])
def test_callers_wait_alike_once_the_rate_is_learned(rate: float, burst: int) -> None:
    _learn(rate, burst)
    waits.sort()
    assert waits[int(0.99 * len(waits))] <= 1.3 * waits[len(waits) // 2]


def test_a_caller_that_overslept_does_not_cost_the_next_its_slot() -> None:
    state = KeyState()
    grants = [state.acquire(FIXED, 0.0) for _ in range(3)]  # slots at 0, 0.1, 0.2
    assert state.confirm(FIXED, 0.13, grants[1].ticket, late=0.03).ready  # 30 ms late
    assert state.confirm(FIXED, 0.2, grants[2].ticket).ready  # the schedule was kept


def test_lateness_the_caller_does_not_report_is_not_caught_up() -> None:
    state = KeyState()
    grants = [state.acquire(FIXED, 0.0) for _ in range(3)]
    assert state.confirm(FIXED, 0.13, grants[1].ticket).ready  # late, but says nothing:
    assert not state.confirm(FIXED, 0.2, grants[2].ticket).ready  # maybe the key was idle


def test_lateness_beyond_the_catch_up_window_is_not_caught_up() -> None:
    state = KeyState()
    grants = [state.acquire(FIXED, 0.0) for _ in range(3)]
    assert state.confirm(FIXED, 0.4, grants[1].ticket, late=0.3).ready
    assert not state.confirm(FIXED, 0.42, grants[2].ticket).ready


def test_callers_behind_a_head_that_has_not_woken_up_are_not_held_back() -> None:
    limits = Limits(initial_rate=100.0, slow_start=1.0)  # a slot every 10 ms
    state = KeyState()
    grants = [state.acquire(limits, 0.0) for _ in range(3)]
    assert grants[0].ready
    # the head's slot came at 10 ms, but its caller is still asleep at 30 ms
    assert state.confirm(limits, 0.03, grants[2].ticket).ready


def test_callers_that_left_their_rate_unused_do_not_lower_a_measured_ceiling() -> None:
    state, limits = _two_429s(23)  # measured: 23/s; the rate restarts just under it
    for i in range(10):  # callers that wake up late make 10 calls in the next 1.2 s
        sent = 2.1 + (i + 0.5) * 0.12
        state.feedback(limits, sent + 0.1, Signal.OK, admitted_at=sent)
    # a clump of them is refused: 8/s got through in between, a lower bound only
    state.feedback(limits, 3.4, Signal.OVERLOADED, admitted_at=3.3)
    assert state.ceiling == pytest.approx(23.0)  # kept
    assert state.rate(limits, 3.4) == pytest.approx(0.9 * 23.0)
