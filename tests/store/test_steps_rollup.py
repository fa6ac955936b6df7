"""The step listing filtered by model or label (SQLite and PostgreSQL) walks only the hours the
roll-up says hold such steps: every page equals the unfiltered walk filtered in Python, whatever
was rolled up when (late rows, rows below the floor, pruned ones, hours cut by the window, a
read-only handle, on PostgreSQL rows of a transaction still open at the fold and times that
are not finite), and a value no step has is answered without reading the events."""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

import closedloop as cl
from closedloop.store import StepFilter, Store
from closedloop.store.sqlite import _rollup

from .test_learn_rollup import T0, _at, _fresh, _record, _refresh, histories

FILTERS: tuple[dict[str, Any], ...] = (
    {"model": "gpt-x"}, {"model": "claude-y"}, {"model": "nothing"},
    {"label": ("tier", "gold")}, {"label": ("region", "東京")}, {"label": ("tier", "none")},
    {"model": "gpt-x", "label": ("tier", "free")})


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_rollup, "REFRESH_ROWS", 1)
    monkeypatch.setattr(_rollup, "CHUNK", 7)
    try:
        from closedloop.store.postgres import _rollup as pg_rollup
    except ImportError:  # pragma: no cover - without the postgres extra
        return
    monkeypatch.setattr(pg_rollup, "REFRESH_ROWS", 1)


def _walk(store: Store, limit: int, **query: Any) -> list[cl.StepEvent]:
    """Every page of ``store.steps(**query)``, in the order listed."""
    out: list[cl.StepEvent] = []
    cursor = None
    while True:
        page = store.steps(limit=limit, cursor=cursor, **query)
        out += page.steps
        if page.next_cursor is None:
            return out
        cursor = page.next_cursor


def _check(store: Store, rng: random.Random) -> None:
    for _ in range(4):
        query = dict(rng.choice(FILTERS))
        query["since"] = rng.choice([None, T0 + rng.choice([0.0, 3600.0, 5000.5, 1e-9])])
        query["until"] = rng.choice([None, T0 + rng.choice([7200.0, 86400.0, 40.5 * 3600])])
        query["task_type"] = rng.choice([None, "plan"])
        plain = {k: v for k, v in query.items() if k not in ("model", "label")}
        where = StepFilter(**query)
        want = [e for e in _walk(store, 1000, **plain) if where.matches(e)]
        assert _walk(store, rng.choice([1, 3, 50]), **query) == want, query


def _history(kind: str, history: dict[str, Any]) -> None:
    rng = random.Random(history["seed"])
    with _fresh(kind) as url:
        events: list[cl.StepEvent] = []
        with cl.open_store(url, batch_size=5) as store:
            for batch, refresh in zip(history["batches"], history["refresh"], strict=False):
                new = [_at(ts, rng, len(events) + i) for i, ts in enumerate(batch)]
                _record(store, new)
                events += new
                if refresh:
                    _refresh(store)
                    store.steps(model="gpt-x", limit=1)  # starts the model's roll-up
            if history["prune"] is not None:
                cl.store.prune(store, history["prune"])
            _record(store, [_at(ts, rng, len(events) + i)
                            for i, ts in enumerate(history["after"])])
            with cl.open_store(url, read_only=True, create=False) as reader:
                _check(reader, rng)  # what is rolled up, the rest read from events
            _check(store, rng)  # folded in first


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_a_model_or_label_listing_equals_the_walk_over_every_step(
        history: dict[str, Any]) -> None:
    _history("sqlite", history)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_postgres_model_or_label_listing_equals_the_walk_over_every_step(
        history: dict[str, Any]) -> None:
    _history("postgresql", history)


def test_a_model_no_step_has_reads_no_event(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    rng = random.Random(4)
    with cl.open_store(url) as store:
        _record(store, [_at(T0 + i * 60.0, rng, i) for i in range(300)])
        assert store.steps(model="gpt-x", limit=1).steps  # the roll-up starts here
        seen: list[str] = []

        def trace(sql: str) -> None:
            seen.append(sql)

        real = store.backend._reader  # type: ignore[attr-defined]

        def traced() -> sqlite3.Connection:
            conn: sqlite3.Connection = real()
            conn.set_trace_callback(trace)
            return conn

        store.backend._reader = traced  # type: ignore[attr-defined]
        assert store.steps(model="nothing", limit=50).steps == ()
        assert store.steps(label=("tier", "nothing"), limit=50).steps == ()
    walks = [s for s in seen if "FROM events INDEXED BY events_ts" in s]
    # only the range below the roll-up's floor (1970) is walked, nothing above it
    assert walks and all("ts < 1209600.0" in s for s in walks), walks


def test_postgres_a_model_no_step_has_walks_only_what_the_rollup_cannot_answer(
        pg_url: str) -> None:
    """The ranges walked: the times that are not finite (never rolled up), the hours of the
    rows stored since the fold, and all below the floor (1970); none of the hours the roll-up
    covers. Rows stored after the fold are found, and so are those at infinity."""
    from closedloop.store.postgres import _query

    rng = random.Random(5)
    with cl.open_store(pg_url) as store:
        _record(store, [_at(T0 + i * 60.0, rng, i) for i in range(300)])
        assert store.steps(model="gpt-x", limit=1).steps  # the roll-up starts here
        late = _at(T0 + 7 * 3600.0 + 5.0, rng, 300)._replace(model="late-model")
        far = _at(math.inf, rng, 301)._replace(model="late-model")
        _record(store, [late, far])
        backend: Any = store.backend
        with backend.pool().connection() as conn:
            assert _query._ranges(conn, backend.schema, StepFilter(model="nothing"),
                                  "model", "nothing") == [(math.inf, None), (None, 14 * 86400.0)]
            assert _query._ranges(conn, backend.schema, StepFilter(model="late-model"),
                                  "model", "late-model") == [
                (math.inf, None), (T0 + 7 * 3600.0, T0 + 8 * 3600.0), (None, 14 * 86400.0)]
            some = _query._ranges(conn, backend.schema, StepFilter(model="gpt-x"), "model",
                                  "gpt-x")
            assert some is not None and some[1:-1] == [(T0, T0 + 5 * 3600.0)]
        assert [e.trace_id for e in store.steps(model="late-model", limit=5).steps] == [
            far.trace_id, late.trace_id]
        assert store.steps(model="nothing", limit=50).steps == ()
        assert store.steps(label=("tier", "nothing"), limit=50).steps == ()
