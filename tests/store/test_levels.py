"""The level-store port: every store keeps autonomy levels, their audit trail, feedback on
suggestions and detector states by the same rules (memory, SQLite, PostgreSQL)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.autonomy import Feedback, LevelKey, LevelRecord, LevelStore
from closedloop.store import SCHEMA_VERSION, SQLiteLevelStore, level_store_for

SECRET = "sk-live-0123456789abcdefghijklmnop"
STEP = "ab" * 16


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


@pytest.fixture
def levels(store: cl.Store) -> LevelStore:
    return level_store_for(store)


def record(level: str, *, task_type: str = "provision", action_class: str | None = None,
           agent_id: str = "*", at: float | None = None, reason: str = "earned",
           ceiling: str | None = None) -> LevelRecord:
    return LevelRecord(key=LevelKey(task_type=task_type, agent_id=agent_id,
                                    action_class=action_class),
                       level=level, by="alice", at=time.time() if at is None else at,
                       reason=reason, ceiling=ceiling, evidence={"decisions": 120, "rate": 0.97})


def test_a_level_reads_back_with_who_why_when_and_evidence(levels: LevelStore) -> None:
    assert levels.levels() == []
    r = record("approve", ceiling="autonomous")
    change = levels.set_level(r)
    assert change is not None and (change.old, change.new, change.kind) == (None, "approve", "set")
    assert levels.levels() == [r]
    assert levels.levels("provision") == [r] and levels.levels("deploy") == []


def test_each_change_is_in_the_audit_trail_newest_first(levels: LevelStore) -> None:
    t = time.time()
    levels.set_level(record("suggest", at=t))
    levels.set_level(record("approve", at=t + 1, reason="agreement 0.97"), kind="promoted")
    levels.set_level(record("autonomous", at=t + 2), kind="promoted")
    levels.set_level(record("approve", at=t + 3, reason="CUSUM alarm"), kind="demoted")
    levels.set_level(record("suggest", task_type="deploy", at=t + 4))
    trail = levels.history(task_type="provision")
    assert [(c.old, c.new, c.kind) for c in trail] == [
        ("autonomous", "approve", "demoted"), ("approve", "autonomous", "promoted"),
        ("suggest", "approve", "promoted"), (None, "suggest", "set")]
    assert trail[0].reason == "CUSUM alarm" and trail[0].by == "alice"
    assert trail[0].evidence == {"decisions": 120, "rate": 0.97}
    assert [c.key.task_type for c in levels.history(limit=2)] == ["deploy", "provision"]
    assert [lv.level for lv in levels.levels()] == ["suggest", "approve"]  # deploy, provision


def test_classes_and_agents_have_levels_of_their_own(levels: LevelStore) -> None:
    levels.set_level(record("autonomous", action_class="create_replica"))
    levels.set_level(record("approve", action_class="delete_database", ceiling="approve"))
    levels.set_level(record("suggest"))
    levels.set_level(record("autonomous", agent_id="agent-2"))
    got = {(r.key.agent_id, r.key.action_class): (r.level, r.ceiling)
           for r in levels.levels("provision")}
    assert got == {("*", "create_replica"): ("autonomous", None),
                   ("*", "delete_database"): ("approve", "approve"),
                   ("*", None): ("suggest", None), ("agent-2", None): ("autonomous", None)}


def test_a_conditional_change_applies_only_from_the_expected_level(levels: LevelStore) -> None:
    levels.set_level(record("autonomous"))
    demote = record("approve", reason="alarm")
    assert levels.set_level(demote, kind="demoted", only_from={"autonomous"}) is not None
    # a second process that saw the same alarm finds it done: no second entry
    assert levels.set_level(demote, kind="demoted", only_from={"autonomous"}) is None
    assert len(levels.history()) == 2
    assert levels.set_level(record("approve", task_type="new"), only_from={None}) is not None


def test_two_threads_demoting_at_once_make_one_change(levels: LevelStore) -> None:
    levels.set_level(record("autonomous"))
    made: list[object] = []
    barrier = threading.Barrier(4)

    def demote() -> None:
        barrier.wait()
        made.append(levels.set_level(record("approve"), kind="demoted",
                                     only_from={"autonomous"}))

    threads = [threading.Thread(target=demote) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(m is not None for m in made) == 1
    assert [c.kind for c in levels.history()] == ["demoted", "set"]


def test_reasons_evidence_and_notes_are_redacted(levels: LevelStore) -> None:
    r = LevelRecord(key=LevelKey(task_type="provision"), level="approve", by="alice",
                    at=time.time(), reason=f"token {SECRET}", evidence={"note": SECRET})
    levels.set_level(r)
    levels.put_feedback(Feedback(step_id=STEP, agreed=False, by="bob", at=time.time(),
                                 note=f"used {SECRET} instead"))
    stored = levels.levels()[0]
    assert SECRET not in stored.reason and SECRET not in str(stored.evidence)
    assert SECRET not in str(levels.history()[0])
    (fb,) = levels.feedback()
    assert fb.note is not None and SECRET not in fb.note and "instead" in fb.note


def test_feedback_last_one_per_step_counts(levels: LevelStore) -> None:
    t = time.time()
    levels.put_feedback(Feedback(step_id=STEP, agreed=False, by="bob", at=t))
    levels.put_feedback(Feedback(step_id="cd" * 16, agreed=True, by="bob", at=t + 1))
    levels.put_feedback(Feedback(step_id=STEP, agreed=True, by="carol", at=t + 2, note="ok"))
    got = levels.feedback()
    assert [(f.step_id, f.agreed, f.by) for f in got] == [("cd" * 16, True, "bob"),
                                                          (STEP, True, "carol")]
    assert [f.step_id for f in levels.feedback(since=t + 1.5)] == [STEP]


def test_detector_state_round_trips(levels: LevelStore) -> None:
    assert levels.detector("demote:provision") is None
    levels.put_detector("demote:provision", {"statistic": 12.0, "steps": 40, "alarms": 0},
                        at=time.time())
    levels.put_detector("demote:provision", {"statistic": 3.0, "steps": 41, "alarms": 1},
                        at=time.time())
    assert levels.detector("demote:provision") == {"statistic": 3.0, "steps": 41, "alarms": 1}


def test_levels_are_shared_by_every_handle_on_the_store(shared_url: str) -> None:
    with cl.open_store(shared_url) as one:
        level_store_for(one).set_level(record("approve"))
    with cl.open_store(shared_url) as two:
        assert [r.level for r in level_store_for(two).levels()] == ["approve"]


def test_an_older_sqlite_store_read_only_has_no_levels(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE events (ts REAL)")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION - 1}")
    conn.close()
    assert SQLiteLevelStore(path).levels() == []
    assert SQLiteLevelStore(tmp_path / "missing.db").history() == []


def test_an_unreadable_sqlite_store_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "broken.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(cl.ControlUnavailable, match="autonomy levels"):
        SQLiteLevelStore(path).levels()
    with pytest.raises(cl.ControlUnavailable):
        SQLiteLevelStore(path).set_level(record("approve"))


@pytest.mark.parametrize("pooled", [False, True])
def test_an_unreachable_postgres_fails_closed(pooled: bool) -> None:
    import psycopg
    from psycopg_pool import ConnectionPool

    from closedloop.store.postgres import PostgresLevelStore
    from closedloop.store.postgres._backend import _Connections

    nowhere = "postgresql://postgres@127.0.0.1:1/test"
    tried: list[bool] = []

    def connect(autocommit: bool) -> psycopg.Connection[Any]:
        tried.append(autocommit)
        return psycopg.connect(nowhere, connect_timeout=1, autocommit=autocommit)

    # what a writable backend's level store runs on (a pool: its empty pool is not waited
    # for, the refused connection of its own fails the call), and a read-only one's
    pool: ConnectionPool[psycopg.Connection[Any]] | _Connections = (
        ConnectionPool(nowhere, min_size=1, max_size=1, open=True, timeout=600,
                       kwargs={"connect_timeout": 1, "autocommit": True}) if pooled else
        _Connections(connect))
    store = PostgresLevelStore(lambda: pool, connect, "x", "postgresql://…")
    try:
        with pytest.raises(cl.ControlUnavailable, match="autonomy levels"):
            store.levels()
        with pytest.raises(cl.ControlUnavailable, match="autonomy levels"):
            store.set_level(record("approve"))
    finally:
        pool.close()
    assert tried == [True, True]


@pytest.mark.parametrize("bad", [
    {"level": "yolo"}, {"level": "autonomous", "ceiling": "approve"}, {"reason": " "},
    {"by": ""}])
def test_a_bad_record_is_a_config_error(bad: dict[str, str]) -> None:
    fields = {"key": LevelKey(task_type="t"), "level": "approve", "by": "a", "at": 1.0,
              "reason": "r", **bad}
    with pytest.raises(cl.ConfigError):
        LevelRecord(**fields)  # type: ignore[arg-type]


def test_a_bad_step_id_is_a_config_error() -> None:
    with pytest.raises(cl.ConfigError, match="32 lowercase hex"):
        Feedback(step_id="nope", agreed=True, by="a", at=1.0)


def test_a_loop_follows_the_level_stored_in_any_backend(store: cl.Store) -> None:
    from closedloop.autonomy import AutonomyLevels

    levels = AutonomyLevels(store, cache_s=0.0)
    levels.set("provision", "suggest", by="alice", reason="new")
    loop = cl.Loop(lambda t, a: t, task_type="provision", executor=lambda p: p, store=store,
                   levels=levels)
    assert loop.run(1).outcome is cl.Outcome.SUGGESTED
    levels.set("provision", "autonomous", by="alice", reason="earned")
    assert loop.run(2).outcome is cl.Outcome.SUCCEEDED


def test_a_demotion_is_stored_for_every_process(shared_url: str) -> None:
    from closedloop.autonomy import AutonomyLevels

    with cl.open_store(shared_url) as store:
        levels = AutonomyLevels(store, cache_s=0.0, sinks=[])
        loop = cl.Loop(lambda t, a: t, task_type="provision", executor=lambda p: p,
                       store=store, levels=levels, guards=[levels.monitor()],
                       verifiers=[lambda i, r: False])
        outcomes = [loop.run(i).outcome for i in range(40)]
        assert cl.Outcome.AWAITING_APPROVAL in outcomes
    with cl.open_store(shared_url) as again:  # another process
        other = AutonomyLevels(again)
        assert other.resolve("provision").level is cl.Autonomy.APPROVE
        (change,) = other.levels.history()
        assert change.kind == "demoted" and change.evidence["observations"] >= 1
        assert other.levels.detector("autonomy.demote:provision:*:") is not None
