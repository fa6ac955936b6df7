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


def _busy(limits: Limits | None = None) -> tuple[KeyState, Limits]:
    """A key at 100/s with a long queue of callers (the rate is the limit, not demand)."""
    limits = limits or Limits(initial_rate=100.0, slow_start=1.0)
    state = KeyState()
    for _ in range(2000):
        state.acquire(limits, 0.0)
    return state, limits


Event = tuple[float, Signal, float]


def _drive(state: KeyState, limits: Limits, start: float, end: float, *,
           every: float = 0.001, events: list[Event] | None = None) -> None:
    """The queue's head asks every ``every`` s from ``start`` to ``end`` (goes when its turn
    has come); ``events`` (answered at, signal, admitted at) are reported in time order."""
    pending = sorted(events or [], key=lambda e: e[0])
    t = start
    while t < end - 1e-9:
        while pending and pending[0][0] <= t:
            when, signal, sent = pending.pop(0)
            state.feedback(limits, when, signal, admitted_at=sent)
        state.confirm(limits, t, state.last_out + 1)
        t = round(t + every, 9)
    for when, signal, sent in pending:
        state.feedback(limits, when, signal, admitted_at=sent)


def _two_429s(oks: int) -> tuple[KeyState, Limits]:
    """A 429 at admission 1.0, ``oks`` successes admitted over the next second, a 429 at 2.0;
    the callers go whenever their turn comes (they use the rate they are given)."""
    state, limits = _busy()
    events: list[Event] = [(1.1, Signal.OVERLOADED, 1.0)]
    for i in range(oks):
        sent = 1.0 + (i + 0.5) / oks
        events.append((sent + 0.1, Signal.OK, sent))
    events.append((2.1, Signal.OVERLOADED, 2.0))
    _drive(state, limits, 0.0, 2.1, events=events)
    return state, limits


def test_what_got_through_between_two_429s_is_the_ceiling_whatever_the_burst() -> None:
    state, limits = _two_429s(23)  # the provider's allowance was empty at both 429s
    assert state.ceiling == pytest.approx(23.0)
    assert state.rate(limits, 2.1) == pytest.approx(0.9 * 23.0)


def test_calls_still_in_flight_are_not_counted_as_missing() -> None:
    state, limits = _busy()
    events: list[Event] = [(1.0, Signal.OVERLOADED, 1.0)]  # a 429 answered at once
    for i in range(19):  # 20/s admitted, each answered 0.1 s later
        sent = 1.0 + i / 20
        events.append((sent + 0.1, Signal.OK, sent))
    # a 429 at 2.0, answered at once: the calls sent in its last 0.1 s are still out
    events.append((2.0, Signal.OVERLOADED, 2.0))
    _drive(state, limits, 0.0, 2.0, events=events)
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
    events: list[Event] = []
    for i in range(10):  # callers that wake up late make 10 calls in the next 1.2 s
        sent = 2.1 + (i + 0.5) * 0.12
        events.append((sent + 0.1, Signal.OK, sent))
    # a clump of them is refused: 8/s got through in between, a lower bound only
    events.append((3.4, Signal.OVERLOADED, 3.3))
    _drive(state, limits, 2.1, 3.4, every=0.12, events=events)
    assert state.ceiling == pytest.approx(23.0)  # kept
    assert state.rate(limits, 3.4) == pytest.approx(0.9 * 23.0)


def test_calls_the_downstream_refused_are_not_a_rate_left_unused() -> None:
    state, limits = _two_429s(23)  # measured: 23/s
    # the callers go at every turn they are given, but the downstream's capacity fell:
    # 12 of them get through in the next 0.9 s, then a 429
    events: list[Event] = [(2.1 + (i + 0.5) * 0.075 + 0.1, Signal.OK, 2.1 + (i + 0.5) * 0.075)
                           for i in range(12)]
    events.append((3.1, Signal.OVERLOADED, 3.0))
    _drive(state, limits, 2.1, 3.1, events=events)
    assert state.ceiling == pytest.approx(12 / 0.9, rel=0.1)  # measured again, lower
    assert state.rate(limits, 3.1) < 0.9 * 23.0 * 0.7


def _late_callers_then_429s(refused_at: list[float]) -> tuple[KeyState, Limits, float]:
    """A measured ceiling of 60/s, then callers that wake up late: they go only every 40 ms
    (25/s of the ~55/s they are given); a 429 answered 0.05 s after each ``refused_at``."""
    state, limits = _two_429s(60)
    before = state.rate(limits, 2.9)
    events: list[Event] = [(t + 0.05, Signal.OVERLOADED, t) for t in refused_at]
    _drive(state, limits, 2.1, 3.1, every=0.04, events=events)
    return state, limits, before


