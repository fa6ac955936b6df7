"""The control-state port: every store keeps pauses and halts by the same rules.

``ledger_for_store`` asks the store's backend for its ledger; parametrized over memory,
SQLite and PostgreSQL (``any_url``), or over the stores shared between processes
(``shared_url``), see ``conftest.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import psycopg
import pytest

import closedloop as cl
from closedloop.control import ControlLedger, Stop, StopKind, ledger_for_store
from closedloop.store.postgres import PostgresLedger

from .conftest import PG_URL

SECRET = "sk-live-0123456789abcdefghijklmnop"


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


@pytest.fixture
def ledger(store: cl.Store) -> ControlLedger:
    return ledger_for_store(store, redis_url=None)


def _halt(task_type: str = "provision", reason: str = "5 verifications failed") -> Stop:
    return Stop(task_type=task_type, kind=StopKind.HALTED, reason=reason, by="FaultControl",
                at=time.time(), evidence={"consecutive_failures": 5, "rate": 0.5})


def _pause(task_type: str = "provision", seconds: float = 300.0) -> Stop:
    now = time.time()
    return Stop(task_type=task_type, kind=StopKind.PAUSED, reason="error spike", by="FaultControl",
                at=now, until=now + seconds)


def test_a_halt_is_read_back_with_who_why_and_evidence(ledger: ControlLedger) -> None:
    halt = _halt()
    ledger.put(halt)
    assert ledger.get("provision") == halt
    assert ledger.stops() == [halt]
    assert ledger.get("deploy") is None


def test_a_pause_never_overwrites_a_halt(ledger: ControlLedger) -> None:
    halt = _halt()
    ledger.put(halt)
    ledger.put(_pause())
    assert ledger.get("provision") == halt
    assert [row["event"] for row in ledger.history()] == ["halted"]


def test_a_halt_replaces_a_pause(ledger: ControlLedger) -> None:
    ledger.put(_pause())
    ledger.put(_halt())
    stop = ledger.get("provision")
    assert stop is not None
    assert stop.kind is StopKind.HALTED
    assert [row["event"] for row in ledger.history()] == ["halted", "paused"]


def test_an_expired_pause_is_no_stop(ledger: ControlLedger) -> None:
    ledger.put(_pause(seconds=-1.0))
    assert ledger.get("provision") is None
    assert ledger.stops() == []


def test_lift_removes_the_stop_and_records_who_and_why(ledger: ControlLedger) -> None:
    halt = _halt()
    ledger.put(halt)
    assert ledger.lift("provision", reason="AMI fixed", by="alice") == halt
    assert ledger.get("provision") is None
    latest = ledger.history()[0]
    assert (latest["event"], latest["task_type"], latest["by"], latest["reason"]) == (
        "resumed", "provision", "alice", "AMI fixed")


def test_lifting_nothing_returns_none_and_records_nothing(ledger: ControlLedger) -> None:
    assert ledger.lift("provision", reason="x", by="alice") is None
    assert ledger.history() == []


def test_history_is_newest_first_and_limited(ledger: ControlLedger) -> None:
    for name in ("a", "b", "c"):
        ledger.put(_halt(name))
    assert [row["task_type"] for row in ledger.history(2)] == ["c", "b"]


def test_reasons_and_evidence_are_stored_redacted(ledger: ControlLedger) -> None:
    ledger.put(Stop(task_type="provision", kind=StopKind.HALTED, reason=f"token {SECRET} leaked",
                    by="FaultControl", at=time.time(), evidence={"api_key": SECRET}))
    ledger.lift("provision", reason=f"rotated {SECRET}", by="alice")
    assert SECRET not in repr(ledger.history())


def test_a_stop_outlives_the_store_that_wrote_it(shared_url: str) -> None:
    with cl.open_store(shared_url) as first:
        ledger_for_store(first, redis_url=None).put(_halt())
    with cl.open_store(shared_url) as second:
        stop = ledger_for_store(second, redis_url=None).get("provision")
    assert stop is not None
    assert stop.kind is StopKind.HALTED


# ----- PostgreSQL ------------------------------------------------------------------------

def _tables(schema: str) -> list[str]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        return [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
            "ORDER BY table_name", (schema,)).fetchall()]


def test_postgresql_keeps_control_state_in_the_store_schema(pg_url: str, pg_schema: str) -> None:
    with cl.open_store(pg_url) as store:
        ledger = ledger_for_store(store, redis_url=None)
    assert isinstance(ledger, PostgresLedger)
    assert {"control_stops", "control_history", "control_keys"} <= set(_tables(pg_schema))
    ledger.put(Stop(task_type="provision", kind=StopKind.HALTED, reason=f"key {SECRET}",
                    by="FaultControl", at=time.time(), evidence={"key": SECRET}))
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        row = conn.execute(f'SELECT reason, evidence FROM "{pg_schema}".control_stops').fetchone()
    assert row is not None
    assert SECRET not in repr(row)


def test_postgresql_reads_on_a_schema_without_a_store_create_nothing(
    pg_url: str, pg_schema: str
) -> None:
    ledger = PostgresLedger.from_url(pg_url)
    assert ledger.get("provision") is None
    assert ledger.stops() == []
    assert ledger.history() == []
    assert ledger.lift("provision", reason="x", by="alice") is None
    assert ledger.published() == {}
    assert _tables(pg_schema) == []


def test_postgresql_keeps_published_limits(pg_url: str) -> None:
    ledger = PostgresLedger.from_url(pg_url)
    ledger.publish("worker-1", {"tenant-a": {"limit": 4.0, "in_flight": 1}})
    ledger.publish("worker-1", {"tenant-a": {"limit": 2.0, "in_flight": 0}})
    published = ledger.published()
    assert list(published) == ["tenant-a@worker-1"]
    assert published["tenant-a@worker-1"]["limit"] == 2.0


def test_pauses_and_a_halt_written_together_leave_the_halt(pg_url: str) -> None:
    """Writers serialise on the schema: a pause that read "no stop" never lands on a halt."""
    from concurrent.futures import ThreadPoolExecutor

    with cl.open_store(pg_url):
        pass
    ledgers = [PostgresLedger.from_url(pg_url) for _ in range(8)]
    names = [f"task-{n}" for n in range(6)]
    writes = [(ledgers[i], _halt(name) if i == 3 else _pause(name))
              for name in names for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda write: write[0].put(write[1]), writes))
    assert [(s.task_type, s.kind) for s in ledgers[0].stops()] == [
        (name, StopKind.HALTED) for name in names]


def test_a_store_made_before_control_state_gains_its_tables_when_opened(
    pg_url: str, pg_schema: str
) -> None:
    with cl.open_store(pg_url):
        pass
    with psycopg.connect(PG_URL, autocommit=True) as conn:  # back to schema version 1
        for table in ("control_stops", "control_history", "control_keys",
                      "spans", "traces", "scores"):  # and those of later migrations
            conn.execute(f'DROP TABLE "{pg_schema}".{table}')
        conn.execute(f'DELETE FROM "{pg_schema}".schema_version WHERE version > 1')
    ledger = PostgresLedger.from_url(pg_url)
    assert ledger.stops() == []  # version 1: no tables is no stops, and nothing is made
    assert "control_stops" not in _tables(pg_schema)
    with cl.open_store(pg_url) as store:
        ledger_for_store(store, redis_url=None).put(_halt())
    assert "control_stops" in _tables(pg_schema)
    assert [s.task_type for s in ledger.stops()] == ["provision"]


def test_a_store_unreachable_at_start_up_serves_its_control_state_once_it_answers(
    pg_url: str,
) -> None:
    from closedloop.store._registry import DeferredBackend
    from closedloop.store.postgres import open_backend

    # what default_store() holds when PostgreSQL was down as the agent started
    deferred = DeferredBackend(pg_url, open_backend, create=True,
                               error=cl.StoreError("connection refused"))
    ledger = deferred.control_ledger()
    ledger.put(_halt())
    ledger.publish("worker-1", {"tenant-a": {"limit": 4.0}})  # type: ignore[attr-defined]
    deferred.close()
    stop = PostgresLedger.from_url(pg_url).get("provision")
    assert stop is not None
    assert stop.kind is StopKind.HALTED
    assert ledger.published()["tenant-a@worker-1"]["limit"] == 4.0  # type: ignore[attr-defined]
