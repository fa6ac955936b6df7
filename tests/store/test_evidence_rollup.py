"""The hourly roll-up of the evidence for autonomy levels (SQLite and PostgreSQL): the
evidence counted from it equals the Python pass over the same events
(:func:`closedloop.autonomy.count_events`) for every key, class and start time, whatever was
rolled up when: steps written after a fold (late ones, for hours it already covers), pruned
by retention, feedback recorded before or after a fold, start times at a hair of an hour's
boundary; read by a read-only handle (what is there) or a writable one (folded first)."""

from __future__ import annotations

import math
import random
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import closedloop as cl
from closedloop.autonomy import (
    Decisions,
    EvidenceQueries,
    Feedback,
    LevelKey,
    count_events,
    count_groups,
)
from closedloop.store import Store, level_store_for
from closedloop.store import _evidence as store_evidence
from closedloop.store.sqlite import _evidence as sqlite_evidence

from .test_evidence_queries import _events
from .test_learn_rollup import T0, _fresh, _kept, _record


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writable count folds the new rows in, a few rows a transaction."""
    monkeypatch.setattr(sqlite_evidence, "REFRESH_ROWS", 1)
    monkeypatch.setattr(sqlite_evidence, "CHUNK", 7)
    monkeypatch.setattr(store_evidence, "FOLD_EVERY_S", 0.0)
    try:
        from closedloop.store.postgres import _evidence as pg_evidence
    except ImportError:  # pragma: no cover - without the postgres extra
        return
    monkeypatch.setattr(pg_evidence, "REFRESH_ROWS", 1)


def _times(draw: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        ts = T0 + draw(st.integers(0, 30)) * 3600.0 + draw(
            st.sampled_from((0.0, 1e-9, -1e-9, 1799.5, 3599.999999)))
        out.append(math.nextafter(ts, -math.inf) if draw(st.booleans()) else ts)
    return out


@st.composite
def histories(draw: Any) -> dict[str, Any]:
    return {"batches": [_times(draw, draw(st.integers(0, 20)))
                        for _ in range(draw(st.integers(1, 4)))],
            "fold": draw(st.lists(st.booleans(), min_size=4, max_size=4)),
            "prune": draw(st.none() | st.integers(0, 30).map(lambda h: T0 + h * 3600.0 + 7.5)),
            "after": _times(draw, draw(st.integers(0, 8))),
            "feedback": draw(st.booleans()),
            "seed": draw(st.integers(0, 1000))}


def _check(store: Store, events: list[cl.StepEvent], rng: random.Random) -> None:
    levels = level_store_for(store)
    assert isinstance(levels, EvidenceQueries)
    for _ in range(4):
        key = LevelKey(task_type=rng.choice(("deploy", "db")),
                       agent_id=rng.choice(("*", "a1", "a2")),
                       action_class=rng.choice((None, None, "read", "delete")))
        since = T0 + rng.choice((-5.0, 0.0, 1e-9, 3600.0, 5000.5, 20 * 3600.0 - 1e-9))
        own = frozenset(rng.choice(((), ("read",), ("read", "delete"))))
        decisions = rng.choice((None, Decisions(approved=3, rejected=1, expired=2)))
        feedback = {f.step_id: f for f in levels.feedback(since=since)}
        mine = [e for e in events if e.task_type == key.task_type and e.ts >= since]
        want = count_events(key, mine, feedback, level="approve", since=since,
                            own_classes=own, decisions=decisions)
        groups = levels.evidence_groups(key.task_type, since=since,
                                        classes=key.action_class is not None or bool(own))
        assert groups is not None
        assert count_groups(key, groups, level="approve", since=since, own_classes=own,
                            decisions=decisions) == want, (key, since, own)


def _feedback(store: Store, events: list[cl.StepEvent], rng: random.Random) -> None:
    levels = level_store_for(store)
    for e in events:
        if e.outcome == "suggested" and e.step_id and rng.random() < 0.5:
            levels.put_feedback(Feedback(step_id=e.step_id, agreed=rng.random() < 0.7,
                                         by="alice", at=T0 + rng.uniform(-10, 30 * 3600)))


def _history(kind: str, history: dict[str, Any]) -> None:
    rng = random.Random(history["seed"])
    with _fresh(kind) as url:
        events: list[cl.StepEvent] = []
        with cl.open_store(url, batch_size=5) as store:
            for batch, fold in zip(history["batches"], history["fold"], strict=False):
                new = [e._replace(ts=ts) for e, ts in zip(_events(rng, len(batch)), batch,
                                                          strict=True)]
                _record(store, new)
                events += new
                if history["feedback"]:
                    _feedback(store, new, rng)
                if fold:
                    levels = level_store_for(store)
                    assert isinstance(levels, EvidenceQueries)
                    levels.evidence_groups("deploy", since=T0, classes=True)
            if history["prune"] is not None:
                cl.store.prune(store, history["prune"])
                events = [e for e in events if e.ts >= _kept(kind, history["prune"])]
            late = [e._replace(ts=ts) for e, ts in zip(_events(rng, len(history["after"])),
                                                       history["after"], strict=True)]
            _record(store, late)
            events += late
            if history["feedback"]:
                _feedback(store, late, rng)
            with cl.open_store(url, read_only=True, create=False) as reader:
                _check(reader, events, rng)  # what is rolled up, the rest read from events
            _check(store, events, rng)  # folded in first


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_sqlite_evidence_from_the_rollup_equals_the_scan(history: dict[str, Any]) -> None:
    _history("sqlite", history)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_postgres_evidence_from_the_rollup_equals_the_scan(history: dict[str, Any]) -> None:
    _history("postgresql", history)


def _sql(store: Store, schema: str | None, query: str) -> int:
    """Run ``query`` on ``store``'s roll-up table (``{t}``) and commit; its first value."""
    if schema is None:
        lite = sqlite3.connect(store.url.removeprefix("sqlite:///"))
        with lite:
            row = lite.execute(query.format(t="autonomy_rollup")).fetchone()
        lite.close()
    else:
        import psycopg

        from .conftest import PG_URL

        with psycopg.connect(PG_URL) as conn:
            cursor = conn.execute(query.format(t=f'"{schema}".autonomy_rollup'))
            row = cursor.fetchone() if cursor.description else None
    return int(row[0]) if row else 0


