"""Halting a run from another process: ``closedloop runs halt`` records the halt (who, when,
why) in the store; the run's own process, polling it, refuses every later step and the run
ends ``halted``. When the halts cannot be read for longer than ``halt_stale`` the run
refuses its steps (``control_unavailable``) until they can (fail closed).

The agent runs in a separate process (spawned: nothing inherited) on SQLite and PostgreSQL;
the halt comes from ``python -m closedloop`` in a third. Nothing here is timed: each wait is
a loop on a condition with a generous deadline.
"""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import closedloop as cl
from closedloop.cli import main
from closedloop.runs import RunHalt, halt_run

WAIT_S = 60.0
AFTER = 3  # steps the agent tries after the first refused one: all refused too


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def agent(store_url: str, run_id: str, started: Event, halted: Event,
          results: multiprocessing.Queue[dict[str, Any]]) -> None:
    """Run steps in one run until one is refused after the halt was recorded elsewhere."""
    store = cl.open_store(store_url)
    executed: list[int] = []
    lp = cl.Loop(lambda task, attempt: task, task_type="triage", store=store, guards=(),
                 executor=executed.append, backpressure=None)
    outcomes: list[str] = []
    with cl.Run("ticket", run_id=run_id, store=store, halt_poll=0.05) as run:
        outcomes.append(str(lp.run(0).outcome))
        store.flush()  # the run's record is in the store: `runs halt` finds it
        started.set()
        halted.wait(WAIT_S)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and outcomes[-1] != "halted":
            outcomes.append(str(lp.run(len(outcomes)).outcome))
            time.sleep(0.005)
        outcomes += [str(lp.run(len(outcomes)).outcome) for _ in range(AFTER)]
    store.close()
    results.put({"outcomes": outcomes, "executed": len(executed), "run": run.outcome,
                 "message": run.message, "refused": run.refused})


