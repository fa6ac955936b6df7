"""One contract for every event backend: what a user may rely on whichever URL they pass.

Parametrized over memory, SQLite and PostgreSQL (``any_url``), or over the backends that are
shared between processes (``shared_url``), see ``conftest.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import closedloop as cl
from closedloop.store import EventQuery, open_backend

SRC = str(Path(__file__).resolve().parents[2] / "src")


def event(i: int, *, ts: float | None = None, task_type: str = "deploy",
          trace_id: str | None = None) -> cl.StepEvent:
    """An ordinary event; ``i`` makes it unique."""
    return cl.StepEvent(
        ts=1_790_000_000.0 + i if ts is None else ts, trace_id=trace_id or f"{i:032x}",
        agent_id="agent-1", task_type=task_type, autonomy="autonomous", outcome="succeeded",
        attempts=1, input_tokens=100 + i, output_tokens=20, latency_ms=12.5,
        validation_passed=True, verification_passed=True, error_type=None, error_message=None,
        propose_ms=1.25, validate_ms=0.5, act_ms=8.0, verify_ms=2.75, detail=None,
    )


UNUSUAL = [
    # every optional field None, zero timings
    cl.StepEvent(
        ts=1_790_000_100.125, trace_id="0" * 32, agent_id="a", task_type="t",
        autonomy="suggest", outcome="error", attempts=0, input_tokens=0, output_tokens=0,
        latency_ms=0.0, validation_passed=None, verification_passed=None, error_type=None,
        error_message=None, propose_ms=0.0, validate_ms=0.0, act_ms=0.0, verify_ms=0.0,
        detail=None),
    # unicode everywhere, False booleans, a nested detail dict, large counts, odd floats
    cl.StepEvent(
        ts=1_790_000_200.000001, trace_id="f" * 32, agent_id="агент-🤖",
        task_type="terraform.plan/東京", autonomy="approve", outcome="failed", attempts=3,
        input_tokens=2**40, output_tokens=2**31 + 7, latency_ms=1e-300,
        validation_passed=False, verification_passed=False, error_type="validation",
        error_message="schema: 'name' is required — «ç» \u202ertl\u202c e\u0301 \U0001f600\nline 2",
        propose_ms=0.1, validate_ms=1e6, act_ms=123.456789012345, verify_ms=0.3,
        detail={"issues": [{"code": "required", "path": ["a", 0, "b"], "message": "ü 💥",
                            "severity": "error"}],
                "attempts": [{"attempt": 1, "ok": False, "score": 0.25, "none": None}],
                "empty": {}, "list": [], "quote": "\"' \\ [bold]x[/]"}),
    # passed validation, unknown verification, an empty detail
    cl.StepEvent(
        ts=1_790_000_300.5, trace_id="a1" * 16, agent_id="a", task_type="t",
        autonomy="autonomous", outcome="failed", attempts=1, input_tokens=1, output_tokens=1,
        latency_ms=1.0, validation_passed=True, verification_passed=None,
        error_type="verification_unknown", error_message="", propose_ms=0.1, validate_ms=0.1,
        act_ms=0.1, verify_ms=0.1, detail={}),
]


def test_every_field_reads_back_as_written(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        for e in UNUSUAL:
            store.record(e)
        assert store.flush()
        back = list(store.events())
    assert back == UNUSUAL
    for got, want in zip(back, UNUSUAL, strict=True):
        assert [type(v) for v in got] == [type(v) for v in want]


def test_events_come_back_oldest_first_whatever_the_write_order(any_url: str) -> None:
    with cl.open_store(any_url, batch_size=7) as store:
        for i in (5, 1, 9, 3, 7, 0, 8, 2, 6, 4):
            store.record(event(i))
        assert store.flush()
        assert [e.input_tokens - 100 for e in store.events()] == list(range(10))


def test_queries_filter_by_time_task_type_and_limit(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        for i in range(20):
            store.record(event(i, task_type="even" if i % 2 == 0 else "odd"))
        assert store.flush()

        def ids(**kw: object) -> list[int]:
            return [e.input_tokens - 100 for e in store.events(**kw)]  # type: ignore[arg-type]

        base = 1_790_000_000.0
        assert ids(since=base + 15) == [15, 16, 17, 18, 19]  # since is inclusive
        assert ids(until=base + 3) == [0, 1, 2]  # until is exclusive
        assert ids(since=base + 4, until=base + 8) == [4, 5, 6, 7]
        assert ids(task_type="odd", since=base + 10) == [11, 13, 15, 17, 19]
        assert ids(task_type="none") == []
        assert ids(limit=3) == [0, 1, 2]
        assert ids(task_type="even", limit=2, since=base + 5) == [6, 8]
        assert ids(limit=0) == []
        assert ids(since=base + 100) == []


def test_queries_filter_by_trace(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        for i in range(10):
            store.record(event(i, trace_id="a" * 32 if i in (2, 5, 7) else None))
        assert store.flush()
        assert [e.input_tokens - 100 for e in store.events(trace_id="a" * 32)] == [2, 5, 7]
        assert [e.input_tokens - 100 for e in store.events(trace_id="a" * 32, limit=2,
                                                           since=1_790_000_003.0)] == [5, 7]
        assert list(store.events(trace_id="b" * 32)) == []


def test_the_backend_answers_an_event_query_directly(any_url: str) -> None:
    backend = open_backend(any_url)
    try:
        backend.write_batch([event(i) for i in range(5)])
        got = list(backend.iter_events(EventQuery(since=1_790_000_001.0, limit=2)))
        assert got == [event(1), event(2)]
        assert backend.count() == 5
    finally:
        backend.close()


def test_count_is_what_was_written(any_url: str) -> None:
    with cl.open_store(any_url, batch_size=100) as store:
        assert store.count() == 0
        for i in range(1234):
            store.record(event(i))
        assert store.flush()
        assert store.count() == 1234


def test_a_batch_is_written_whole(any_url: str) -> None:
    backend = open_backend(any_url)
    try:
        batch = [event(i, ts=1_790_000_000.0 + i * 3600.0) for i in range(100)]  # ~4 days
        backend.write_batch(batch)
        assert list(backend.iter_events(EventQuery())) == batch
    finally:
        backend.close()


def test_a_store_reopened_after_close_keeps_its_events(shared_url: str) -> None:
    with cl.open_store(shared_url) as store:
        for i in range(10):
            store.record(event(i))
    with cl.open_store(shared_url) as again:
        assert list(again.events()) == [event(i) for i in range(10)]
        again.record(event(10))
        assert again.flush()
        assert again.count() == 11


def test_a_backend_is_usable_after_close(shared_url: str) -> None:
    backend = open_backend(shared_url)
    backend.write_batch([event(0)])
    backend.close()
    backend.write_batch([event(1)])
    assert backend.count() == 2
    backend.close()


def _run_processes(code: str, args: list[list[str]], timeout: float = 120) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *a],
                              env={"PYTHONPATH": SRC, "PATH": "/usr/bin:/bin"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in args]
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-2000:]


WRITER = """
    import sys, time
    import closedloop as cl
    url, worker, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    while time.time() < start:  # all workers begin together
        time.sleep(0.005)
    store = cl.open_store(url, batch_size=257)
    for i in range(n):
        store.record(cl.StepEvent(
            ts=1_790_000_000.0 + i * 60.0, trace_id=f"{worker:04d}-{i:06d}", agent_id=str(worker),
            task_type="t", autonomy="autonomous", outcome="succeeded", attempts=1,
            input_tokens=i, output_tokens=0, latency_ms=1.0, validation_passed=True,
            verification_passed=None, error_type=None, error_message=None, propose_ms=0.0,
            validate_ms=0.0, act_ms=0.0, verify_ms=0.0, detail={"w": worker}))
    stats = store.close()
    assert stats.written == n and stats.not_written == 0, stats
