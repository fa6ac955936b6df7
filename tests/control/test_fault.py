"""Fault control as a loop guard: pause on validation spikes, halt on verification failures."""

from __future__ import annotations

from pathlib import Path

import pytest

import closedloop as cl
from closedloop.control import (
    CaptureSink,
    FaultControl,
    MemoryLedger,
    SQLiteLedger,
    StopKind,
)

from ._clock import FakeClock


def _fc(clock: FakeClock, sink: CaptureSink, **kwargs: object) -> FaultControl:
    return FaultControl(ledger=MemoryLedger(clock=clock), sinks=[sink], clock=clock,
                        min_samples=10, **kwargs)  # type: ignore[arg-type]


def _loop(fc: FaultControl, *, valid: object = True, verified: object = True,
          store: cl.Store | None = None) -> cl.Loop:
    return cl.Loop(lambda task, attempt: task, task_type="provision", max_attempts=1,
                   validators=[lambda p: valid], executor=lambda p: p,
                   verifiers=[lambda task, result: verified], guards=[fc], store=store)


def test_a_validation_spike_pauses_the_task_type_and_alerts() -> None:
    clock, sink = FakeClock(), CaptureSink()
    fc = _fc(clock, sink)
    bad = _loop(fc, valid="wrong shape")
    for i in range(10):
        bad.run(i)
        clock.advance(1)
    result = bad.run(99)
    assert result.outcome is cl.Outcome.PAUSED
    assert sink.alerts[0].kind == "paused"
    assert sink.alerts[0].evidence["failure_rate"] == 1.0
    assert "closedloop report" in sink.alerts[0].action


def test_failures_at_the_baseline_rate_do_not_pause() -> None:
    clock, sink = FakeClock(), CaptureSink()
    fc = _fc(clock, sink, baseline=0.1)
    good, bad = _loop(fc), _loop(fc, valid="bad")
    for i in range(100):
        (bad if i % 10 == 0 else good).run(i)
        clock.advance(1)
    assert good.run(0).outcome is cl.Outcome.SUCCEEDED
    assert sink.alerts == []


def test_a_pause_lifts_itself_when_it_expires() -> None:
    clock, sink = FakeClock(), CaptureSink()
    fc = _fc(clock, sink, pause_for=60.0)
    bad = _loop(fc, valid="bad")
    for i in range(10):
        bad.run(i)
    clock.advance(61)
    assert _loop(fc).run(1).outcome is cl.Outcome.SUCCEEDED


def test_repeated_verification_failures_halt_the_task_type() -> None:
    clock, sink = FakeClock(), CaptureSink()
    fc = _fc(clock, sink, halt_after=3)
    wrong = _loop(fc, verified="instance type is t3.large, expected t3.micro")
    for i in range(3):
        wrong.run(i)
    result = _loop(fc).run(1)
    assert result.outcome is cl.Outcome.HALTED
    assert "closedloop resume provision" in (result.error_message or "")
    alert = sink.alerts[-1]
    assert (alert.kind, alert.severity) == ("halted", "critical")
    assert alert.evidence["consecutive_failures"] == 3


def test_a_halt_does_not_lift_itself() -> None:
    clock, sink = FakeClock(), CaptureSink()
    fc = _fc(clock, sink, halt_after=1)
    _loop(fc, verified=False).run(1)
    clock.advance(10 * 86400)
    assert _loop(fc).run(1).outcome is cl.Outcome.HALTED


def test_resume_lifts_the_halt_and_records_who_and_why() -> None:
    clock, sink = FakeClock(), CaptureSink()
    fc = _fc(clock, sink, halt_after=1)
    _loop(fc, verified=False).run(1)
    lifted = fc.resume("provision", reason="fixed the AMI mapping", by="alice")
    assert lifted is not None
    assert lifted.kind is StopKind.HALTED
    assert _loop(fc).run(1).outcome is cl.Outcome.SUCCEEDED
    entry = fc.ledger.history(1)[0]
    assert (entry["event"], entry["by"], entry["reason"]) == (
        "resumed", "alice", "fixed the AMI mapping")


def test_resume_needs_a_reason() -> None:
    fc = _fc(FakeClock(), CaptureSink())
    with pytest.raises(cl.ConfigError, match="reason"):
        fc.resume("provision", reason="  ")


def test_a_halt_survives_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    first = FaultControl(ledger=SQLiteLedger(db), sinks=[], halt_after=1)
    _loop(first, verified=False, store=None).run(1)
    restarted = FaultControl(ledger=SQLiteLedger(db), sinks=[])
    result = _loop(restarted, store=None).run(1)
    assert result.outcome is cl.Outcome.HALTED
    stop = SQLiteLedger(db).get("provision")
    assert stop is not None
    assert stop.by.startswith("FaultControl verification")
    assert stop.evidence["consecutive_failures"] == 1


def test_a_pause_never_replaces_a_halt() -> None:
    clock = FakeClock()
    ledger = MemoryLedger(clock=clock)
    fc = FaultControl(ledger=ledger, sinks=[], clock=clock, min_samples=2, halt_after=1)
    _loop(fc, verified=False).run(1)
    for i in range(5):
        _loop(fc, valid="bad").run(i)
    stop = ledger.get("provision")
    assert stop is not None
    assert stop.kind is StopKind.HALTED


def test_a_failing_sink_does_not_break_the_step() -> None:
    class Broken:
        def send(self, alert: object) -> None:
            raise RuntimeError("pager down")
    clock = FakeClock()
    fc = FaultControl(ledger=MemoryLedger(clock=clock), sinks=[Broken()], clock=clock,
                      halt_after=1)
    assert _loop(fc, verified=False).run(1).outcome is cl.Outcome.FAILED
    assert _loop(fc).run(1).outcome is cl.Outcome.HALTED


def test_the_default_ledger_is_the_default_store_file() -> None:
    fc = FaultControl(sinks=[])
    assert isinstance(fc.ledger, SQLiteLedger)
    assert fc.ledger.path == cl.default_store().backend.path  # type: ignore[attr-defined]


async def test_the_guard_works_in_the_async_driver() -> None:
    clock, sink = FakeClock(), CaptureSink()
    fc = _fc(clock, sink, halt_after=1)
    await _loop(fc, verified=False).arun(1)
    assert (await _loop(fc).arun(1)).outcome is cl.Outcome.HALTED


def test_the_process_wide_guard_is_built_once_and_can_be_reset() -> None:
    from closedloop.control import default_fault_control, reset_default_fault_control

    first = default_fault_control()
    assert default_fault_control() is first
    reset_default_fault_control()
    assert default_fault_control() is not first
    reset_default_fault_control()