_STEPS = "SELECT coalesce(sum(steps), 0) FROM {t}"


def test_the_keeper_folds_the_evidence_and_the_count_reads_it(shared_url: str) -> None:
    schema = None if shared_url.startswith("sqlite") else shared_url.split("schema=")[1]
    rng = random.Random(4)
    events = [e._replace(task_type="deploy", ts=T0 + i * 300.0, step_id=uuid.uuid4().hex)
              for i, e in enumerate(_events(rng, 60))]
    with cl.open_store(shared_url, rollup_every=None) as store:
        _record(store, events)
        assert _sql(store, schema, _STEPS) == 0  # the writer never folds
        assert store.backend.fold_rollups() >= 1  # type: ignore[attr-defined] # the keeper's
        # PostgreSQL folds the rows below the oldest transaction open anywhere in the cluster
        below = (len(events) if schema is None else _sql(
            store, schema, f'SELECT count(*) FROM "{schema}".events WHERE xact < '
            f'(SELECT covered FROM "{schema}".autonomy_rollup_state)'))
        assert _sql(store, schema, _STEPS) == below
        levels = level_store_for(store)
        assert isinstance(levels, EvidenceQueries)
        before = sum(g.steps for g in levels.evidence_groups("deploy", since=T0,
                                                             classes=False) or [])
        assert before == len(events)
        rolled = _sql(store, schema, _STEPS)  # (the count may have folded more)
        _sql(store, schema, "UPDATE {t} SET steps = steps * 2")  # shows in a count
        after = sum(g.steps for g in levels.evidence_groups("deploy", since=T0,
                                                            classes=False) or [])
        assert after == len(events) + rolled  # the whole hours come from the roll-up
        cl.store.prune(store, T0 + 2 * 86400.0)
        assert _sql(store, schema, _STEPS) == 0  # retention drops its hours too


def test_a_writable_count_folds_at_most_once_per_interval(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared_url, schema = f"sqlite:///{tmp_path / 'e.db'}", None
    rng = random.Random(6)
    events = [e._replace(task_type="deploy", ts=T0 + i * 300.0) for i, e in
              enumerate(_events(rng, 40))]
    monkeypatch.setattr(store_evidence, "FOLD_EVERY_S", 3600.0)
    with cl.open_store(shared_url, rollup_every=None) as store:
        levels = level_store_for(store)
        assert isinstance(levels, EvidenceQueries)
        _record(store, events[:20])
        assert level_store_for(store) is levels  # one for the backend's life
        assert sum(g.steps for g in levels.evidence_groups("deploy", since=T0,
                                                           classes=False) or []) == 20
        assert _sql(store, schema, _STEPS) == 20  # folded first
        _record(store, events[20:])
        assert sum(g.steps for g in levels.evidence_groups("deploy", since=T0,
                                                           classes=False) or []) == 40
        assert _sql(store, schema, _STEPS) == 20  # not again within the interval: read
        monkeypatch.setattr(store_evidence, "FOLD_EVERY_S", 0.0)
        levels.evidence_groups("deploy", since=T0, classes=False)
        assert _sql(store, schema, _STEPS) == 40


def test_a_postgres_fold_summarizes_the_brin_ranges_vacuum_leaves(pg_url: str,
                                                                  pg_schema: str) -> None:
    """What is not folded is read through the ``events_xact`` BRIN index: its partial last
    range of each partition, unsummarized, would be read whole by every count."""
    psycopg = pytest.importorskip("psycopg")
    from closedloop.store.postgres import _evidence as pg_evidence

    from .conftest import PG_URL

    rng = random.Random(8)
    with cl.open_store(pg_url, rollup_every=None) as store:
        _record(store, [e._replace(ts=T0 + i * 7200.0) for i, e in enumerate(_events(rng, 50))])
        children = "FROM pg_inherits WHERE inhparent = to_regclass(%s)"
        index = (f'"{pg_schema}".events_xact',)
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            # as VACUUM leaves a partition's last, partial range
            conn.execute(f"SELECT brin_desummarize_range(inhrelid, 0) {children}", index)
            assert pg_evidence.refresh(conn, pg_schema)
            left = conn.execute(f"SELECT sum(brin_summarize_new_values(inhrelid)) {children}",
                                index).fetchone()
    assert left == (0,)
