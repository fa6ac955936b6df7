"""A halt never fails open: guards that cannot decide refuse, unsaved stops stay in force."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

import closedloop as cl
from _doubles import Executor
from closedloop.control import (
    CaptureSink,
    FaultControl,
    MemoryLedger,
    SQLiteLedger,
    Stop,
    StopKind,
    default_fault_control,
)
from closedloop.loop import Admission

from ._clock import FakeClock


def _loop(guard: object, executor: Executor, *, verified: object = True,
          store: cl.Store | None = None, fail_open: bool = False) -> cl.Loop:
    return cl.Loop(lambda task, attempt: task, task_type="provision", max_attempts=1,
                   executor=executor, verifiers=[lambda task, result: verified],
                   guards=[guard], store=store, fail_open=fail_open)  # type: ignore[list-item]


class CannotDecide:
    """A guard whose state is unreachable."""

    def admit(self, task_type: str) -> Admission | None:
        raise ConnectionError("control state at 10.0.0.1:6379 unreachable")

    def observe(self, event: cl.StepEvent) -> None:
        pass


def _halt(task_type: str = "provision", at: float | None = None) -> Stop:
    return Stop(task_type=task_type, kind=StopKind.HALTED, reason="outcomes wrong",
                by="FaultControl", at=time.time() if at is None else at)


# ----- the loop's admission policy ---------------------------------------------------------

def test_a_guard_that_cannot_decide_refuses_the_step(memory_store: cl.Store) -> None:
    executor = Executor()
    result = _loop(CannotDecide(), executor, store=memory_store).run(1)
    assert executor.calls == 0
    assert result.outcome is cl.Outcome.CONTROL_UNAVAILABLE
    assert result.error_type is cl.ErrorType.CONTROL_UNAVAILABLE
    assert "unreachable" in (result.error_message or "")
    memory_store.flush()
    (event,) = memory_store.events()
    assert (event.outcome, event.error_type) == ("control_unavailable", "control_unavailable")


async def test_a_guard_that_cannot_decide_refuses_in_the_async_driver_too() -> None:
    executor = Executor()
    result = await _loop(CannotDecide(), executor).arun(1)
    assert executor.calls == 0
    assert result.outcome is cl.Outcome.CONTROL_UNAVAILABLE


def test_fail_open_admits_and_records_why(memory_store: cl.Store) -> None:
    executor = Executor()
    result = _loop(CannotDecide(), executor, store=memory_store, fail_open=True).run(1)
    assert executor.calls == 1
    assert result.outcome is cl.Outcome.SUCCEEDED
    assert result.event is not None
    assert result.event.detail is not None
    assert "unreachable" in result.event.detail["fail_open"][0]


def test_the_cannot_decide_warning_is_throttled_whatever_the_loops_clocks(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from closedloop.loop import _machine

    monkeypatch.setattr(_machine, "_monotonic", lambda: 5_000.0)  # the process clock stands still
    def loop(clock: object) -> cl.Loop:
        return cl.Loop(lambda task, attempt: task, task_type="throttled-warning",
                       executor=Executor(), guards=[CannotDecide()], store=None,
                       clock=clock)  # type: ignore[arg-type]

    with caplog.at_level(logging.WARNING, logger="closedloop"):
        loop(time.perf_counter).run(1)
        loop(lambda: 1e12).run(1)  # a loop on a virtual clock far ahead: still the same 10 s
    warnings = [r for r in caplog.records if "throttled-warning" in r.getMessage()]
    assert len(warnings) == 1


def test_a_refused_step_is_not_raised_as_success() -> None:
    result = _loop(CannotDecide(), Executor()).run(1)
    with pytest.raises(cl.NotExecuted, match="control_unavailable"):
        result.raise_for_outcome()


def test_a_guard_whose_observe_raises_leaves_the_result_alone(
        caplog: pytest.LogCaptureFixture) -> None:
    class BrokenObserver:
        def admit(self, task_type: str) -> None:
            return None

        def observe(self, event: cl.StepEvent) -> None:
            raise RuntimeError("bookkeeping bug")

    executor = Executor()
    with caplog.at_level(logging.ERROR, logger="closedloop"):
        result = _loop(BrokenObserver(), executor).run(1)
    assert result.outcome is cl.Outcome.SUCCEEDED
    assert executor.calls == 1
    assert "bookkeeping bug" in caplog.text


# ----- FaultControl when its ledger fails ----------------------------------------------------

class FlakyLedger(MemoryLedger):
    """A real MemoryLedger that can be switched to fail like a full disk or a lost server."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.full = False

    def put(self, stop: Stop) -> None:
        if self.down or self.full:
            raise cl.ControlUnavailable("cannot write control state: disk is full")
        super().put(stop)

    def get(self, task_type: str) -> Stop | None:
        if self.down:
            raise cl.ControlUnavailable("cannot read control state: disk I/O error")
        return super().get(task_type)


