"""The evidence for autonomy levels counted where the steps are (the level store's evidence
port: SQL on SQLite and PostgreSQL, the memory backend's events): the same evidence as the
Python pass over the events (:func:`closedloop.autonomy.count_events`) for every key, agent,
action class and start time, with feedback and durable requests."""

from __future__ import annotations

import random
import uuid
from contextlib import ExitStack
from typing import Any

import pytest

import closedloop as cl
from closedloop.autonomy import (
    AutonomyLevels,
    Decisions,
    EvidenceQueries,
    Feedback,
    LevelKey,
    count_events,
    count_groups,
)
from closedloop.store import level_store_for
from closedloop.store.sqlite import _evidence as sqlite_evidence

T0 = 1_790_000_000.0
MODES = ("suggest", "approve", "autonomous")
OUTCOMES = ("succeeded", "failed", "error", "suggested", "rejected", "expired", "blocked",
            "paused")
ERRORS = (None, "executor", "verifier_error", "verification", "verification_unknown",
          "validation", "agent")
CLASSES = (None, "read", "delete", 7)


def _detail(rng: random.Random) -> dict[str, Any] | None:
    detail: dict[str, Any] = {}
    cls = rng.choice(CLASSES)
    if rng.random() < 0.6:
        detail["autonomy"] = ({"class": cls, "level": "x"} if cls is not None or rng.random()
                              < 0.5 else {"level": "x"})
    elif rng.random() < 0.2:
        detail["autonomy"] = "not an object"
    if rng.random() < 0.4:
        detail["approval"] = ({"request_id": uuid.uuid4().hex} if rng.random() < 0.8
                              else "not an object")
    return detail or rng.choice([None, {"other": 1}])  # type: ignore[list-item]


def _events(rng: random.Random, n: int) -> list[cl.StepEvent]:
    return [cl.StepEvent(
        ts=T0 + rng.uniform(0, 100), trace_id=uuid.uuid4().hex,
        agent_id=rng.choice(("a1", "a2")), task_type=rng.choice(("deploy", "db")),
        autonomy=rng.choice(MODES), outcome=rng.choice(OUTCOMES), attempts=1,
        input_tokens=1, output_tokens=1, latency_ms=1.0,
        validation_passed=rng.choice((None, True, False)),
        verification_passed=rng.choice((None, True, False)), error_type=rng.choice(ERRORS),
        error_message=None, propose_ms=0.0, validate_ms=0.0, act_ms=0.0, verify_ms=0.0,
        detail=_detail(rng), step_id=rng.choice((None, uuid.uuid4().hex)))
        for _ in range(n)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_evidence_counted_in_the_store_equals_the_python_pass(
        any_url: str, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if seed == 3:  # SQLite reads a wide window through the task type's index
        monkeypatch.setattr(sqlite_evidence, "NARROW_ROWS", 1)
    rng = random.Random(seed)
    events = _events(rng, 400)
    with cl.open_store(any_url) as store, ExitStack() as stack:
        for e in events:
            store.record(e)
        assert store.flush()
        levels = level_store_for(store)
        if seed == 3 and any_url.startswith("sqlite"):  # no roll-up yet: every step is read
            levels = level_store_for(stack.enter_context(
                cl.open_store(any_url, read_only=True, create=False)))
        assert isinstance(levels, EvidenceQueries)
        suggested = [e for e in events if e.outcome == "suggested" and e.step_id]
        for e in rng.sample(suggested, min(30, len(suggested))):
            levels.put_feedback(Feedback(step_id=e.step_id or "", agreed=rng.random() < 0.7,
                                         by="alice", at=T0 + rng.uniform(0, 100)))
        for _ in range(12):
            key = LevelKey(task_type=rng.choice(("deploy", "db", "none")),
                           agent_id=rng.choice(("*", "a1", "a2")),
                           action_class=rng.choice((None, None, "read", "delete")))
            since = T0 + rng.choice((0.0, 30.5, 70.0))
            own = frozenset(rng.choice(((), ("read",), ("read", "delete"))))
            decisions = rng.choice((None, Decisions(approved=3, rejected=1, expired=2)))
            feedback = {f.step_id: f for f in levels.feedback(since=since)}
            mine = [e for e in events if e.task_type == key.task_type and e.ts >= since]
            want = count_events(key, mine, feedback, level="approve", since=since,
                                own_classes=own, decisions=decisions)
            groups = levels.evidence_groups(
                key.task_type, since=since, classes=key.action_class is not None or bool(own))
            assert groups is not None
            got = count_groups(key, groups, level="approve", since=since, own_classes=own,
                               decisions=decisions)
            assert got == want, (key, since, own)


def test_autonomy_levels_read_the_evidence_from_the_port(any_url: str) -> None:
    rng = random.Random(9)
    events = [e._replace(task_type="deploy") for e in _events(rng, 200)]
    with cl.open_store(any_url) as store:
        for e in events:
            store.record(e)
        assert store.flush()
        levels = AutonomyLevels(store, sinks=[], clock=lambda: T0 + 50.0)
        key = LevelKey(task_type="deploy")
        found = levels.evidence(key)
        # the port, not a read: reading the events would fail
        store.events = None  # type: ignore[assignment,method-assign]
        assert levels.evidence(key) == found
    want = count_events(key, events, {}, level="autonomous", since=T0 + 50.0 - 30 * 86400,
                        decisions=None)
    assert (found.verification, found.suggestions) == (want.verification, want.suggestions)
