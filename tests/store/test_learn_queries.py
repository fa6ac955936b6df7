"""The learning layer's aggregations on every backend: SQLite and PostgreSQL compute in SQL
what the memory backend (and the Python pass) computes, cell for cell.

Parametrized over memory, SQLite and PostgreSQL (``any_url``), see ``conftest.py``.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.store import (
    Dimension,
    SeriesCell,
    Store,
    latency_bounds,
    latency_bucket,
    parse_dimension,
    period_of,
    size_bucket,
    size_code,
)

T0 = 1_790_000_000.0
OUTCOMES = ("succeeded", "succeeded", "succeeded", "failed", "error", "blocked", "paused",
            "halted", "suggested")
MESSAGES = ("i-{n:x} is a t3.large, requested m5.xlarge", "tag 'env' missing on i-{n:x}",
            "RuntimeError: timed out after {n} s", "[bold]markup[/] «東京» {n}")


def step(i: int, rng: random.Random) -> cl.StepEvent:
    """A varied step of schema v3: models, versions, labels, costs, every outcome."""
    outcome = rng.choice(OUTCOMES)
    error = {"failed": rng.choice(["validation", "verification"]), "error": "agent",
             "blocked": "blocked", "paused": "paused", "halted": "halted"}.get(outcome)
    message = None
    if error is not None and rng.random() < 0.8:
        message = rng.choice(MESSAGES).format(n=rng.getrandbits(30))
    labels = rng.choice([None, {"tier": "gold"}, {"tier": "free", "region": "eu"},
                         {"region": "東京"}])
    return cl.StepEvent(
        ts=T0 + i * 97.3, trace_id=f"{i:032x}", agent_id="a",
        task_type=rng.choice(["deploy", "plan", "review/東京"]), autonomy="autonomous",
        outcome=outcome, attempts=rng.choice([1, 1, 2, 3]),
        input_tokens=rng.choice([0, 1, 9, 10, 19, 20, 49, 50, 99, rng.randrange(100_000)]),
        output_tokens=rng.randrange(2_000),
        latency_ms=rng.choice([0.0, 0.0004, 0.001, 1e15, rng.lognormvariate(3, 2)]),
        validation_passed=rng.choice([None, True, False]),
        verification_passed=rng.choice([None, True, False]), error_type=error,
        error_message=message, propose_ms=1.0, validate_ms=1.0, act_ms=1.0, verify_ms=1.0,
        detail=None, model=rng.choice([None, "gpt-x", "claude-y"]),
        agent_version=rng.choice([None, "1.0", "1.1"]), prompt_version=rng.choice(["p1", "p2"]),
        labels=labels, cost_usd=rng.choice([None, 0.0, rng.random() / 100]))


def record(url: str, events: Sequence[cl.StepEvent]) -> Store:
    store = cl.open_store(url, batch_size=89)
    for e in events:
        store.record(e)
    assert store.flush()
    return store


EVENTS = [step(i, random.Random(i)) for i in range(700)]


@pytest.fixture
def varied(any_url: str) -> Iterator[Store]:
    store = record(any_url, EVENTS)
    yield store
    store.close()


def _same_cells(got: Sequence[SeriesCell], want: Sequence[SeriesCell]) -> None:
    assert [(c.value, c.period) for c in got] == [(c.value, c.period) for c in want]
    floats = ("tokens_sq", "cost_usd", "cost_sq", "succeeded_cost", "latency_sum")
    for g, w in zip(got, want, strict=True):
        for name in floats:
            assert getattr(g, name) == pytest.approx(getattr(w, name), rel=1e-9, abs=1e-12)
        blank: dict[str, Any] = dict.fromkeys(floats, 0.0)
        assert dataclasses.replace(g, **blank) == dataclasses.replace(w, **blank)


@pytest.mark.parametrize("by", ["task_type", "model", "agent_version", "prompt_version",
                                "label:tier", "label:region"])
@pytest.mark.parametrize("window", ["hour", "day", "week"])
def test_series_in_the_database_equal_the_python_pass(varied: Store, by: str,
                                                      window: str) -> None:
    got = varied.series(by=by, window=window)
    want = cl.store.series_events(EVENTS, parse_dimension(by), window)
    _same_cells(got, want)
    assert sum(c.steps for c in got) == len(EVENTS)


def test_a_series_window_and_task_type_filter_the_steps(varied: Store) -> None:
    since, until = T0 + 5_000.0, T0 + 50_000.0
    got = varied.series(by="model", window="hour", since=since, until=until,
                        task_type="review/東京")
    chosen = [e for e in EVENTS if since <= e.ts < until and e.task_type == "review/東京"]
    _same_cells(got, cl.store.series_events(chosen, Dimension("model"), "hour"))


def test_series_count_what_a_user_reads_in_them(memory_store: Store) -> None:
    def ev(i: int, **kw: Any) -> cl.StepEvent:
        base: dict[str, Any] = {
            "ts": T0 + i, "validation_passed": True, "attempts": 1,
            "verification_passed": True, "outcome": "succeeded", "input_tokens": 100,
            "output_tokens": 20, "cost_usd": 0.5, "latency_ms": 12.0, "model": "m"}
        return EVENTS[0]._replace(**{**base, **kw})

    for e in (ev(0), ev(1, attempts=2, outcome="failed", verification_passed=False),
              ev(2, validation_passed=False, verification_passed=None, outcome="failed",
                 cost_usd=None)):
        memory_store.record(e)
    assert memory_store.flush()
    (cell,) = memory_store.series(by="model", window="day")
    assert (cell.value, cell.steps, cell.validated, cell.validation_passed, cell.reasked,
            cell.verified, cell.verification_passed, cell.succeeded, cell.failed) == \
        ("m", 3, 3, 2, 1, 2, 1, 1, 2)
    assert (cell.tokens, cell.succeeded_tokens, cell.priced, cell.cost_usd) == (360, 120, 2, 1.0)
    assert cell.latency == {latency_bucket(12.0): 3}
    assert cell.period == period_of(T0, 86400.0, 0.0)


def test_factor_counts_in_the_database_equal_the_python_pass(varied: Store) -> None:
    got = varied.factor_counts(task_type="deploy")
    want = cl.store.factor_events(e for e in EVENTS if e.task_type == "deploy")
    assert got == want
    kept = [e for e in EVENTS if e.task_type == "deploy"
            and e.outcome not in ("paused", "halted", "control_unavailable")]
    assert sum(c.steps for c in got) == len(kept)
    assert sum(c.failures for c in got) == sum(
        e.outcome in ("failed", "error", "blocked") for e in kept)


@pytest.mark.parametrize("window", ["hour", "week"])
def test_failure_counts_in_the_database_equal_the_python_pass(varied: Store,
                                                              window: str) -> None:
    got = varied.failure_counts(window=window)
    assert got == cl.store.failure_events(EVENTS, window)
    assert sum(c.count for c in got) == sum(
        e.outcome in ("failed", "error", "blocked") for e in EVENTS)
    assert {c.group for c in got} >= {"", "tag 'env' missing on <*>"}


def test_failure_examples_are_the_newest_trace_ids_of_each_group(varied: Store) -> None:
    keys = sorted({(c.task_type, c.error_type, c.group)
                   for c in varied.failure_counts(window="day")})
    got = varied.failure_examples(keys, per_key=2)
    assert got == cl.store.failure_example_events(EVENTS, keys, 2)
    assert all(1 <= len(v) <= 2 for v in got.values())


@pytest.mark.parametrize("window", ["hour", "day"])
def test_period_steps_count_every_step(varied: Store, window: str) -> None:
    assert varied.period_steps(window=window) == cl.store.period_steps_events(EVENTS, window)
    got = varied.period_steps(window=window, task_type="plan", since=T0 + 7_200.0)
    want = cl.store.period_steps_events(
        [e for e in EVENTS if e.task_type == "plan" and e.ts >= T0 + 7_200.0], window)
    assert got == want


def test_buckets_and_sizes() -> None:
    assert [latency_bucket(v) for v in (0.0, 0.0009, 0.001, 0.0099, 12.5, 1e15)] == \
        [0, 0, 11, 19, 51, 190]
    low, high = latency_bounds(latency_bucket(12.5))
    assert low <= 12.5 < high
    assert (low, high) == (10.0, 20.0)
    assert [size_bucket(size_code(n)) for n in (0, 1, 2, 4, 5, 9, 10, 19, 20, 4999, 5000)] == \
        [0, 1, 2, 2, 5, 5, 10, 10, 20, 2000, 5000]


@pytest.mark.parametrize("text", ["labels", "label:", "label:bad key", "model;drop"])
def test_an_unknown_dimension_is_a_config_error(text: str) -> None:
    with pytest.raises(cl.ConfigError, match="cannot split by"):
        parse_dimension(text)


def test_an_unknown_window_is_a_config_error(memory_store: Store) -> None:
    with pytest.raises(cl.ConfigError, match="window must be one of"):
        memory_store.series(window="month")


def test_a_store_of_an_older_schema_is_read_in_python(tmp_path: Path) -> None:
    # read-only, a schema-2 store is not migrated: no v3 columns, no message groups
    path = tmp_path / "v2.db"
    shutil.copyfile(Path(__file__).resolve().parents[1] / "data" / "store_v2.db", path)
    with cl.open_store(f"sqlite:///{path}", read_only=True) as store:
        events = list(store.events())
        assert events
        _same_cells(store.series(by="task_type", window="day"),
                    cl.store.series_events(events, Dimension("task_type"), "day"))
        failed = store.failure_counts(window="day")
        assert failed and failed == cl.store.failure_events(events, "day")
        assert store.factor_counts() == cl.store.factor_events(events)


def test_sqlite_adds_up_its_chunks_exactly(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from closedloop.store.sqlite import _learn

    monkeypatch.setattr(_learn, "_CHUNK", 37)  # many chunks, of uneven size, in both halves
    with record(f"sqlite:///{tmp_path / 'chunks.db'}", EVENTS) as store:
        _same_cells(store.series(by="model", window="hour"),
                    cl.store.series_events(EVENTS, Dimension("model"), "hour"))
        assert store.factor_counts() == cl.store.factor_events(EVENTS)
        assert store.failure_counts(window="day") == cl.store.failure_events(EVENTS, "day")
