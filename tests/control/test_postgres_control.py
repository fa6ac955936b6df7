"""Pauses and halts on a PostgreSQL store: one durable record for every process and command,
and a guard that refuses when PostgreSQL cannot be reached (issue 8 §1)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner

import closedloop as cl
from _doubles import Executor
from closedloop.cli import main
from closedloop.control import FaultControl, Stop, StopKind, ledger_for_store
from closedloop.store.postgres import PostgresLedger
from store.conftest import PG_URL, pg_schema, pg_url  # noqa: F401 - the PostgreSQL fixtures

SRC = str(Path(__file__).resolve().parents[2] / "src")

# An agent process: its verifier rejects every result, so its FaultControl halts
# "provision" after the first step; the process then exits.
AGENT = textwrap.dedent("""
    import os
    import sys
    import closedloop as cl
    from closedloop.control import FaultControl, Stop, StopKind, ledger_for_store

    store = cl.open_store(sys.argv[1])
    guard = FaultControl(ledger=ledger_for_store(store, redis_url=None), halt_after=1)
    loop = cl.Loop(lambda task, attempt: task, task_type="provision", max_attempts=1,
                   executor=lambda proposal: proposal,
                   verifiers=[lambda task, result: False], guards=[guard], store=store)
    print(loop.run(1).outcome.value, os.getpid())
    store.close()
