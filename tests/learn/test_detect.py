"""The shared change detectors: pure, deterministic, resumable, with the run lengths they claim."""

from __future__ import annotations

import json
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop import ConfigError
from closedloop.learn import (
    BernoulliCusum,
    CusumState,
    GaussianCusum,
    PageHinkley,
    PageHinkleyState,
)


def run_length(detector: BernoulliCusum, p: float, rng: random.Random, cap: int) -> int:
    state = detector.initial()
    for n in range(1, cap + 1):
        found = detector.update(state, rng.random() < p)
        if found.alarm:
            return n
        state = found.state
    return cap


def test_the_exact_run_length_matches_a_simulation() -> None:
    # a chart with short run lengths, so that 3,000 seeded runs pin the mean to a few %
    detector = BernoulliCusum.for_arl(0.1, 0.3, arl0=200)
    rng = random.Random(7)
    for p in (0.1, 0.3):
        simulated = statistics.fmean(run_length(detector, p, rng, 100_000) for _ in range(3000))
        assert simulated == pytest.approx(detector.arl(p), rel=0.06)


@pytest.mark.parametrize(("p0", "p1", "arl0"), [(0.02, 0.10, 1e6), (0.02, 0.15, 1e5),
                                                 (0.3, 0.5, 500), (0.001, 0.01, 1e4)])
def test_for_arl_picks_the_smallest_limit_reaching_the_target(p0: float, p1: float,
                                                              arl0: float) -> None:
    detector = BernoulliCusum.for_arl(p0, p1, arl0=arl0)
    assert detector.arl(p0) >= arl0
    smaller = BernoulliCusum(p0=p0, p1=p1, up=detector.up, down=detector.down,
                             limit=detector.limit - 1)
    assert smaller.arl(p0) < arl0
    assert detector.arl(p1) < detector.arl(p0) / 10  # and it detects the change quickly


def test_the_demotion_chart_detects_a_98_to_85_drop_within_a_hundred_steps_on_average() -> None:
    detector = BernoulliCusum.for_arl(0.02, 0.10, arl0=1_000_000)
    assert detector.arl(0.02) >= 1_000_000
    assert detector.arl(0.15) < 100


@given(st.lists(st.booleans(), max_size=400), st.integers(0, 400))
@settings(max_examples=200, deadline=None)
def test_a_saved_state_resumes_exactly_where_it_stopped(events: list[bool], cut: int) -> None:
    detector = BernoulliCusum.for_arl(0.05, 0.2, arl0=1000)
    whole = detector.initial()
    alarms_whole = []
    for e in events:
        found = detector.update(whole, e)
        alarms_whole.append(found.alarm)
        whole = found.state
    state = detector.initial()
    alarms = []
    for i, e in enumerate(events):
        if i == cut:  # saved as JSON, read back in "another process"
            state = CusumState.from_dict(json.loads(json.dumps(state.to_dict())))
            detector = BernoulliCusum.from_dict(json.loads(json.dumps(detector.to_dict())))
        found = detector.update(state, e)
        alarms.append(found.alarm)
        state = found.state
        assert 0 <= state.statistic < detector.limit
        assert found.alarm == (found.statistic >= 1.0)
    assert alarms == alarms_whole and state == whole
    assert state.alarms == sum(alarms) and state.steps == len(events)


def test_no_alarm_without_events_and_an_alarm_after_enough_of_them() -> None:
    detector = BernoulliCusum.for_arl(0.02, 0.10, arl0=10_000)
    state = detector.initial()
    for _ in range(10_000):
        found = detector.update(state, False)
        assert not found.alarm
        state = found.state
    assert state.statistic == 0.0
    needed = -(-detector.limit // detector.up)  # events in a row that reach the limit
    for i in range(needed):
        found = detector.update(state, True)
        assert found.alarm == (i == needed - 1)
        state = found.state
    assert state.statistic == 0.0 and state.alarms == 1  # it starts again after an alarm


@pytest.mark.parametrize("bad", [
    {"p0": 0.2, "p1": 0.1}, {"p0": 0.0, "p1": 0.1}, {"p0": 0.1, "p1": 1.0},
    {"p0": 0.1, "p1": 0.2, "arl0": 1.0}, {"p0": 0.1, "p1": 0.2, "arl0": float("inf")},
])
def test_bad_parameters_are_config_errors(bad: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        BernoulliCusum.for_arl(**bad)


@pytest.mark.parametrize("bad", [None, [], {}, {"statistic": -1, "steps": 0, "alarms": 0},
                                 {"statistic": 0, "steps": 0}, {"statistic": "x", "steps": 0,
                                                                "alarms": 0}])
def test_a_malformed_saved_state_is_a_config_error(bad: object) -> None:
    with pytest.raises(ConfigError):
        CusumState.from_dict(bad)


def test_gaussian_cusum_false_alarms_and_delay_as_claimed() -> None:
    detector = GaussianCusum.for_arl(100.0, 10.0, shift=1.0, arl0=500)
    assert detector.arl(0.0) == pytest.approx(500, rel=1e-6)
    rng = random.Random(3)

    def mean_run(mu: float, runs: int) -> float:
        lengths = []
        for _ in range(runs):
            state, n = detector.initial(), 0
            while True:
                n += 1
                found = detector.update(state, rng.gauss(mu, 10.0))
                state = found.state
                if found.alarm:
                    break
            lengths.append(n)
        return statistics.fmean(lengths)

    assert mean_run(100.0, 1500) == pytest.approx(500, rel=0.12)  # Siegmund: within ~10 %
    assert mean_run(110.0, 1500) == pytest.approx(detector.arl(1.0), rel=0.12)


def test_gaussian_cusum_down_watches_a_fall_and_ignores_nan() -> None:
    detector = GaussianCusum.for_arl(0.9, 0.05, shift=2.0, arl0=1000, direction="down")
    state = detector.initial()
    for _ in range(200):
        found = detector.update(state, 0.95)  # better than the baseline: never an alarm
        assert not found.alarm
        state = found.state
    assert detector.update(state, float("nan")).state == state
    alarms = 0
    for _ in range(50):
        found = detector.update(state, 0.7)
        alarms += found.alarm
        state = found.state
    assert alarms >= 1


def test_page_hinkley_alarms_on_a_rise_of_the_running_mean() -> None:
    detector = PageHinkley(delta=2.5, threshold=150.0)
    rng = random.Random(11)
    state = detector.initial()
    before = after = None
    for n in range(4000):
        value = rng.gauss(100.0 if n < 2000 else 110.0, 5.0)
        found = detector.update(state, value)
        state = found.state
        if found.alarm:
            if n < 2000:
                before = n
            elif after is None:
                after = n
    assert before is None and after is not None and after - 2000 < 60
    saved = PageHinkleyState.from_dict(json.loads(json.dumps(state.to_dict())))
    assert saved == state
    assert PageHinkley.from_dict(detector.to_dict()) == detector