def test_a_run_is_halted_from_the_shell_and_ends_halted(shared_url: str) -> None:
    cl.open_store(shared_url).close()  # the schema exists before the agent opens it
    ctx = multiprocessing.get_context("spawn")
    started, halted, results = ctx.Event(), ctx.Event(), ctx.Queue()
    run_id = f"ticket-{uuid.uuid4().hex[:8]}"
    proc = ctx.Process(target=agent, args=(shared_url, run_id, started, halted, results))
    proc.start()
    try:
        assert started.wait(WAIT_S)
        shell = subprocess.run(
            [sys.executable, "-m", "closedloop", "runs", "halt", run_id, "--store", shared_url,
             "--reason", "wrong customer; token=sk-abcdefabcdefabcdefabcdef", "--by", "oncall"],
            capture_output=True, text=True, timeout=WAIT_S, check=False)
        assert shell.returncode == 0, shell.stderr
        assert f"halted run {run_id} (by oncall" in shell.stdout
        halted.set()
        report = results.get(timeout=WAIT_S)
    finally:
        proc.join(WAIT_S)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    outcomes = report["outcomes"]
    first = outcomes.index("halted")  # seen at a step after the halt was recorded
    assert outcomes[:first] == ["succeeded"] * first
    assert outcomes[first:] == ["halted"] * (AFTER + 1)  # and every later step refused
    assert report["executed"] == first  # no refused step acted
    assert report["run"] == "halted" and report["refused"] == AFTER + 1
    assert "halted by oncall: wrong customer" in report["message"]
    assert "sk-abcdef" not in report["message"]  # redacted before it was stored

    shown = CliRunner().invoke(main, ["runs", "show", run_id, "--store", shared_url, "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["run"]["outcome"] == "halted" and data["run"]["error_type"] == "run_halted"
    assert data["halt"]["by"] == "oncall"
    assert data["halt"]["reason"] == "wrong customer; token=[REDACTED:openai_key]"
    assert [e["error_type"] for e in data["steps"]][first:] == ["run_halted"] * (AFTER + 1)
    text = CliRunner().invoke(main, ["runs", "show", run_id, "--store", shared_url]).stdout
    assert "halt recorded " in text and " by oncall: wrong customer" in text


def test_halting_a_run_twice_keeps_the_first_halt(any_url: str) -> None:
    store = cl.open_store(any_url)
    try:
        with cl.Run("t", store=store) as run:
            store.flush()
            first = halt_run(run.run_id, reason="first", by="a", store=store)
            again = halt_run(run.run_id, reason="second", by="b", store=store)
            assert again == first and (first.by, first.reason) == ("a", "first")
            assert store.runs().run_halts([run.run_id, "other"]) == {  # type: ignore[attr-defined]
                run.run_id: first}
    finally:
        store.close()


def test_a_run_halted_in_the_store_refuses_its_next_step_in_this_process(
        any_url: str) -> None:
    store = cl.open_store(any_url)
    try:
        lp = cl.Loop(lambda task, attempt: task, task_type="t", store=store, guards=())
        with cl.Run("t", store=store, halt_poll=0.02) as run:
            assert lp.run(1).outcome == "succeeded"
            store.flush()
            halt_run(run.run_id, reason="stop", by="me", store=store)
            wait_for(lambda: run.stopped is not None, "the halt was seen")
            result = lp.run(2)
            assert result.outcome == "halted"
        assert run.outcome == cl.Outcome.HALTED
        assert run.message == f"run {run.run_id} halted by me: stop"
    finally:
        store.close()


def test_runs_halt_refuses_an_unknown_or_ended_run_and_needs_a_reason(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = cl.open_store(url)
    with cl.Run("done", store=store) as ended:
        pass
    store.close()
    unknown = CliRunner().invoke(main, ["runs", "halt", "nope", "--reason", "x", "--store", url])
    assert unknown.exit_code == 1 and "no run nope" in unknown.stderr
    over = CliRunner().invoke(main, ["runs", "halt", ended.run_id, "--reason", "x",
                                     "--store", url])
    assert over.exit_code == 1 and "has ended (succeeded)" in over.stderr
    blank = CliRunner().invoke(main, ["runs", "halt", ended.run_id, "--reason", " ",
                                      "--store", url])
    assert blank.exit_code == 2 and "a reason is required" in blank.stderr
    with cl.open_store(url, read_only=True) as read:
        assert read.runs().run_halts([ended.run_id]) == {}  # type: ignore[attr-defined]


def _break_halts(url: str, tmp_path: Path) -> tuple[Callable[[], None], Callable[[], None]]:
    """Drop and restore the store's ``run_halts`` table from outside the agent's store."""
    if url.startswith("sqlite"):
        path = tmp_path / "events.db"

        def sqlite_sql(statement: str) -> None:
            with sqlite3.connect(path) as conn:
                conn.execute(statement)
        return (lambda: sqlite_sql("DROP TABLE run_halts"),
                lambda: sqlite_sql("CREATE TABLE run_halts (run_id TEXT PRIMARY KEY, at REAL "
                                   "NOT NULL, by TEXT NOT NULL, reason TEXT NOT NULL)"))
    import psycopg

    base, schema = url.split("?schema=")

    def pg_sql(statement: str) -> None:
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(statement.replace("S.", f'"{schema}".'))
    return (lambda: pg_sql("DROP TABLE S.run_halts"),
            lambda: pg_sql("CREATE TABLE S.run_halts (run_id TEXT PRIMARY KEY, at DOUBLE "
                           "PRECISION NOT NULL, by TEXT NOT NULL, reason TEXT NOT NULL)"))


def test_a_run_whose_halts_cannot_be_read_refuses_its_steps_until_they_can(
        shared_url: str, tmp_path: Path) -> None:
    store = cl.open_store(shared_url)
    drop, restore = _break_halts(shared_url, tmp_path)
    executed: list[int] = []
    lp = cl.Loop(lambda task, attempt: task, task_type="t", store=store, guards=(),
                 executor=executed.append)
    try:
        with cl.Run("t", store=store, halt_poll=0.02, halt_stale=0.2) as run:
            assert lp.run(0).outcome == "succeeded"
            drop()
            outcomes: list[str] = []

            def refused() -> bool:
                outcomes.append(str(lp.run(len(outcomes)).outcome))
                return outcomes[-1] == "control_unavailable"
            wait_for(refused, "a step refused while the halts are unreadable")
            assert len(executed) == len(outcomes)  # the refused step did not act
            restore()
            wait_for(lambda: str(lp.run(99).outcome) == "succeeded", "steps admitted again")
            assert run.stopped is None  # unreadable halts refuse steps; they do not end the run
            store.flush()
            halt_run(run.run_id, reason="now really", by="me", store=store)
            wait_for(lambda: run.stopped is not None, "the halt was seen")
        assert run.outcome == cl.Outcome.HALTED
        store.flush()
        steps = list(store.events())
        refusal = next(e for e in steps if e.outcome == "control_unavailable")
        assert refusal.run_id == run.run_id
        assert "cannot tell whether it was halted" in (refusal.error_message or "")
    finally:
        store.close()


def test_halt_poll_none_reads_no_halts_and_halt_stale_must_exceed_the_poll(
        memory_store: cl.Store) -> None:
    with cl.Run("t", store=memory_store, halt_poll=None) as run:
        memory_store.flush()
        halt: RunHalt = halt_run(run.run_id, reason="ignored", store=memory_store)
        assert halt.reason == "ignored"
        time.sleep(0.1)
        assert run.stopped is None
    assert run.outcome == cl.Outcome.SUCCEEDED
    with pytest.raises(cl.ConfigError, match="halt_stale"):
        cl.Run("t", halt_poll=1.0, halt_stale=0.5)
