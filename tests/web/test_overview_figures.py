"""The overview's figures come from the learning layer's aggregates (one series per page): the
same counts as the store's exact summary of the window, on every backend, before and after
the SQLite roll-up covers the steps."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

import closedloop as cl
from closedloop.web._dashboard import WINDOWS, overview_data

NOW = 1_795_000_000.0


class _Ledger:
    def stops(self) -> list[Any]:
        return []

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        return []


def _events(rng: random.Random, n: int, start: int) -> list[cl.StepEvent]:
    out = []
    for i in range(start, start + n):
        outcome = rng.choice(("succeeded", "succeeded", "failed", "error", "blocked"))
        validated = rng.choice((True, False, None))
        out.append(cl.StepEvent(
            ts=NOW - rng.uniform(0, 40 * 86400), trace_id=f"{i + 1:032x}", agent_id="a",
            task_type=rng.choice(("deploy", "billing", "db.migrate")), autonomy="autonomous",
            outcome=outcome, attempts=rng.choice((1, 1, 2)), input_tokens=rng.randrange(900),
            output_tokens=rng.randrange(90), latency_ms=rng.lognormvariate(3.0, 1.0),
            validation_passed=validated,
            verification_passed=None if outcome == "error" else outcome == "succeeded",
            error_type=None, error_message=None, propose_ms=1.0, validate_ms=1.0, act_ms=1.0,
            verify_ms=1.0, detail=None,
            cost_usd=rng.choice((None, round(rng.uniform(0, 0.01), 6)))))
    return out


def _check(store: cl.Store, window: str) -> None:
    span = WINDOWS[window]
    found = overview_data(store, _Ledger(), span, now=NOW)
    exact = store.summary(since=None if span is None else NOW - span, top_messages=0)
    rows = {r["f"].task_type: r["f"] for r in found["rows"]}
    assert sorted(rows) == [f.task_type for f in exact.rows]
    for want in (*exact.rows, exact.overall):
        got = found["overall"] if want.task_type is None else rows[want.task_type]
        assert (got.runs, got.validated, got.validation_passed, got.verified,
                got.verification_passed) == (want.runs, want.validated,
                                             want.validation_passed, want.verified,
                                             want.verification_passed), (window, want)
        assert (got.cost_usd is None) == (want.cost_usd is None)
        if want.cost_usd is not None:
            assert math.isclose(got.cost_usd, want.cost_usd, rel_tol=1e-9, abs_tol=1e-12)
        # estimated within the bucket (nine per decade) that holds the exact p95
        assert want.latency_p95_ms is not None and got.latency_p95_ms is not None
        assert want.latency_p95_ms / 2 <= got.latency_p95_ms <= want.latency_p95_ms * 2


@pytest.mark.parametrize("seed", [1, 2])
def test_the_overview_counts_what_the_summary_counts_in_each_window(any_url: str,
                                                                     seed: int) -> None:
    rng = random.Random(seed)
    with cl.open_store(any_url) as store:
        for e in _events(rng, 300, 0):
            store.record(e)
        assert store.flush()
        for window in WINDOWS:  # the first one starts the SQLite roll-up
            _check(store, window)
        for e in _events(rng, 40, 300):  # after the roll-up: read from the events
            store.record(e)
        assert store.flush()
        for window in WINDOWS:
            _check(store, window)


def test_an_empty_window_has_no_rows(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        for e in _events(random.Random(3), 20, 0):
            store.record(e._replace(ts=NOW - 90 * 86400))
        assert store.flush()
        found = overview_data(store, _Ledger(), WINDOWS["30d"], now=NOW)
        everything = overview_data(store, _Ledger(), None, now=NOW)
    assert found["rows"] == [] and found["overall"].runs == 0
    assert everything["overall"].runs == 20