""")


def _loop(guard: FaultControl, executor: Executor, *, fail_open: bool = False) -> cl.Loop:
    return cl.Loop(lambda task, attempt: task, task_type="provision", max_attempts=1,
                   executor=executor, verifiers=[lambda task, result: True], guards=[guard],
                   store=cl.open_store("memory://"), fail_open=fail_open)


def _guard(store_url: str) -> FaultControl:
    store = cl.open_store(store_url, defer=True)
    try:
        return FaultControl(ledger=ledger_for_store(store, redis_url=None), recheck=0.0)
    finally:
        store.close()


def test_a_halt_raised_by_an_agent_process_stops_other_processes_until_resumed(
    pg_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    agent = subprocess.run([sys.executable, "-c", AGENT, pg_url], capture_output=True,
                           text=True, timeout=120, check=False,
                           env={**os.environ, "PYTHONPATH": SRC})
    assert agent.returncode == 0, agent.stderr
    outcome, agent_pid = agent.stdout.split()
    assert outcome == "failed"

    # the agent is gone (a restart): this process opens the store anew and is refused
    executor = Executor()
    guard = _guard(pg_url)
    assert _loop(guard, executor).run(1).outcome is cl.Outcome.HALTED
    assert executor.calls == 0

    runner = CliRunner()
    status = runner.invoke(main, ["status", "--store", pg_url, "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    (stop,) = data["stops"]
    assert (stop["task_type"], stop["kind"]) == ("provision", "halted")
    assert stop["by"].endswith(f"(pid {agent_pid})")  # the agent process, not this one
    table = runner.invoke(main, ["status", "--store", pg_url])
    assert "HALTED" in table.output

    resumed = runner.invoke(main, ["resume", "provision", "--reason", "AMI fixed",
                                   "--by", "alice", "--store", pg_url])
    assert resumed.exit_code == 0, resumed.output
    assert _loop(guard, executor).run(2).outcome is cl.Outcome.SUCCEEDED
    assert executor.calls == 1
    after = json.loads(runner.invoke(main, ["status", "--store", pg_url, "--json"]).output)
    assert after["stops"] == []
    assert (after["history"][0]["event"], after["history"][0]["by"]) == ("resumed", "alice")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def unreachable_url() -> str:
    """A PostgreSQL store URL (with a password) on a port nothing listens on."""
    return f"postgresql://postgres:hunter2@127.0.0.1:{_closed_port()}/test?schema=closedloop_x"


def test_postgresql_unreachable_refuses_the_step(unreachable_url: str) -> None:
    executor = Executor()
    result = _loop(_guard(unreachable_url), executor).run(1)
    assert executor.calls == 0
    assert result.outcome is cl.Outcome.CONTROL_UNAVAILABLE
    assert result.error_type is cl.ErrorType.CONTROL_UNAVAILABLE
    assert "hunter2" not in (result.error_message or "")


def test_postgresql_unreachable_admits_only_with_fail_open(unreachable_url: str) -> None:
    executor = Executor()
    result = _loop(_guard(unreachable_url), executor, fail_open=True).run(1)
    assert executor.calls == 1
    assert result.outcome is cl.Outcome.SUCCEEDED


def test_an_unreachable_ledger_says_where_in_one_line_without_the_password(
    unreachable_url: str,
) -> None:
    ledger = PostgresLedger.from_url(unreachable_url, connect_timeout=2.0)
    with pytest.raises(cl.ControlUnavailable) as caught:
        ledger.get("provision")
    message = str(caught.value)
    assert message.startswith("cannot read control state in postgresql://postgres:***@")
    assert "\n" not in message
    assert "hunter2" not in message
    with pytest.raises(cl.ControlUnavailable):
        ledger.lift("provision", reason="x", by="alice")


def test_a_store_whose_control_tables_vanished_fails_closed(
    pg_url: str, pg_schema: str,  # noqa: F811 - the fixtures imported above
) -> None:
    executor = Executor()
    guard = _guard(pg_url)
    assert isinstance(guard.ledger, PostgresLedger)
    guard.ledger.put(Stop(task_type="provision", kind=StopKind.HALTED, reason="bad", by="test",
                          at=0.0))
    assert _loop(guard, executor).run(1).outcome is cl.Outcome.HALTED
    # the store says it has control tables, but they are gone: no read says "no stops"
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'ALTER TABLE "{pg_schema}".control_stops RENAME TO moved')
    with pytest.raises(cl.ControlUnavailable):
        guard.ledger.get("provision")
    assert _loop(guard, executor).run(2).outcome is cl.Outcome.HALTED
    assert executor.calls == 0


def _backend_pids(application: str) -> set[int]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        rows = conn.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                            (application,)).fetchall()
    return {pid for (pid,) in rows}


def test_the_ledger_keeps_one_connection_and_reconnects_once_it_is_killed(
    pg_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    app = f"cl-ledger-{os.getpid()}"
    url = f"{pg_url}&application_name={app}"  # pg_url has ?schema=
    ledger = PostgresLedger.from_url(url)
    ledger.put(Stop(task_type="deploy", kind=StopKind.HALTED, reason="bad deploys", by="test",
                    at=time.time()))
    assert ledger.get("deploy") is not None
    first = _backend_pids(app)
    for _ in range(5):
        assert ledger.get("deploy") is not None
    assert _backend_pids(app) == first and len(first) == 1  # reads reuse one connection

    with psycopg.connect(PG_URL, autocommit=True) as conn:  # the server ends that session
        conn.execute("SELECT pg_terminate_backend(%s)", (next(iter(first)),))
    stop = ledger.get("deploy")  # the dead connection is replaced, not reported as an outage
    assert stop is not None and stop.kind is StopKind.HALTED
    assert _backend_pids(app) not in (set(), first)

    ledger.close()
    assert _backend_pids(app) == set()


def test_a_store_closes_its_control_ledger_connection(
    pg_url: str,  # noqa: F811 - the fixture imported above
) -> None:
    app = f"cl-store-ledger-{os.getpid()}"
    url = f"{pg_url}&application_name={app}"  # pg_url has ?schema=
    store = cl.open_store(url)
    ledger = ledger_for_store(store, redis_url=None)
    assert ledger.get("anything") is None
    assert ledger_for_store(store, redis_url=None).get("other") is None
    assert len(_backend_pids(app)) >= 1
    store.close()
    assert _backend_pids(app) == set()