def test_an_unreadable_ledger_refuses_a_task_type_with_no_known_stop() -> None:
    clock = FakeClock()
    ledger = FlakyLedger(clock)
    fc = FaultControl(ledger=ledger, sinks=[], clock=clock)
    executor = Executor()
    ledger.down = True
    result = _loop(fc, executor).run(1)
    assert result.outcome is cl.Outcome.CONTROL_UNAVAILABLE
    assert executor.calls == 0
    assert fc.status()["refused_unreadable"] == 1
    ledger.down = False
    clock.advance(fc.recheck)
    assert _loop(fc, executor).run(1).outcome is cl.Outcome.SUCCEEDED


def test_a_halt_once_read_stays_in_force_while_the_ledger_is_unreadable() -> None:
    clock = FakeClock()
    ledger = FlakyLedger(clock)
    ledger.put(_halt(at=clock()))
    fc = FaultControl(ledger=ledger, sinks=[], clock=clock)
    executor = Executor()
    assert _loop(fc, executor).run(1).outcome is cl.Outcome.HALTED
    ledger.down = True
    clock.advance(3600)
    for i in range(3):
        assert _loop(fc, executor, fail_open=True).run(i).outcome is cl.Outcome.HALTED
    assert executor.calls == 0


def test_a_halt_that_cannot_be_stored_stays_in_force_and_is_stored_later() -> None:
    clock = FakeClock()
    ledger = FlakyLedger(clock)
    fc = FaultControl(ledger=ledger, sinks=[], clock=clock, halt_after=1, retry_every=3600)
    executor = Executor()
    ledger.full = True
    _loop(fc, executor, verified=False).run(1)
    clock.advance(3600)  # the ledger is read again: the halt is not in it
    assert _loop(fc, executor).run(2).outcome is cl.Outcome.HALTED
    assert executor.calls == 1
    assert [s["kind"] for s in fc.status()["unsaved"]] == ["halted"]
    assert not fc.flush_pending()
    ledger.full = False
    assert fc.flush_pending()
    stored = ledger.get("provision")
    assert stored is not None
    assert stored.kind is StopKind.HALTED
    assert fc.status()["unsaved"] == []


