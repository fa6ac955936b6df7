"""One runtime holds the process's store, fault control, backpressure and telemetry.

``closedloop.configure`` replaces it whole, ``closedloop.reset`` starts afresh from the
environment, and a loop can be given its own. Everything here runs on real SQLite files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

import closedloop as cl
from _doubles import Executor
from closedloop.control import (
    Backpressure,
    FaultControl,
    MemoryLedger,
    SQLiteLedger,
    Stop,
    StopKind,
    default_backpressure,
    default_fault_control,
)
from closedloop.store import default_store, is_default_store
from closedloop.telemetry import MemoryExporter, Telemetry, default_telemetry


def _loop(executor: Executor, **kwargs: object) -> cl.Loop:
    return cl.Loop(lambda task, attempt: task, task_type="provision", executor=executor,
                   **kwargs)  # type: ignore[arg-type]


def _halt(task_type: str = "provision") -> Stop:
    return Stop(task_type=task_type, kind=StopKind.HALTED, reason="outcomes wrong",
                by="a test", at=time.time())


def _count(path: Path) -> int:
    with cl.open_store(f"sqlite:///{path}", read_only=True) as s:
        return s.count()


# ----- configure ------------------------------------------------------------------------------

def test_configure_replaces_store_control_backpressure_and_telemetry_at_once(
        tmp_path: Path) -> None:
    old = (default_store(), default_fault_control(), default_backpressure())
    old_pipeline = Telemetry([MemoryExporter()])
    cl.current_runtime().set_telemetry(old_pipeline)
    pipeline = Telemetry([MemoryExporter()])

    rt = cl.configure(store=f"sqlite:///{tmp_path / 'new.db'}", telemetry=pipeline)

    assert cl.current_runtime() is rt
    assert default_store() is rt.store and default_store().url.endswith("new.db")
    assert default_fault_control() is rt.fault_control
    ledger = default_fault_control().ledger
    assert isinstance(ledger, SQLiteLedger) and ledger.path == tmp_path / "new.db"
    assert default_backpressure() is rt.backpressure
    assert default_telemetry() is pipeline
    assert {id(x) for x in old}.isdisjoint({id(default_store()), id(default_fault_control()),
                                           id(default_backpressure())})
    assert old_pipeline.stats().queued == 0 and old_pipeline._queue.closed  # shut down


def test_configure_flushes_and_closes_the_store_it_replaces(tmp_path: Path) -> None:
    old_path = tmp_path / "default.db"  # CLOSEDLOOP_STORE, set by conftest
    loop = _loop(Executor())
    assert loop.run(1).ok  # queued in the old store's writer, not necessarily written yet
    old = default_store()

    cl.configure(store="memory://")

    assert _count(old_path) == 1
    with cl.open_store(f"sqlite:///{old_path}", read_only=True) as reader:
        event = next(iter(reader.events()))
    assert old.record(event) is False  # closed: it takes nothing more


def test_configure_may_keep_the_store_in_use(tmp_path: Path) -> None:
    kept = default_store()
    cl.configure(store=kept, telemetry=Telemetry([MemoryExporter()]))
    assert _loop(Executor()).run(1).ok and default_store() is kept
    cl.reset()  # now the runtime that opened it is closed: the store with it
    assert _count(tmp_path / "default.db") == 1
    with cl.open_store(f"sqlite:///{tmp_path / 'default.db'}", read_only=True) as reader:
        assert kept.record(next(iter(reader.events()))) is False


def test_a_loop_built_before_configure_follows_it_from_its_next_step(tmp_path: Path) -> None:
    executor = Executor()
    loop = _loop(executor)
    SQLiteLedger(tmp_path / "new.db").put(_halt())

    cl.configure(store=f"sqlite:///{tmp_path / 'new.db'}")

    assert loop.run(1).outcome is cl.Outcome.HALTED  # the new store's halt, seen
    assert loop.store is default_store()
    assert default_store().flush()
    assert [e.outcome for e in default_store().events()] == ["halted"]
    assert executor.calls == 0


def test_a_malformed_store_url_fails_in_configure_and_keeps_the_runtime() -> None:
    before = cl.current_runtime()
    with pytest.raises(cl.ConfigError, match="unsupported store URL"):
        cl.configure(store="mysql://nowhere/db")
    assert cl.current_runtime() is before


def test_a_store_handed_to_configure_is_flushed_not_closed_when_replaced(
        tmp_path: Path) -> None:
    mine = cl.open_store(f"sqlite:///{tmp_path / 'mine.db'}", flush_interval=60)
    cl.configure(store=mine)
    assert _loop(Executor()).run(1).ok
    cl.reset()
    assert _count(tmp_path / "mine.db") == 1  # flushed when the runtime was replaced
    assert mine.record(next(iter(mine.events()))) is True  # still open: its owner's to close
    mine.close()
    assert _count(tmp_path / "mine.db") == 2


def test_an_unsaved_halt_stays_in_force_across_configure(tmp_path: Path) -> None:
    class Refuses(SQLiteLedger):
        def put(self, stop: Stop) -> None:
            raise OSError("disk full")

    guard = FaultControl(ledger=Refuses(tmp_path / "full.db"), halt_after=1, retry_every=3600)
    cl.configure(store="memory://", fault_control=guard)
    executor = Executor()
    assert _loop(executor, verifiers=[lambda i, r: "wrong"]).run(1).outcome is cl.Outcome.FAILED
    assert guard.status()["unsaved"]  # halted here, not stored

    cl.configure(store=f"sqlite:///{tmp_path / 'new.db'}")

    assert _loop(executor).run(2).outcome is cl.Outcome.HALTED
    assert executor.calls == 1
    assert [s.kind for s in SQLiteLedger(tmp_path / "new.db").stops()] == [StopKind.HALTED]


def test_an_unsaved_halt_of_a_loop_on_its_own_store_stays_in_force_across_configure(
        store: cl.Store, tmp_path: Path) -> None:
    class Refuses(SQLiteLedger):
        def put(self, stop: Stop) -> None:
            raise OSError("disk full")

    executor = Executor()
    loop = _loop(executor, store=store, verifiers=[lambda i, r: "wrong"])
    guard, _levels = loop._spec.guards  # fault control, then the demotion detector
    assert isinstance(guard, FaultControl)
    guard.ledger, guard.halt_after, guard.retry_every = Refuses(tmp_path / "x.db"), 1, 3600
    assert loop.run(1).outcome is cl.Outcome.FAILED
    assert guard.status()["unsaved"]  # halted here, not stored

    cl.configure(store="memory://")

    assert loop.run(2).outcome is cl.Outcome.HALTED
    assert executor.calls == 1
    assert [s.kind for s in SQLiteLedger(tmp_path / "events.db").stops()] == [StopKind.HALTED]


def test_configure_with_redis_shares_rates_and_caches_control_state_there(
        monkeypatch: pytest.MonkeyPatch) -> None:
    redis = pytest.importorskip("redis")
    from closedloop.control import CachedLedger, RedisRates

    url = os.environ.get("CLOSEDLOOP_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError as exc:
        import _services

        _services.unavailable(f"Redis unreachable at {url}: {exc}")
    rt = cl.configure(store="memory://", redis_url=url)
    assert isinstance(default_backpressure().backend, RedisRates)
    assert isinstance(default_fault_control().ledger, CachedLedger)
    monkeypatch.setenv("CLOSEDLOOP_REDIS_URL", url)
    cl.configure(store="memory://", redis_url=None)  # None: no Redis, whatever the environment
    assert not isinstance(default_backpressure().backend, RedisRates)
    assert isinstance(default_fault_control().ledger, MemoryLedger)
    assert rt.redis_url == url


def test_configure_sets_the_redactor_for_what_is_stored_and_reset_restores_the_builtin(
        tmp_path: Path) -> None:
    mine = cl.Redactor([r"ACCT-\d{6}"])
    cl.configure(store=f"sqlite:///{tmp_path / 'r.db'}", redactor=mine)
    assert cl.default_redactor() is mine and cl.current_runtime().redactor is mine
    failing = _loop(Executor(), verifiers=[lambda i, r: "ACCT-123456 off"])
    assert failing.run(1).outcome is cl.Outcome.FAILED
    assert default_store().flush()
    (event,) = default_store().events()
    assert event.error_message is not None and "ACCT-123456" not in event.error_message

    cl.reset()
    assert cl.default_redactor() is not mine
    assert "ACCT-123456" in cl.default_redactor()("ACCT-123456")  # the built-in rules only
    previous = cl.set_default_redactor(mine)  # the old name sets the runtime's
    assert cl.current_runtime().redactor is mine and previous is not mine


# ----- reset ----------------------------------------------------------------------------------

def test_reset_gives_a_fresh_runtime(tmp_path: Path) -> None:
    first = cl.current_runtime()
    parts = (first.store, first.fault_control, first.backpressure)
    first.set_telemetry(Telemetry([MemoryExporter()]))

    second = cl.reset()

    assert second is cl.current_runtime() and second is not first
    assert second.telemetry is None
    assert default_store() is not parts[0]
    assert default_fault_control() is not parts[1]
    assert default_backpressure() is not parts[2]
    assert default_store().url == parts[0].url  # from the same environment


def test_after_reset_the_fault_control_uses_the_new_stores_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    executor = Executor()
    SQLiteLedger(tmp_path / "default.db").put(_halt("provision"))
    assert _loop(executor).run(1).outcome is cl.Outcome.HALTED  # the old store's halt

    monkeypatch.setenv("CLOSEDLOOP_STORE", f"sqlite:///{tmp_path / 'second.db'}")
    cl.reset()
    SQLiteLedger(tmp_path / "second.db").put(_halt("deploy"))

    assert _loop(executor).run(1).outcome is cl.Outcome.SUCCEEDED  # the old halt does not leak
    deploy = cl.Loop(lambda task, attempt: task, task_type="deploy", executor=executor)
    assert deploy.run(1).outcome is cl.Outcome.HALTED  # the new store's is seen
    assert executor.calls == 1
    ledger = default_fault_control().ledger
    assert isinstance(ledger, SQLiteLedger) and ledger.path == tmp_path / "second.db"


def test_the_old_reset_names_are_the_one_reset() -> None:
    from closedloop.control import reset_default_backpressure, reset_default_fault_control
    from closedloop.store import reset_default_store

    for reset in (reset_default_store, reset_default_fault_control,
                  reset_default_backpressure):
        before = cl.current_runtime()
        store = before.store
        reset()
        assert cl.current_runtime() is not before
        assert default_store() is not store


# ----- a loop's own runtime -------------------------------------------------------------------

def test_a_loop_given_its_own_runtime_leaves_the_process_one_untouched(tmp_path: Path) -> None:
    process = cl.current_runtime()
    SQLiteLedger(tmp_path / "default.db").put(_halt())  # halted in the process's store
    own = cl.Runtime(store=f"sqlite:///{tmp_path / 'own.db'}",
                     backpressure=Backpressure())
    executor = Executor()
    with own:
        loop = _loop(executor, runtime=own)
        assert loop.run(1).outcome is cl.Outcome.SUCCEEDED
        assert loop.store is own.store
        assert loop._spec.guards[0] is own.fault_control
        assert loop._spec.backpressure is own.backpressure
        cl.reset()  # replacing the process runtime does not move the loop
        assert loop.run(2).ok and loop.store is own.store
    assert own.store.record(next(iter(own.store.events()))) is False  # closed with the block

    assert process._store is None  # never opened: its file was only written by the test
    assert _count(tmp_path / "own.db") == 2
    assert executor.calls == 2


def test_a_loop_on_a_store_of_its_own_gets_that_stores_fault_control(
        store: cl.Store, tmp_path: Path) -> None:
    loop = _loop(Executor(), store=store)
    guard, _levels = loop._spec.guards  # fault control, then the demotion detector
    assert isinstance(guard, FaultControl) and guard is not default_fault_control()
    assert isinstance(guard.ledger, SQLiteLedger)
    assert guard.ledger.path == tmp_path / "events.db"
    assert not is_default_store(store)


def test_loops_built_per_step_on_one_store_share_its_fault_control(store: cl.Store) -> None:
    executor = Executor()
    outcomes = [cl.Loop(lambda t, a: t, task_type="flaky", executor=executor,
                        verifiers=[lambda i, r: "instance type differs"],
                        store=store).run(i).outcome for i in range(6)]
    assert outcomes == [cl.Outcome.FAILED] * 5 + [cl.Outcome.HALTED]
    assert executor.calls == 5


def test_loops_on_a_runtimes_store_share_its_fault_control(store: cl.Store) -> None:
    own = cl.Runtime(store=store)
    first = _loop(Executor(), store=store, runtime=own)
    second = _loop(Executor(), runtime=own)
    assert first._spec.guards == second._spec.guards
    assert first._spec.guards[0] is own.fault_control
    cl.configure(store=store)
    assert is_default_store(store)


# ----- the environment, read at first use -------------------------------------------------------

def _python(code: str, **env: str) -> str:
    environ = {k: v for k, v in os.environ.items()
               if k not in ("CLOSEDLOOP_STORE", "CLOSEDLOOP_REDIS_URL")}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={**environ, **env})
    return out.stdout.strip()


def test_import_opens_no_store_and_reads_no_environment(tmp_path: Path) -> None:
    db = tmp_path / "lazy.db"
    code = ("import os, sys, closedloop as cl\n"
            "rt = cl.current_runtime()\n"
            f"os.environ['CLOSEDLOOP_STORE'] = 'sqlite:///{db}'\n"
            "os.environ['CLOSEDLOOP_REDIS_URL'] = 'redis://127.0.0.1:1/0'\n"
            f"print('closedloop.store' in sys.modules, os.path.exists({str(db)!r}))\n"
            "print(cl.current_runtime() is rt, rt.redis_url, rt.store.url)\n")
    imported, later = _python(code, XDG_DATA_HOME=str(tmp_path / "xdg")).splitlines()
    assert imported == "False False"  # nothing opened, not even the store module imported
    assert later == f"True redis://127.0.0.1:1/0 sqlite:///{db}"
    assert db.exists() and not (tmp_path / "xdg").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_records_through_the_process_runtime(tmp_path: Path) -> None:
    loop = _loop(Executor())
    assert loop.run(1).ok
    assert default_store().flush()  # the parent's writer thread is running when we fork
    pid = os.fork()
    if pid == 0:  # the child: fresh workers, the same runtime
        code = 1
        try:
            code = 0 if loop.run(2).ok and cl.current_runtime().flush(10) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _count(tmp_path / "default.db") == 2


def test_the_readmes_configuration_example_runs(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    monkeypatch.chdir(tmp_path)
    before = cl.current_runtime()
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "events.db").exists()  # configured, then closed by the reset
    assert cl.current_runtime() is not before and cl.current_runtime()._store is None
