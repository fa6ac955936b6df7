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
from typing import Any

import pytest

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
            from closedloop.store.sqlite._backend import _connect
            db = _connect(Path(shared_url[len("sqlite:///"):]))
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            db.close()
        else:
            from closedloop.store.postgres import SCHEMA_VERSION as PG_VERSION
            from closedloop.store.postgres import PostgresBackend
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


# ---- event schema v3: the new fields, and stores made before them ------------------------------

V3 = [
    # every v3 field set, unicode and markup in the texts, a float cost, a big cached count
    event(1)._replace(
        step_id="0123456789abcdef0123456789abcdef", parent_step_id="f" * 32, run_id="run-東京-1",
        model="gpt-4o-2024-08-06", provider="openai", agent_version="agent 2.1 [bold]x[/]",
        prompt_version="p-7", labels={"tier": "gold", "exp.arm": "b", "région": "eu"},
        cached_input_tokens=2**40, cost_usd=0.000123456789,
        proposal='{"a":[1,2.5,null],"b":"ü 💥 \\n"}', proposal_digest="ab" * 32),
    # only some, an empty labels dict, zero cost, an empty proposal string
    event(2)._replace(step_id="1" * 32, labels={}, cached_input_tokens=0, cost_usd=0.0,
                      proposal='""', proposal_digest="cd" * 32),
    # none of them (an event built as before v3)
    event(3),
]