"""


def test_writers_in_several_processes_each_event_arrives_once(shared_url: str) -> None:
    workers, n = 4, 3000
    start = time.time() + 1.0
    # the store is created by the workers themselves, all at once
    _run_processes(WRITER, [[shared_url, str(w), str(n), str(start)] for w in range(workers)])
    with cl.open_store(shared_url) as store:
        ids = [e.trace_id for e in store.events()]
        assert store.count() == workers * n
    assert len(ids) == workers * n
    assert set(ids) == {f"{w:04d}-{i:06d}" for w in range(workers) for i in range(n)}


MIGRATOR = """
    import sys, time
    from closedloop.store import open_backend
    url, start = sys.argv[1], float(sys.argv[2])
    while time.time() < start:
        time.sleep(0.002)
    backend = open_backend(url)
    backend.close()
"""


def test_processes_creating_one_store_at_once_migrate_it_once(shared_url: str) -> None:
    start = time.time() + 1.0
    _run_processes(MIGRATOR, [[shared_url, str(start)] for _ in range(5)])
    backend = open_backend(shared_url)
    try:
        backend.write_batch([event(1)])
        assert list(backend.iter_events(EventQuery())) == [event(1)]
        if shared_url.startswith("sqlite"):
            from closedloop.store import SCHEMA_VERSION
            from closedloop.store._sqlite import _connect
            db = _connect(Path(shared_url[len("sqlite:///"):]))
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            db.close()
        else:
            from closedloop.store._postgres import SCHEMA_VERSION as PG_VERSION
            from closedloop.store._postgres import PostgresBackend
            assert isinstance(backend, PostgresBackend)
            with backend.pool().connection() as conn:
                rows = conn.execute(f'SELECT version FROM "{backend.schema}".schema_version '
                                    "ORDER BY version").fetchall()
            assert [r[0] for r in rows] == list(range(1, PG_VERSION + 1))
    finally:
        backend.close()


def test_detail_values_json_cannot_hold_are_stored_as_text(any_url: str) -> None:
    import datetime

    odd = event(1)._replace(detail={"when": datetime.date(2026, 12, 1), "n": 1})
    with cl.open_store(any_url) as store:
        store.record(odd)
        assert store.flush()
        (back,) = store.events()
    if any_url == "memory://":  # nothing is serialised in memory
        assert back == odd
    else:
        assert back.detail == {"when": "2026-12-01", "n": 1}