def test_the_background_retry_stores_an_unsaved_halt(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the store's folder should be")
    ledger = SQLiteLedger(blocker / "events.db")
    fc = FaultControl(ledger=ledger, sinks=[], halt_after=1, retry_every=0.01)
    _loop(fc, Executor(), verified=False).run(1)
    assert fc.status()["unsaved_attempts"] >= 1
    blocker.unlink()  # the folder can be made now: the retry thread stores the halt
    deadline = time.monotonic() + 30
    while fc.status()["unsaved"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stored = SQLiteLedger(blocker / "events.db").get("provision")
    assert stored is not None
    assert stored.kind is StopKind.HALTED


def test_resume_lifts_a_halt_that_was_never_stored() -> None:
    clock = FakeClock()
    ledger = FlakyLedger(clock)
    fc = FaultControl(ledger=ledger, sinks=[], clock=clock, halt_after=1, retry_every=3600)
    ledger.full = True
    _loop(fc, Executor(), verified=False).run(1)
    ledger.full = False
    lifted = fc.resume("provision", reason="fixed", by="alice")
    assert lifted is not None
    assert lifted.kind is StopKind.HALTED
    assert _loop(fc, Executor()).run(1).outcome is cl.Outcome.SUCCEEDED


def test_stop_reasons_are_redacted_before_they_are_stored(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "events.db")
    sink = CaptureSink()
    fc = FaultControl(ledger=ledger, sinks=[sink], halt_after=1)
    secret = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0K1l2"
    _loop(fc, Executor(), verified=f"token {secret} was rejected").run(1)
    stop = ledger.get("provision")
    assert stop is not None
    assert secret not in stop.reason
    assert "[REDACTED" in stop.reason
    assert secret not in sink.alerts[0].summary
    fc.resume("provision", reason=f"rotated {secret}", by="alice")
    assert secret not in ledger.history(1)[0]["reason"]
    assert sink.alerts[-1].kind == "resumed"
    assert secret not in sink.alerts[-1].summary


# ----- the SQLite ledger ---------------------------------------------------------------------

def test_a_pause_never_replaces_a_halt_in_the_sqlite_ledger(tmp_path: Path) -> None:
    ledger = SQLiteLedger(tmp_path / "events.db")
    now = time.time()
    ledger.put(_halt(at=now))
    ledger.put(Stop(task_type="provision", kind=StopKind.PAUSED, reason="spike", by="x",
                    at=now + 1, until=now + 600))
    stop = SQLiteLedger(tmp_path / "events.db").get("provision")
    assert stop is not None
    assert stop.kind is StopKind.HALTED
    assert stop.reason == "outcomes wrong"


def test_reading_a_file_with_no_control_tables_creates_none(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE mine (x)").connection.close()
    ledger = SQLiteLedger(path)
    assert ledger.get("provision") is None
    assert ledger.stops() == []
    assert ledger.history() == []
    with sqlite3.connect(path) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("mine",)]


def test_an_unusable_ledger_path_is_control_unavailable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ledger = SQLiteLedger(blocker / "events.db")  # never raises on construction
    with pytest.raises(cl.ControlUnavailable, match="cannot write control state"):
        ledger.put(_halt())


# ----- learning: window expiry and the baseline ----------------------------------------------

def _validating(fc: FaultControl, valid: bool) -> cl.Loop:
    return cl.Loop(lambda task, attempt: task, task_type="provision", max_attempts=1,
                   validators=[lambda p: None if valid else "bad"], guards=[fc], store=None)


def test_the_baseline_is_learned_from_steps_leaving_the_window() -> None:
    clock = FakeClock()
    fc = FaultControl(ledger=MemoryLedger(clock=clock), sinks=[], clock=clock, window=10.0,
                      min_samples=10, baseline=0.05, baseline_alpha=0.1,
                      min_spike_rate=0.99)
    good, bad = _validating(fc, True), _validating(fc, False)
    for i in range(10):  # second 0: 20% failures
        (bad if i < 2 else good).run(i)
    clock.advance(2)
    for i in range(10):  # second 2: 60% failures
        (bad if i < 6 else good).run(i)
    assert fc.baseline_of("provision") == 0.05  # nothing has left the window: the prior
    clock.advance(11)
    good.run(0)  # expires both seconds into the baseline
    first = 0.2
    weight = 1 - (1 - 0.1) ** 10  # ten steps, each moving the average by alpha
    assert fc.baseline_of("provision") == pytest.approx(first + weight * (0.6 - first))
    status = fc.status()["task_types"]["provision"]
    assert status["validation_samples"] == 1
    assert status["baseline"] == pytest.approx(first + weight * (0.6 - first))


def test_a_learned_baseline_replaces_the_prior() -> None:
    clock = FakeClock()
    sink = CaptureSink()
    fc = FaultControl(ledger=MemoryLedger(clock=clock), sinks=[sink], clock=clock,
                      window=10.0, min_samples=10, baseline=0.4, spike_factor=2.0,
                      min_spike_rate=0.2)
    good, bad = _validating(fc, True), _validating(fc, False)
    for _ in range(12):  # a task type whose validations normally pass
        for i in range(10):
            good.run(i)
        clock.advance(1)
    clock.advance(11)  # everything leaves the window into the baseline
    for i in range(5):
        good.run(i)
    assert fc.baseline_of("provision") == 0.0
    for i in range(5):  # 50%: under 2 x the prior (80%), a spike over the learned 0%
        bad.run(i)
    assert [a.kind for a in sink.alerts] == ["paused"]
    assert sink.alerts[0].evidence["baseline"] == 0.0


def test_failures_that_left_the_window_no_longer_count() -> None:
    clock = FakeClock()
    fc = FaultControl(ledger=MemoryLedger(clock=clock), sinks=[], clock=clock, window=10.0,
                      min_samples=5, halt_after=100, halt_rate=0.5)
    wrong = _loop(fc, Executor(), verified=False)
    right = _loop(fc, Executor())
    for i in range(4):
        wrong.run(i)
    clock.advance(11)
    for i in range(4):
        right.run(i)
    assert wrong.run(9).outcome is cl.Outcome.FAILED
    # 1 of the last 5 failed: no halt (counting the expired four, 5 of 9 would halt)
    assert fc.status()["stops"] == []
    assert fc.status()["task_types"]["provision"]["verification_samples"] == 5
    assert right.run(10).outcome is cl.Outcome.SUCCEEDED


def test_a_failure_share_over_halt_rate_halts() -> None:
    clock = FakeClock()
    fc = FaultControl(ledger=MemoryLedger(clock=clock), sinks=[], clock=clock, window=10.0,
                      min_samples=5, halt_after=100, halt_rate=0.5)
    wrong = _loop(fc, Executor(), verified=False)
    right = _loop(fc, Executor())
    for i in range(4):
        wrong.run(i)
    for i in range(4):
        right.run(i)
    wrong.run(9)
    assert [s["kind"] for s in fc.status()["stops"]] == ["halted"]


def test_status_shows_stops_counters_and_windows() -> None:
    clock = FakeClock()
    fc = FaultControl(ledger=MemoryLedger(clock=clock), sinks=[], clock=clock, halt_after=2)
    wrong = _loop(fc, Executor(), verified=False)
    wrong.run(1)
    shares = fc.status()["task_types"]["provision"]
    assert shares["verification_failure_rate"] == 1.0
    assert shares["consecutive_verification_failures"] == 1
    wrong.run(2)
    status = fc.status()
    assert [s["kind"] for s in status["stops"]] == ["halted"]
    assert status["unsaved"] == []
    assert status["refused_unreadable"] == 0
    # a stop starts a fresh window
    assert status["task_types"]["provision"]["verification_samples"] == 0


# ----- process defaults ----------------------------------------------------------------------

def test_reset_default_store_gives_default_fault_control_the_new_ledger(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = default_fault_control()
    assert isinstance(first.ledger, SQLiteLedger)
    monkeypatch.setenv("CLOSEDLOOP_STORE", f"sqlite:///{tmp_path / 'second.db'}")
    cl.reset_default_store()
    second = default_fault_control()
    assert isinstance(second.ledger, SQLiteLedger)
    assert second.ledger.path == tmp_path / "second.db"
    executor = Executor()
    SQLiteLedger(tmp_path / "second.db").put(_halt())
    assert _loop(second, executor).run(1).outcome is cl.Outcome.HALTED
    loop = cl.Loop(lambda t, a: t, task_type="provision", executor=executor)
    assert loop.run(1).outcome is cl.Outcome.HALTED
    assert executor.calls == 0


def test_a_malformed_redis_url_stops_loop_construction_with_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOSEDLOOP_REDIS_URL", "redis://:x@host:port/0")
    with pytest.raises(cl.ConfigError, match=r"malformed Redis URL .*redis://HOST:PORT/DB"):
        cl.Loop(lambda t, a: t, task_type="provision", store=None)


def test_a_memory_store_keeps_one_ledger_for_every_guard_on_it() -> None:
    # a halt put through one guard's ledger must stop a loop built later on the same store
    from closedloop.control import ledger_for_store

    store = cl.open_store("memory://")
    ledger_for_store(store, redis_url=None).put(
        Stop(task_type="provision", kind=StopKind.HALTED, reason="bad AMI", by="test",
             at=time.time()))
    executor = Executor()
    guard = FaultControl(ledger=ledger_for_store(store, redis_url=None))
    result = cl.Loop(lambda task, attempt: task, task_type="provision", executor=executor,
                     guards=[guard], store=store).run(1)
    assert (result.outcome, executor.calls) == ("halted", 0)


# ----- admission from memory -----------------------------------------------------------------

def _admits(loop: cl.Loop, task_input: object) -> list[object]:
    """The guards a step of ``loop`` asked (the Admit actions its machine yielded)."""
    from closedloop.loop import Admit
    from closedloop.loop._machine import step_machine

    asked: list[object] = []
    machine = step_machine(loop._spec, task_input, "0" * 32)
    try:
        action = next(machine)
        while True:
            if isinstance(action, Admit):
                asked.append(action.guard)
            action = machine.send(action.fn(*action.args))
    except StopIteration:
        return asked


def test_a_clear_ledger_read_within_recheck_admits_without_asking_again() -> None:
    clock = FakeClock()
    ledger = FlakyLedger(clock)
    fc = FaultControl(ledger=ledger, sinks=[], clock=clock)
    loop = _loop(fc, Executor())
    assert _admits(loop, 1) == [fc]  # read the ledger
    assert _admits(loop, 2) == []  # admitted from memory: no action, no read
    clock.advance(fc.recheck)
    assert _admits(loop, 3) == [fc]  # stale: asked (and read) again


def test_a_stop_in_force_is_always_asked_and_refuses() -> None:
    clock = FakeClock()
    ledger = FlakyLedger(clock)
    fc = FaultControl(ledger=ledger, sinks=[], clock=clock)
    executor = Executor()
    loop = _loop(fc, executor)
    assert loop.run(1).ok
    ledger.put(_halt(at=clock()))
    clock.advance(fc.recheck)
    assert _admits(loop, 2) == [fc]
    assert loop.run(3).outcome is cl.Outcome.HALTED  # read within recheck, still asked
    assert _admits(loop, 4) == [fc]
    assert executor.calls == 1


def test_a_guard_overriding_admit_alone_is_always_asked() -> None:
    class Counting(FaultControl):  # its own admit: the inherited admits_now must not skip it
        asked = 0

        def admit(self, task_type: str) -> Admission | None:
            self.asked += 1
            return super().admit(task_type)

    clock = FakeClock()
    fc = Counting(ledger=FlakyLedger(clock), sinks=[], clock=clock)
    loop = _loop(fc, Executor())
    assert all(loop.run(i).ok for i in range(3))
    assert fc.asked == 3