def test_v3_fields_read_back_as_written(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        for e in V3:
            store.record(e)
        assert store.flush()
        back = list(store.events())
    assert back == V3
    for got, want in zip(back, V3, strict=True):
        assert [type(v) for v in got] == [type(v) for v in want]


def test_v3_texts_are_redacted_when_stored_ids_and_digests_are_not(any_url: str) -> None:
    secret = event(1)._replace(
        step_id="2" * 32, run_id="ops@example.com", model="m", provider="p",
        agent_version="v1", labels={"owner": "ops@example.com"},
        proposal='{"db":{"password":"hunter2"},"note":"mail ops@example.com"}',
        proposal_digest="ef" * 32)
    with cl.open_store(any_url) as store:
        store.record(secret)
        assert store.flush()
        (back,) = store.events()
    assert back.labels == {"owner": "[REDACTED:email]"}
    assert back.run_id == "[REDACTED:email]"
    assert back.proposal == ('{"db":{"password":"[REDACTED:secret]"},'
                             '"note":"mail [REDACTED:email]"}')
    assert (back.step_id, back.proposal_digest, back.model) == ("2" * 32, "ef" * 32, "m")


def test_a_batch_of_proposals_is_redacted_as_each_alone(any_url: str) -> None:
    # the writer redacts a batch's proposals in one scan (Redactor.many): what it stores is
    # what redacting each event alone gives, secrets at a proposal's start or end included
    from closedloop._events import PROPOSAL_MAX_CHARS, proposal_text
    from closedloop._redact import redact_event

    events = []
    for i in range(60):
        proposal = proposal_text({"action": "scale", "replicas": i, "service": f"web-{i}"})
        if i % 7 == 0:
            proposal = f"ops{i}@example.com"
        elif i % 11 == 0:
            proposal = proposal_text({"note": "x" * PROPOSAL_MAX_CHARS, "key": "password=a"})
        e = event(i)._replace(proposal=None if i % 13 == 0 else proposal,
                              proposal_digest="ab" * 32)
        if i % 5 == 0:
            e = e._replace(error_message=f"login as ops{i}@example.com failed",
                           labels={"owner": "ops@example.com"})
        events.append(e)
    with cl.open_store(any_url) as store:
        for e in events:
            store.record(e)
        assert store.flush()
        back = sorted(store.events(), key=lambda e: e.ts)
    want = [redact_event(e) for e in events]
    assert back == want
    assert back[7].proposal == "[REDACTED:email]"
    assert all("example.com" not in (e.proposal or "") for e in back)


def test_a_long_proposal_is_stored_cut_at_its_cap_and_marked(any_url: str) -> None:
    import hashlib

    from closedloop._events import PROPOSAL_CUT, PROPOSAL_MAX_CHARS, proposal_fields, proposal_text

    whole = proposal_text({"plan": "x" * (3 * PROPOSAL_MAX_CHARS)})
    text, digest = proposal_fields({"plan": "x" * (3 * PROPOSAL_MAX_CHARS)})
    assert text is not None
    assert len(text) < 2 * PROPOSAL_MAX_CHARS < len(whole)  # what a queued event holds: bounded
    assert digest == hashlib.sha256(whole.encode()).hexdigest()
    with cl.open_store(any_url) as store:
        store.record(event(1)._replace(proposal=text, proposal_digest=digest))
        assert store.flush()
        (back,) = store.events()
    assert back.proposal == text[:PROPOSAL_MAX_CHARS] + PROPOSAL_CUT
    assert back.proposal_digest == digest  # of the whole proposal


FIXTURE_V2 = Path(__file__).resolve().parents[1] / "data" / "store_v2.db"
V2_TABLES = ("events", "spans", "scores", "control_stops", "control_history")


def _rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return {t: conn.execute(f"SELECT * FROM {t} ORDER BY rowid").fetchall()
                for t in V2_TABLES}
    finally:
        conn.close()


def _user_version(path: Path) -> int:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _v2_copy(tmp_path: Path) -> Path:
    import shutil

    path = tmp_path / "v2.db"
    shutil.copyfile(FIXTURE_V2, path)
    assert _user_version(path) == 2
    return path


def _as_v2_event(row: tuple[Any, ...]) -> cl.StepEvent:
    """An events row of a v2 file as the event it was: booleans and detail decoded."""
    import json

    values = list(row)
    for i in (10, 11):
        values[i] = None if values[i] is None else bool(values[i])
    values[18] = None if values[18] is None else json.loads(str(values[18]))
    return cl.StepEvent(*values)


def test_a_v2_sqlite_store_is_migrated_in_place_keeping_every_row_and_the_halt(
        tmp_path: Path) -> None:
    from closedloop.control import StopKind, ledger_for_store
    from closedloop.store import SCHEMA_VERSION

    path = _v2_copy(tmp_path)
    before = _rows(path)
    assert len(before["events"]) == 6 and len(before["spans"]) == 38
    assert len(before["scores"]) == 2 and len(before["control_stops"]) == 1
    with cl.open_store(f"sqlite:///{path}") as store:
        assert _user_version(path) == SCHEMA_VERSION
        old = list(store.events())
        # every v2 column as it was; every v3 field None
        assert old == [_as_v2_event(r) for r in before["events"]]
        assert all(e[len(r):] == (None,) * (len(e) - len(r))
                   for e, r in zip(old, before["events"], strict=True))
        halt = ledger_for_store(store, redis_url=None).get("deploy")
        assert halt is not None and halt.kind is StopKind.HALTED
        assert halt.reason == "verification failed 3 times in 5 min"
        # the halt still stops the task type's steps
        loop = cl.Loop(lambda t, a: t, task_type="deploy", store=store)
        assert loop.run("x").outcome is cl.Outcome.HALTED
        store.record(V3[0])
        assert store.flush()
        assert V3[0] in list(store.events())
    after = _rows(path)
    for table in V2_TABLES[1:]:  # spans, scores, control state: untouched
        assert after[table] == before[table], table
    assert [r[:19] for r in after["events"][:6]] == before["events"]


def test_a_v2_sqlite_store_opened_to_read_is_read_without_migrating(tmp_path: Path) -> None:
    path = _v2_copy(tmp_path)
    before = _rows(path)
    with cl.open_store(f"sqlite:///{path}", read_only=True) as store:
        assert list(store.events()) == [_as_v2_event(r) for r in before["events"]]
    assert _user_version(path) == 2


def _make_v2_pg(schema: str) -> list[cl.StepEvent]:
    """A PostgreSQL schema as closedloop made it at schema version 2 (its migrations 1 and 2),
    with three events and a halt; returns the events."""
    import psycopg

    from closedloop.store.postgres._backend import (
        MIGRATIONS,
        _partition_day,
        _statements,
        ensure_partitions,
    )

    from .conftest import PG_URL  # here: other tests import this module from a subprocess

    v2 = [event(i)._replace(detail={"i": i} if i % 2 else None) for i in range(3)]
    with psycopg.connect(PG_URL, autocommit=True) as conn, conn.transaction():
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".schema_version (version INTEGER PRIMARY KEY, '
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for version, migration in enumerate(MIGRATIONS[:2], start=1):
            for statement in _statements(migration, schema):
                conn.execute(statement)
            conn.execute(f'INSERT INTO "{schema}".schema_version (version) VALUES (%s)',
                         (version,))
        ensure_partitions(conn, schema, {d for e in v2 if (d := _partition_day(e.ts)) is not None})
        columns = ", ".join(cl.StepEvent._fields[:19])
        with conn.cursor() as cur:
            cur.executemany(
                f'INSERT INTO "{schema}".events ({columns}) VALUES '
                f"({', '.join(['%s'] * 19)})",
                [(*e[:18], psycopg.types.json.Jsonb(e.detail) if e.detail else None)
                 for e in v2])
        conn.execute(f'INSERT INTO "{schema}".control_stops VALUES '
                     "('deploy', 'halted', 'by hand', 'ops', 1790000000.0, NULL, '{}')")
    return v2


def test_a_v2_postgres_schema_is_migrated_in_place_keeping_every_row_and_the_halt(
        pg_url: str, pg_schema: str) -> None:
    from closedloop.control import StopKind, ledger_for_store
    from closedloop.store.postgres import SCHEMA_VERSION, PostgresBackend

    v2 = _make_v2_pg(pg_schema)
    with cl.open_store(pg_url) as store:
        assert isinstance(store.backend, PostgresBackend)
        assert store.backend.found_version == 2
        assert store.backend.schema_version() == SCHEMA_VERSION
        assert list(store.events()) == v2
        halt = ledger_for_store(store, redis_url=None).get("deploy")
        assert halt is not None and halt.kind is StopKind.HALTED
        store.record(V3[0])
        assert store.flush()
        now = list(store.events())
        assert V3[0] in now and [e for e in now if e != V3[0]] == v2


def test_a_store_newer_than_this_closedloop_is_refused_in_one_line(shared_url: str) -> None:
    from closedloop.store.postgres import SCHEMA_VERSION as PG_VERSION
    from closedloop.store.postgres import PostgresBackend
    from closedloop.store.sqlite import SCHEMA_VERSION as SQLITE_VERSION

    backend = open_backend(shared_url)
    if isinstance(backend, PostgresBackend):
        with backend.pool().connection() as conn:
            conn.execute(f'INSERT INTO "{backend.schema}".schema_version (version) VALUES (%s)',
                         (PG_VERSION + 1,))
    else:
        from closedloop.store.sqlite._backend import _connect

        db = _connect(Path(shared_url[len("sqlite:///"):]))
        db.execute(f"PRAGMA user_version = {SQLITE_VERSION + 1}")
        db.close()
    backend.close()
    for read_only in (False, True):
        with pytest.raises(cl.StoreError) as caught:
            cl.open_store(shared_url, read_only=read_only)
        message = str(caught.value)
        assert "\n" not in message and message.endswith("upgrade closedloop"), message


@pytest.fixture(params=["sqlite", "postgresql"])
def v2_store(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, list[cl.StepEvent]]:
    """A store of schema version 2 of each shared kind (the SQLite fixture file, a schema made
    by the v2 migrations), not opened by this version yet, and the events it holds."""
    if request.param == "sqlite":
        path = _v2_copy(tmp_path)
        return f"sqlite:///{path}", [_as_v2_event(r) for r in _rows(path)["events"]]
    events = _make_v2_pg(request.getfixturevalue("pg_schema"))
    return str(request.getfixturevalue("pg_url")), events


def test_processes_opening_a_v2_store_at_once_migrate_it_once(
        v2_store: tuple[str, list[cl.StepEvent]]) -> None:
    # a migration applied twice fails ("duplicate column"), and PostgreSQL's version table
    # refuses a version recorded twice: every process must find the work done or do it alone
    v2_url, before = v2_store
    start = time.time() + 1.0
    _run_processes(MIGRATOR, [[v2_url, str(start)] for _ in range(5)])
    backend = open_backend(v2_url)
    try:
        assert list(backend.iter_events(EventQuery())) == before
        if v2_url.startswith("sqlite"):
            from closedloop.store import SCHEMA_VERSION
            assert _user_version(Path(v2_url[len("sqlite:///"):])) == SCHEMA_VERSION
        else:
            from closedloop.store.postgres import SCHEMA_VERSION as PG_VERSION
            from closedloop.store.postgres import PostgresBackend
            assert isinstance(backend, PostgresBackend)
            with backend.pool().connection() as conn:
                rows = conn.execute(f'SELECT version FROM "{backend.schema}".schema_version '
                                    "ORDER BY version").fetchall()
            assert [r[0] for r in rows] == list(range(1, PG_VERSION + 1))
    finally:
        backend.close()


def test_a_dead_letter_file_from_before_v3_imports_with_the_new_fields_empty(
        any_url: str, tmp_path: Path) -> None:
    import json

    from closedloop.store._deadletter import import_dead_letter

    old = {f: v for f, v in event(1)._asdict().items() if f in cl.StepEvent._fields[:19]}
    new = V3[0]._asdict()
    path = tmp_path / "dead.jsonl"
    path.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n", encoding="utf-8")
    with cl.open_store(any_url) as store:
        result = import_dead_letter(path, store)
        assert (result.imported, result.malformed) == (2, 0)
        assert list(store.events()) == [event(1), V3[0]]


@pytest.mark.parametrize("shape", ["v3 fields set", "v3 fields empty", "mixed"])
def test_a_batch_of_several_insert_statements_is_written_whole(any_url: str, shape: str) -> None:
    # SQLite leaves the columns that are empty in the whole batch out of its INSERT, and fits
    # as many rows in a statement as the parameter limit allows: whatever the batch's shape
    events = [(V3[0] if shape == "v3 fields set" or (shape == "mixed" and i % 3 == 0)
               else event(0))._replace(ts=1_790_000_000.0 + i, trace_id=f"{i:032x}")
              for i in range(5000)]
    with cl.open_store(any_url, batch_size=len(events)) as store:
        for e in events:
            store.record(e)
        assert store.flush()
        assert list(store.events()) == events


def test_a_postgres_store_read_once_needs_no_pool_and_one_connection(pg_url: str) -> None:
    # `closedloop report` and `traces list` open the store read-only and ask it once: no
    # pool (thread, psycopg_pool import), and the connection that checks the schema version
    # serves the queries
    with cl.open_store(pg_url) as store:
        store.record(event(1))
        assert store.flush()
    code = textwrap.dedent(f"""
        import sys
        import closedloop as cl
        from closedloop.telemetry import span_store_for
        with cl.open_store({pg_url!r}, read_only=True) as store:
            assert [e.trace_id for e in store.events()] == [{event(1).trace_id!r}]
            assert store.count() == 1
            span_store_for(store).traces(limit=5)
            backend = store.backend
            with backend.pool().connection() as conn:
                one = conn.info.backend_pid
            with backend.pool().connection() as conn:
                assert conn.info.backend_pid == one
        assert "psycopg_pool" not in sys.modules, "a read-only store imported psycopg_pool"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": SRC},
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