def test_a_lone_429_from_late_callers_does_not_cut_the_rate() -> None:
    state, limits, before = _late_callers_then_429s([3.0])
    assert state.counts.get("clumps") == 1
    assert state.counts["decreases"] == 2  # the two that measured the ceiling, no more
    assert state.ceiling == pytest.approx(60.0)
    assert state.rate(limits, 3.05) >= before  # not cut: still climbing back to 60


def test_429s_beyond_a_clumps_share_of_the_calls_cut_the_rate() -> None:
    # one refusal in ~23 calls is a clump (<= 5%); a second is a rate signal
    state, limits, before = _late_callers_then_429s([2.96, 3.0])
    assert state.counts.get("clumps") == 1
    assert state.counts["decreases"] == 3
    assert state.rate(limits, 3.05) < before


def test_a_429_above_the_measured_ceiling_is_a_rate_signal_even_from_late_callers() -> None:
    state, limits = _two_429s(60)
    _drive(state, limits, 2.1, 3.5, every=0.04)
    assert state.rate(limits, 3.5) > 60.0  # probing above the ceiling
    state.feedback(limits, 3.55, Signal.OVERLOADED, admitted_at=3.5)
    assert "clumps" not in state.counts
    assert state.counts["decreases"] == 3


def test_a_429_at_the_quota_the_user_gave_is_a_clump_unless_refusals_go_on() -> None:
    limits = Limits(initial_rate=100.0, max_rate=100.0)  # told the provider's quota
    state, _ = _busy(limits)
    _drive(state, limits, 0.0, 1.0, events=[(1.0, Signal.OVERLOADED, 0.95)])
    assert state.counts.get("clumps") == 1  # the callers used the quota; a few went together
    assert state.rate(limits, 1.0) == pytest.approx(100.0)
    refusals: list[Event] = [(1.0 + i / 100, Signal.OVERLOADED, 0.96 + i / 100)
                             for i in range(1, 8)]
    _drive(state, limits, 1.0, 1.1, events=refusals)  # then 8% of the calls are refused
    assert state.counts.get("decreases") == 1
    assert state.rate(limits, 1.1) < 60.0  # halved (and climbing back)


def test_a_429_on_a_key_nobody_queues_for_is_a_rate_signal() -> None:
    limits = Limits(initial_rate=100.0, max_rate=100.0)
    state = KeyState()  # one caller at a time, 10/s, at the quota the user gave
    for i in range(30):
        assert go(state, limits, i / 10) == i / 10
    state.feedback(limits, 2.95, Signal.OVERLOADED, admitted_at=2.9)
    assert state.counts["decreases"] == 1  # the rate left unused was demand, not lateness


def test_refusals_are_counted_afresh_after_a_decrease() -> None:
    limits = Limits(initial_rate=100.0, max_rate=100.0)
    state, _ = _busy(limits)
    refusals: list[Event] = [(1.0 + i / 100, Signal.OVERLOADED, 0.95 + i / 100)
                             for i in range(7)]
    _drive(state, limits, 0.0, 1.1, events=refusals)  # 5 clumps, then a decrease
    assert state.counts["decreases"] == 1
    # then callers that wake up late (25/s of the ~60/s given) and one refusal: a clump,
    # since the refusals before the decrease are not held against it
    _drive(state, limits, 1.1, 2.1, every=0.04, events=[(2.1, Signal.OVERLOADED, 2.05)])
    assert state.counts["clumps"] == 6
    assert state.counts["decreases"] == 1


def _late_head(late: float) -> tuple[KeyState, Limits, list[Grant]]:
    """Slots every 10 ms; the callers have been reporting ``late`` when they confirm; the
    caller of the slot at 20 ms has not woken up when the one after it goes at 30 ms."""
    limits = Limits(initial_rate=100.0, slow_start=1.0)
    state = KeyState()
    grants = [state.acquire(limits, 0.0) for _ in range(5)]
    assert state.confirm(limits, 0.01 + late, grants[1].ticket, late=late).ready
    assert state.confirm(limits, 0.03, grants[3].ticket).ready
    return state, limits, grants


def test_slots_a_late_caller_left_are_owed_where_callers_wake_late() -> None:
    state, limits, grants = _late_head(0.01)
    # it wakes up 11 ms late: the slot it missed is still its own, it goes at once
    assert state.confirm(limits, 0.031, grants[2].ticket, late=0.011).ready
    assert state.confirm(limits, 0.04, grants[4].ticket).ready  # the schedule is kept


def test_slots_are_not_owed_where_callers_do_not_wake_late() -> None:
    state, limits, grants = _late_head(0.0)  # in virtual time, say: nobody is ever late
    assert not state.confirm(limits, 0.031, grants[2].ticket, late=0.011).ready
