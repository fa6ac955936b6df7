"""Agents in several processes share one PostgreSQL store and one Redis.

Four worker processes (spawned, as on separate machines nothing is inherited) run closedloop
loops of one task type against one PostgreSQL schema and one Redis key prefix of this test's
own. One of them starts failing verification until its fault control halts the task type.
Checked: every step's event arrives exactly once (each worker reports the trace ids of its
steps), and once the halt is stored no worker executes another step of that task type
(asserted on executor calls: every step a worker starts after it learnt that the halt was
stored is refused), until ``closedloop resume`` lifts it, after which every worker executes
again. The guards re-read the shared ledger at every admission (``recheck=0``), so the
assertions follow from the order of events, not from timing; with the default ``recheck``
a process may start steps for up to that long (1 s) after a halt elsewhere.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import pytest
from click.testing import CliRunner

import _services
import closedloop as cl
from closedloop.cli import main

PG_URL = os.environ.get("CLOSEDLOOP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CLOSEDLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WORKERS = 4
WARM_UP = 5  # steps every worker executes before the halt is raised
AFTER = 10  # steps every worker tries once it knows the halt is stored: all refused
RESUMED = 5  # steps every worker runs after `closedloop resume`: all executed
CAP = 5_000  # a worker that never sees the halt stops here (and the test fails)
TASK = "provision"
WAIT_S = 120.0


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A PostgreSQL store URL in a schema of this test's own, dropped afterwards."""
    psycopg = _services.module("psycopg")
    _services.module("psycopg_pool")
    try:
        admin = psycopg.connect(PG_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        _services.unavailable(f"PostgreSQL at {PG_URL} is unreachable: {exc}")
    schema = f"closedloop_test_{uuid.uuid4().hex[:12]}"
    yield f"{PG_URL}?schema={schema}"
    admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    admin.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    redis = _services.module("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError as exc:
        _services.unavailable(f"Redis unreachable at {REDIS_URL}: {exc}")
    name = f"cltest-{uuid.uuid4().hex[:10]}"
    yield name
    keys = list(client.scan_iter(match=f"{name}:*"))
    if keys:
        client.delete(*keys)


@dataclass(frozen=True)
class Signals:
    """What the processes tell one another, none of it timed."""

    warmed: Barrier  # every worker has executed its warm-up steps
    halt_stored: Event  # the halt is in PostgreSQL (set by the worker that raised it)
    paused: Barrier  # every worker has tried its steps after the halt (and the test joins)
    resumed: Event  # `closedloop resume` has lifted it
    results: multiprocessing.Queue[dict[str, Any]]


def worker(index: int, store_url: str, prefix: str, signals: Signals) -> None:
    """Run steps until AFTER steps past the stored halt, then RESUMED more after the lift;
    worker 0 fails verification after its warm-up, until its fault control halts the task."""
    halter = index == 0
    from closedloop.control import FaultControl, ledger_for_store

    store = cl.open_store(store_url)
    guard = FaultControl(ledger=ledger_for_store(store, redis_url=REDIS_URL, prefix=prefix),
                         recheck=0.0, halt_after=3, sinks=[])
    cl.configure(store=store, redis_url=None, fault_control=guard)
    executed: list[str] = []
    failing = [False]

    def apply(plan: str) -> str:
        executed.append(plan)
        return plan

    loop = cl.Loop(lambda task, attempt: task, task_type=TASK, executor=apply,
                   verifiers=[lambda task, result: "wrong size" if failing[0] else None],
                   max_attempts=1, agent_id=f"worker-{index}", backpressure=None)
    steps: list[dict[str, Any]] = []

    def step(phase: str) -> None:
        name = f"{index}-{len(steps)}"
        before = len(executed)
        result = loop.run(name)
        steps.append({"phase": phase, "trace_id": result.trace_id,
                      "outcome": str(result.outcome), "executed": len(executed) > before})

    for _ in range(WARM_UP):
        step("warm-up")
    signals.warmed.wait(WAIT_S)
    failing[0] = halter
    durable = ledger_for_store(store, redis_url=None)  # PostgreSQL itself, not Redis
    while len(steps) < CAP and not signals.halt_stored.is_set():
        step("running")
        if halter and durable.get(TASK) is not None:
            signals.halt_stored.set()
    saw_halt = signals.halt_stored.is_set()
    for _ in range(AFTER):  # each begins after this process learnt the halt was stored
        step("halted" if saw_halt else "never saw the halt")
    signals.paused.wait(WAIT_S)  # the test runs `closedloop resume` now
    signals.resumed.wait(WAIT_S)
    failing[0] = False
    for _ in range(RESUMED):
        step("resumed")
    store.close()  # every event written before the results are reported
    signals.results.put({"index": index, "steps": steps})


def test_workers_share_one_store_and_one_halt(pg_url: str, prefix: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    signals = Signals(warmed=ctx.Barrier(WORKERS), halt_stored=ctx.Event(),
                      paused=ctx.Barrier(WORKERS + 1), resumed=ctx.Event(), results=ctx.Queue())
    cl.open_store(pg_url).close()  # the schema exists before the workers race for it
    procs = [ctx.Process(target=worker, args=(i, pg_url, prefix, signals))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    try:
        signals.paused.wait(WAIT_S)
        status = CliRunner().invoke(main, ["status", "--store", pg_url, "--redis", REDIS_URL,
                                           "--prefix", prefix, "--json"])
        assert status.exit_code == 0, status.output
        assert [(s["task_type"], s["kind"]) for s in json.loads(status.stdout)["stops"]] == [
            (TASK, "halted")]
        lift = CliRunner().invoke(main, ["resume", TASK, "--reason", "fixed the AMI mapping",
                                         "--store", pg_url, "--redis", REDIS_URL,
                                         "--prefix", prefix])
        assert lift.exit_code == 0, lift.output
        signals.resumed.set()
        reports = sorted((signals.results.get(timeout=WAIT_S) for _ in procs),
                         key=lambda r: r["index"])
    finally:
        for p in procs:
            p.join(WAIT_S)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0] * WORKERS

    def executed(phase: str) -> list[list[bool]]:
        return [[s["executed"] for s in r["steps"] if s["phase"] == phase] for r in reports]

    assert executed("warm-up") == [[True] * WARM_UP] * WORKERS
    assert executed("halted") == [[False] * AFTER] * WORKERS  # each saw the halt, then ran none
    assert {s["outcome"] for r in reports for s in r["steps"] if s["phase"] == "halted"} == {
        "halted"}
    assert executed("resumed") == [[True] * RESUMED] * WORKERS

    known = [s["trace_id"] for r in reports for s in r["steps"]]
    with cl.open_store(pg_url, read_only=True) as store:
        stored = [e.trace_id for e in store.events()]
        assert store.count() == len(known)
    assert len(set(known)) == len(known)
    assert sorted(stored) == sorted(known)  # each step's event exactly once
