"""The loop's behaviour: re-ask, bounds, gating, verification, exceptions, sync and async."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.loop import (
    Act,
    Action,
    Admission,
    Admit,
    Approve,
    Level,
    Propose,
    Validate,
    Verify,
)
from closedloop.loop._machine import step_machine


class FixingAgent:
    """Proposes a bad value until it has been told what was wrong ``fix_after`` times."""

    def __init__(self, fix_after: int) -> None:
        self.fix_after = fix_after
        self.seen_feedback: list[str | None] = []
        self.seen_issues: list[tuple[cl.Issue, ...]] = []

    def __call__(self, task: int, attempt: cl.Attempt) -> int:
        self.seen_feedback.append(attempt.feedback)
        self.seen_issues.append(attempt.issues)
        attempt.record_usage(input_tokens=100, output_tokens=10)
        return task if attempt.number > self.fix_after else -task


def positive(value: int) -> str | None:
    return None if value > 0 else f"{value} is not positive"


class Recorder:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def __call__(self, proposal: Any) -> str:
        self.calls.append(proposal)
        return f"id-{proposal}"


def events(store: cl.Store) -> list[cl.StepEvent]:
    assert store.flush()
    return list(store.events())


def test_reask_sends_feedback_and_converges(memory_store: cl.Store) -> None:
    agent = FixingAgent(fix_after=2)
    loop = cl.Loop(agent, task_type="t", validators=[positive], store=memory_store)

    result = loop.run(5)

    assert result.ok and result.proposal == 5 and result.attempts == 3
    assert agent.seen_feedback[0] is None
    assert agent.seen_feedback[1] is not None and "-5 is not positive" in agent.seen_feedback[1]
    assert [[i.message for i in issues] for issues in agent.seen_issues] == [
        [], ["-5 is not positive"], ["-5 is not positive"]]
    (event,) = events(memory_store)
    assert event.attempts == 3 and event.validation_passed is True
    assert event.input_tokens == 300 and event.output_tokens == 30
    assert event.detail is not None and len(event.detail["attempts"]) == 2


def test_reask_stops_at_the_bound_with_validation_error(memory_store: cl.Store) -> None:
    agent = FixingAgent(fix_after=99)
    executor = Recorder()
    loop = cl.Loop(agent, task_type="t", validators=[positive], executor=executor,
                   max_attempts=4, store=memory_store)

    result = loop.run(5)

    assert result.outcome is cl.Outcome.FAILED
    assert result.error_type is cl.ErrorType.VALIDATION
    assert len(agent.seen_feedback) == 4 and executor.calls == []
    (event,) = events(memory_store)
    assert (event.attempts, event.validation_passed, event.error_type) == (4, False, "validation")
    assert event.verification_passed is None
    assert "not positive" in (event.error_message or "")
    with pytest.raises(cl.ValidationFailed) as info:
        result.raise_for_outcome()
    assert info.value.trace_id == result.trace_id


def test_critical_issue_blocks_without_reask(memory_store: cl.Store) -> None:
    agent = FixingAgent(fix_after=99)
    executor = Recorder()

    def no_delete(value: int) -> cl.Issue:
        return cl.Issue(message="deletes production", code="destructive",
                        severity=cl.Severity.CRITICAL)

    loop = cl.Loop(agent, task_type="t", validators=[no_delete], executor=executor,
                   store=memory_store)
    result = loop.run(1)

    assert result.outcome is cl.Outcome.BLOCKED and result.error_type is cl.ErrorType.BLOCKED
    assert len(agent.seen_feedback) == 1 and executor.calls == []
    with pytest.raises(cl.Blocked):
        result.raise_for_outcome()


def test_warnings_do_not_block(memory_store: cl.Store) -> None:
    def style(value: int) -> cl.Verdict:
        return cl.Verdict.ok(cl.Issue(message="odd", severity=cl.Severity.WARNING))

    result = cl.Loop(lambda t, a: t, task_type="t", validators=[style],
                     store=memory_store).run(3)
    assert result.ok and result.validation[0].issues[0].message == "odd"
    (event,) = events(memory_store)
    assert event.validation_passed is True
    assert event.detail is not None  # the warning is kept with the step
    assert event.detail["attempts"][0]["verdicts"][0]["issues"][0]["message"] == "odd"


def test_a_step_without_verifiers_is_not_counted_as_verified(memory_store: cl.Store) -> None:
    result = cl.Loop(lambda t, a: t, task_type="t", executor=Recorder(),
                     store=memory_store).run(1)
    assert result.ok and result.verification == ()
    (event,) = events(memory_store)
    assert event.verification_passed is None  # nothing was verified: neither pass nor fail


def test_suggest_never_executes(memory_store: cl.Store) -> None:
    executor = Recorder()
    verifier_calls: list[Any] = []
    loop = cl.Loop(lambda t, a: t, task_type="t", executor=executor,
                   verifiers=[lambda i, r: verifier_calls.append(r)],
                   autonomy="suggest", store=memory_store)

    results = [loop.run(i) for i in range(5)]

    assert executor.calls == [] and verifier_calls == []
    assert {r.outcome for r in results} == {cl.Outcome.SUGGESTED}
    assert [r.proposal for r in results] == list(range(5))
    assert {e.autonomy for e in events(memory_store)} == {"suggest"}


def test_approve_without_approver_waits_and_with_approver_decides(
    memory_store: cl.Store,
) -> None:
    executor = Recorder()
    waiting = cl.Loop(lambda t, a: t, task_type="t", executor=executor, autonomy="approve",
                      store=memory_store).run(1)
    assert waiting.outcome is cl.Outcome.AWAITING_APPROVAL and executor.calls == []

    approver = cl.Loop(lambda t, a: t, task_type="t", executor=executor, autonomy="approve",
                       approver=lambda task, proposal: proposal % 2 == 0, store=memory_store)
    assert approver.run(1).outcome is cl.Outcome.REJECTED
    assert approver.run(2).ok
    assert executor.calls == [2]


class ApprovalDown(RuntimeError):
    pass


def test_a_raising_approver_never_executes_and_is_recorded_and_reraised(
    memory_store: cl.Store,
) -> None:
    def approver(task: int, proposal: int) -> bool:
        raise ApprovalDown("ticket system unreachable")

    executor = Recorder()
    loop = cl.Loop(lambda t, a: t, task_type="t", executor=executor, autonomy="approve",
                   approver=approver, store=memory_store)
    with pytest.raises(ApprovalDown) as info:
        loop.run(1)
    assert executor.calls == []
    (event,) = events(memory_store)
    assert (event.outcome, event.error_type) == ("error", "executor")
    assert event.error_message == "approver: ApprovalDown: ticket system unreachable"
    assert event.detail is not None and event.detail["exception"]["type"] == "ApprovalDown"
    assert any(event.trace_id in note for note in info.value.__notes__)


async def test_a_raising_async_approver_and_executor_are_recorded_under_arun(
    memory_store: cl.Store,
) -> None:
    async def approver(task: int, proposal: int) -> bool:
        if task == 1:
            raise ApprovalDown("ticket system unreachable")
        return True

    async def executor(proposal: int) -> str:
        raise PermissionError("denied")

    loop = cl.Loop(lambda t, a: t, task_type="t", executor=executor, autonomy="approve",
                   approver=approver, store=memory_store)
    with pytest.raises(ApprovalDown):
        await loop.arun(1)
    with pytest.raises(PermissionError):
        await loop.arun(2)
    assert [(e.outcome, e.error_type, e.error_message) for e in events(memory_store)] == [
        ("error", "executor", "approver: ApprovalDown: ticket system unreachable"),
        ("error", "executor", "PermissionError: denied"),
    ]


def test_verification_mismatch_fails_with_every_difference(memory_store: cl.Store) -> None:
    def state(intent: int, result: str) -> list[cl.Issue]:
        return [cl.Issue(message="wrong type", location="instance.type"),
                cl.Issue(message="missing tag owner", location="instance.tags.owner")]

    result = cl.Loop(lambda t, a: t, task_type="t", executor=Recorder(),
                     verifiers=[state, lambda i, r: True], store=memory_store).run(1)

    assert result.outcome is cl.Outcome.FAILED
    assert result.error_type is cl.ErrorType.VERIFICATION
    assert len(result.verification) == 2 and not result.verification[0].passed
    assert "wrong type" in (result.error_message or "")
    assert "missing tag owner" in (result.error_message or "")
    (event,) = events(memory_store)
    assert event.verification_passed is False and event.validation_passed is None
    assert event.detail is not None
    assert len(event.detail["verification"][0]["issues"]) == 2


def test_verification_warnings_are_recorded_on_success(memory_store: cl.Store) -> None:
    def converged(intent: int, result: str) -> cl.Verdict:
        return cl.Verdict.ok(cl.Issue(message="converged after 3 checks over 2.1 s",
                                      code="converged", severity=cl.Severity.WARNING))

    result = cl.Loop(lambda t, a: t, task_type="t", executor=Recorder(),
                     verifiers=[converged], store=memory_store).run(1)
    assert result.ok
    (event,) = events(memory_store)
    assert event.verification_passed is True
    assert event.detail is not None
    (verdict,) = event.detail["verification"]
    assert verdict["passed"] is True
    assert verdict["issues"][0]["code"] == "converged"


def test_unknown_verification_is_a_failure_of_its_own_type(memory_store: cl.Store) -> None:
    result = cl.Loop(lambda t, a: t, task_type="t", executor=Recorder(),
                     verifiers=[lambda i, r: cl.Verdict.cannot_tell("endpoint unreachable")],
                     store=memory_store).run(1)
    assert result.outcome is cl.Outcome.FAILED
    assert result.error_type is cl.ErrorType.VERIFICATION_UNKNOWN
    with pytest.raises(cl.VerificationFailed):
        result.raise_for_outcome()


def _mismatch(intent: int, result: str) -> cl.Verdict:
    return cl.Verdict.fail("instance type is t3.large")


def _unreachable(intent: int, result: str) -> cl.Verdict:
    return cl.Verdict.cannot_tell("endpoint unreachable")


@pytest.mark.parametrize("order", ["mismatch first", "unknown first"])
def test_a_mismatch_beside_an_unknown_check_is_a_verification_failure(
    memory_store: cl.Store, order: str
) -> None:
    verifiers = [_mismatch, _unreachable]
    if order == "unknown first":
        verifiers.reverse()
    result = cl.Loop(lambda t, a: t, task_type="t", executor=Recorder(), verifiers=verifiers,
                     store=memory_store).run(1)
    assert (result.outcome, result.error_type) == (cl.Outcome.FAILED, cl.ErrorType.VERIFICATION)
    assert "instance type is t3.large" in (result.error_message or "")
    assert "unknown: endpoint unreachable" in (result.error_message or "")
    (event,) = events(memory_store)
    assert event.error_type == "verification"


@pytest.mark.parametrize(("severity", "error_type"), [
    (cl.Severity.ERROR, cl.ErrorType.VERIFICATION),  # a mismatch was found: a failure
    (cl.Severity.WARNING, cl.ErrorType.VERIFICATION_UNKNOWN),  # only a warning: still unknown
])
def test_one_verdict_with_an_issue_and_an_unknown_part_is_classified_by_the_issue(
    memory_store: cl.Store, severity: cl.Severity, error_type: cl.ErrorType
) -> None:
    def partial(intent: int, result: str) -> cl.Verdict:
        return cl.Verdict(issues=(cl.Issue(message="tag owner missing", severity=severity),),
                          unknown="security groups unreadable")

    result = cl.Loop(lambda t, a: t, task_type="t", executor=Recorder(), verifiers=[partial],
                     store=memory_store).run(1)
    assert result.error_type is error_type


def test_agent_exception_is_recorded_and_reraised_unchanged(memory_store: cl.Store) -> None:
    class ModelDown(RuntimeError):
        pass

    def agent(task: int, attempt: cl.Attempt) -> int:
        raise ModelDown("provider returned 500")

    loop = cl.Loop(agent, task_type="t", store=memory_store)
    with pytest.raises(ModelDown) as info:
        loop.run(1)

    (event,) = events(memory_store)
    assert event.outcome == "error" and event.error_type == "agent"
    assert event.error_message == "ModelDown: provider returned 500"
    assert event.detail is not None and event.detail["exception"]["type"].endswith("ModelDown")
    assert any(event.trace_id in note for note in info.value.__notes__)


def test_executor_exception_is_recorded_and_reraised(memory_store: cl.Store) -> None:
    def executor(proposal: int) -> None:
        raise PermissionError("denied")

    with pytest.raises(PermissionError):
        cl.Loop(lambda t, a: t, task_type="t", executor=executor, store=memory_store).run(1)
    (event,) = events(memory_store)
    assert (event.outcome, event.error_type) == ("error", "executor")
    assert event.validation_passed is None and event.verification_passed is None


def test_crashing_validator_is_its_own_error_not_the_agents(memory_store: cl.Store) -> None:
    def broken(value: int) -> None:
        raise KeyError("schema")

    executor = Recorder()
    result = cl.Loop(lambda t, a: t, task_type="t", validators=[broken], executor=executor,
                     store=memory_store).run(1)
    assert result.outcome is cl.Outcome.ERROR
    assert result.error_type is cl.ErrorType.VALIDATOR_ERROR
    assert result.attempts == 1 and executor.calls == []
    assert "KeyError" in (result.error_message or "")
    with pytest.raises(cl.CheckCrashed):
        result.raise_for_outcome()
    (event,) = events(memory_store)
    assert event.validation_passed is False  # a crashed check never counts as passed


def test_crashing_verifier_never_passes(memory_store: cl.Store) -> None:
    def broken(intent: int, result: str) -> None:
        raise TimeoutError("describe_instances")

    result = cl.Loop(lambda t, a: t, task_type="t", executor=Recorder(),
                     verifiers=[broken, lambda i, r: None], store=memory_store).run(1)
    assert result.outcome is cl.Outcome.ERROR
    assert result.error_type is cl.ErrorType.VERIFIER_ERROR
    assert len(result.verification) == 2  # the other verifier still ran


def test_validator_returning_nonsense_is_a_validator_error(memory_store: cl.Store) -> None:
    result = cl.Loop(lambda t, a: t, task_type="t", validators=[lambda p: 42],
                     store=memory_store).run(1)
    assert result.error_type is cl.ErrorType.VALIDATOR_ERROR


async def test_async_hooks_run_under_arun(memory_store: cl.Store) -> None:
    async def agent(task: int, attempt: cl.Attempt) -> int:
        await asyncio.sleep(0)
        return task if attempt.is_retry else -task

    async def validator(value: int) -> str | None:
        await asyncio.sleep(0)
        return positive(value)

    async def executor(value: int) -> str:
        return f"id-{value}"

    async def verifier(intent: int, result: str) -> bool:
        return result == f"id-{intent}"

    loop = cl.Loop(agent, task_type="t", validators=[validator], executor=executor,
                   verifiers=[verifier], store=memory_store)
    results = await asyncio.gather(*(loop.arun(i) for i in range(1, 21)))

    assert all(r.ok and r.attempts == 2 for r in results)
    assert len({r.trace_id for r in results}) == 20


async def test_sync_and_async_drivers_record_the_same_event(memory_store: cl.Store) -> None:
    ticks = iter(range(1000))
    loop = cl.Loop(FixingAgent(fix_after=1), task_type="t", validators=[positive],
                   executor=Recorder(), verifiers=[lambda i, r: r == f"id-{i}"],
                   store=memory_store, clock=lambda: float(next(ticks)), wallclock=lambda: 0.0)
    sync = loop.run(7)
    asynchronous = await loop.arun(7)
    assert sync.event is not None and asynchronous.event is not None
    assert sync.event._replace(trace_id="", step_id="") == asynchronous.event._replace(
        trace_id="", step_id="")


def test_async_hook_in_sync_run_is_a_clear_config_error(memory_store: cl.Store) -> None:
    async def agent(task: int, attempt: cl.Attempt) -> int:
        return task

    with pytest.raises(cl.ConfigError, match="arun"):
        cl.Loop(agent, task_type="t", store=memory_store).run(1)


def test_async_agent_exception_is_recorded(memory_store: cl.Store) -> None:
    async def agent(task: int, attempt: cl.Attempt) -> int:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        asyncio.run(cl.Loop(agent, task_type="t", store=memory_store).arun(1))
    (event,) = events(memory_store)
    assert event.error_type == "agent"


def test_stage_timings_come_from_the_injected_clock(memory_store: cl.Store) -> None:
    ticks = iter(range(1000))
    loop = cl.Loop(lambda t, a: t, task_type="t", validators=[positive], executor=Recorder(),
                   verifiers=[lambda i, r: True], store=memory_store,
                   clock=lambda: float(next(ticks)), wallclock=lambda: 1_700_000_000.0)
    event = loop.run(1).event
    assert event is not None
    assert event.ts == 1_700_000_000.0
    # started=0; propose 1→2; validate 2→3; act 4→5; verify 5→6; end 7
    assert (event.propose_ms, event.validate_ms, event.act_ms, event.verify_ms) == (
        1000.0, 1000.0, 1000.0, 1000.0)
    assert event.latency_ms == 7000.0


@pytest.mark.parametrize("stage", ["agent", "executor"])
def test_a_raising_hook_still_records_the_time_it_took(memory_store: cl.Store, stage: str) -> None:
    def raising(*args: Any) -> Any:
        raise RuntimeError(stage)

    ticks = iter(range(1000))
    hooks: dict[str, Any] = {"agent": lambda t, a: t, "executor": Recorder(), stage: raising}
    loop = cl.Loop(hooks["agent"], task_type="t", executor=hooks["executor"],
                   store=memory_store, clock=lambda: float(next(ticks)))
    with pytest.raises(RuntimeError):
        loop.run(1)
    (event,) = events(memory_store)
    # started=0; propose 1→2; act (if reached) 3→4
    assert (event.propose_ms, event.act_ms) == (
        (1000.0, 0.0) if stage == "agent" else (1000.0, 1000.0))


def test_every_step_gets_a_distinct_otel_shaped_trace_id(memory_store: cl.Store) -> None:
    loop = cl.Loop(lambda t, a: t, task_type="t", store=memory_store)
    ids = {loop.run(1).trace_id for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch("[0-9a-f]{32}", i) for i in ids)


def test_trace_ids_start_with_the_step_time_in_ms_and_end_with_80_random_bits(
        memory_store: cl.Store, monkeypatch: pytest.MonkeyPatch) -> None:
    # Time-ordered ids keep each store's trace-id indexes appending at their right edge.
    from closedloop.loop import _machine

    now_ms = 1_764_633_600_123  # 2025-12-02T00:00:00.123Z
    monkeypatch.setattr(_machine, "_time_ns", lambda: now_ms * 1_000_000 + 999_999)
    loop = cl.Loop(lambda t, a: t, task_type="t", store=memory_store)
    ids = [loop.run(1).trace_id for _ in range(300)]
    assert {i[:12] for i in ids} == {f"{now_ms:012x}"}
    tails = {i[12:] for i in ids}
    assert len(tails) == 300  # 80 random bits each: a repeat means they are not random
    assert len({t[0] for t in tails}) > 1 and len({t[-1] for t in tails}) > 1


def test_current_attempt_is_visible_inside_the_agent(memory_store: cl.Store) -> None:
    def agent(task: int, attempt: cl.Attempt) -> bool:
        return cl.current_attempt() is attempt

    assert cl.Loop(agent, task_type="t", store=memory_store).run(1).proposal is True
    assert cl.current_attempt() is None


def test_guard_refusal_records_and_skips_the_agent(memory_store: cl.Store) -> None:
    calls: list[int] = []

    class Halt:
        def __init__(self) -> None:
            self.observed: list[str] = []

        def admit(self, task_type: str) -> Admission | None:
            return Admission.halted("verification failed 5 times") if task_type == "x" else None

        def observe(self, event: cl.StepEvent) -> None:
            self.observed.append(event.outcome)

    guard = Halt()

    def agent(task: int, attempt: cl.Attempt) -> int:
        calls.append(task)
        return task

    halted = cl.Loop(agent, task_type="x", guards=[guard], store=memory_store).run(1)
    ok = cl.Loop(agent, task_type="y", guards=[guard], store=memory_store).run(2)

    assert halted.outcome is cl.Outcome.HALTED and halted.error_type is cl.ErrorType.HALTED
    assert halted.attempts == 0  # the agent never ran
    assert ok.ok and calls == [2]
    assert guard.observed == ["halted", "succeeded"]


def test_guard_sees_steps_whose_agent_raised(memory_store: cl.Store) -> None:
    seen: list[str | None] = []

    class Watch:
        def admit(self, task_type: str) -> None:
            return None

        def observe(self, event: cl.StepEvent) -> None:
            seen.append(event.error_type)

    def agent(task: int, attempt: cl.Attempt) -> int:
        raise RuntimeError("x")

    with pytest.raises(RuntimeError):
        cl.Loop(agent, task_type="t", guards=[Watch()], store=memory_store).run(1)
    assert seen == ["agent"]


def test_a_store_that_raises_never_breaks_the_step() -> None:
    class Broken:
        url = "broken://"

        def record(self, event: cl.StepEvent) -> bool:
            raise OSError("disk full")

    result = cl.Loop(lambda t, a: t, task_type="t", store=Broken()).run(1)  # type: ignore[arg-type]
    assert result.ok


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_type": ""}, "task_type"),
        ({"task_type": "t", "max_attempts": 0}, "max_attempts"),
        ({"task_type": "t", "autonomy": "yolo"}, "autonomy"),
        ({"task_type": "t", "validators": [42]}, "not callable"),
        ({"task_type": "t", "executor": "run"}, "not callable"),
    ],
)
def test_bad_configuration_is_a_config_error(
    memory_store: cl.Store, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(cl.ConfigError, match=message):
        cl.Loop(lambda t, a: t, store=memory_store, **kwargs)


def test_loop_without_store_records_nothing() -> None:
    assert cl.Loop(lambda t, a: t, task_type="t", store=None).run(1).ok


def test_default_store_is_used_when_none_given() -> None:
    cl.Loop(lambda t, a: t, task_type="default").run(1)
    store = cl.default_store()
    assert store.flush()
    assert [e.task_type for e in store.events()] == ["default"]


def test_one_loop_serves_many_threads(store: cl.Store) -> None:
    import threading

    loop = cl.Loop(FixingAgent(fix_after=0), task_type="threads", validators=[positive],
                   executor=Recorder(), verifiers=[lambda i, r: True], store=store)
    ids: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [loop.run(i + 1).trace_id for i in range(300)]
        with lock:
            ids.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 2400
    assert store.flush()
    assert {e.trace_id for e in store.events()} == set(ids)


def test_fault_control_is_on_by_default_and_halts_on_repeated_verification_failure(
    store: cl.Store,
) -> None:
    executor = Recorder()
    loop = cl.Loop(lambda t, a: t, task_type="flaky", executor=executor,
                   verifiers=[lambda i, r: "instance type differs"], store=store)
    outcomes = [loop.run(i).outcome for i in range(8)]
    assert outcomes[:5] == [cl.Outcome.FAILED] * 5
    assert outcomes[5:] == [cl.Outcome.HALTED] * 3
    assert len(executor.calls) == 5  # nothing runs once halted
    # the halt lives with the store: another loop on it is halted too, until resumed
    again = cl.Loop(lambda t, a: t, task_type="flaky", executor=executor, store=store)
    assert again.run(1).outcome is cl.Outcome.HALTED
    assert cl.Loop(lambda t, a: t, task_type="flaky", guards=(), store=store).run(1).ok


def test_the_agent_gets_the_loops_backpressure(memory_store: cl.Store) -> None:
    from closedloop.control import Backpressure

    limiter = Backpressure()

    def agent(task: int, attempt: cl.Attempt) -> int:
        assert attempt.backpressure is not None
        result: int = attempt.backpressure.call("provider/model", lambda: task * 2)
        return result

    loop = cl.Loop(agent, task_type="t", backpressure=limiter, store=memory_store)
    assert loop.run(21).proposal == 42


async def test_a_cancelled_step_unwinds_cleanly(memory_store: cl.Store) -> None:
    started = asyncio.Event()

    async def agent(task: int, attempt: cl.Attempt) -> int:
        started.set()
        await asyncio.sleep(3600)
        return task

    loop = cl.Loop(agent, task_type="t", store=memory_store)
    step = asyncio.create_task(loop.arun(1))
    await started.wait()
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    assert cl.current_attempt() is None
    # the loop is still usable, and the cancelled step left nothing half-done behind
    async def quick(task: int, attempt: cl.Attempt) -> int:
        return task

    assert (await cl.Loop(quick, task_type="t", store=memory_store).arun(2)).ok


def test_a_loop_with_its_own_store_never_opens_the_default_one(
    memory_store: cl.Store, tmp_path: Path
) -> None:
    cl.Loop(lambda t, a: t, task_type="t", store=memory_store).run(1)
    assert not (tmp_path / "default.db").exists()  # conftest points the default there


def drive(loop: cl.Loop, task_input: Any) -> tuple[list[Action], cl.StepResult[Any, Any]]:
    """Run a loop's state machine by hand, as a driver does, keeping every action it yields."""
    seen: list[Action] = []
    machine = step_machine(loop._spec, task_input, "0" * 32)
    try:
        action = next(machine)
        while True:
            seen.append(action)
            action = machine.send(action.fn(*action.args))
    except StopIteration as stop:
        return seen, stop.value


class Admitting:
    def admit(self, task_type: str) -> None:
        return None

    def observe(self, event: cl.StepEvent) -> None:
        return None


def test_the_machine_names_the_stage_and_check_of_every_call(memory_store: cl.Store) -> None:
    def agent(task: int, attempt: cl.Attempt) -> int:
        return task

    def matches(intent: int, result: str) -> bool:
        return result == f"id-{intent}"

    guard, executor = Admitting(), Recorder()
    loop = cl.Loop(agent, task_type="t", validators=[positive], executor=executor,
                   verifiers=[matches], guards=[guard], store=memory_store)
    actions, result = drive(loop, 4)
    assert result.ok
    assert [type(a) for a in actions] == [Admit, Propose, Validate, Level, Act, Verify]
    assert [a.stage for a in actions] == ["admit", "propose", "validate", "level", "act",
                                          "verify"]
    admit, propose, validate, level, act, verify = actions
    assert isinstance(level, Level) and level.args == (4,)  # the stored level, before the gate
    assert isinstance(admit, Admit) and admit.guard is guard and admit.args == ("t",)
    assert isinstance(propose, Propose) and propose.fn is agent
    assert propose.args[0] == 4 and propose.attempt.task_type == "t"
    assert isinstance(validate, Validate)
    assert (validate.check, validate.fn, validate.args) == ("positive", positive, (4,))
    assert isinstance(act, Act) and (act.fn, act.args) == (executor, (4,))
    assert isinstance(verify, Verify)
    assert (verify.check, verify.fn, verify.args) == (matches.__qualname__, matches, (4, "id-4"))


def test_the_approvers_call_is_a_gate_action(memory_store: cl.Store) -> None:
    def approver(task: int, proposal: int) -> bool:
        return True

    loop = cl.Loop(lambda t, a: t + 1, task_type="t", executor=Recorder(), guards=(),
                   autonomy="approve", approver=approver, store=memory_store)
    actions, result = drive(loop, 1)
    assert result.outcome is cl.Outcome.SUCCEEDED
    gate = actions[1]
    assert isinstance(gate, Approve) and gate.stage == "gate"
    assert (gate.fn, gate.args) == (approver, (1, 2))


def test_an_action_cannot_be_changed_by_an_observer(memory_store: cl.Store) -> None:
    actions, _ = drive(cl.Loop(lambda t, a: t, task_type="t", guards=(), store=memory_store), 1)
    with pytest.raises(AttributeError):
        actions[0].fn = print  # type: ignore[misc]


def test_passing_verdicts_name_their_check(memory_store: cl.Store) -> None:
    def present(intent: int, result: str) -> bool:
        return True

    result = cl.Loop(lambda t, a: t, task_type="t", validators=[positive], executor=Recorder(),
                     verifiers=[present], store=memory_store).run(1)
    assert [(v.check, v.passed, v.issues) for v in result.validation] == [
        ("positive", True, ())]
    assert [(v.check, v.passed, v.issues) for v in result.verification] == [
        (present.__qualname__, True, ())]


# ---- a step is data: ids, parent and run, versions, labels, model, cost, the proposal ----------

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_every_step_has_its_own_step_id_also_within_one_trace(memory_store: cl.Store) -> None:
    loop = cl.Loop(lambda t, a: t, task_type="t", store=memory_store, guards=())
    results = [loop.run(i) for i in range(50)]
    ids = [r.step_id for r in results]
    assert all(i is not None and HEX32.fullmatch(i) for i in ids)
    assert len(set(ids)) == 50
    assert [e.step_id for e in events(memory_store)] == ids


def test_a_step_run_by_another_steps_hook_is_its_child_and_joins_its_run(
        memory_store: cl.Store) -> None:
    inner = cl.Loop(lambda t, a: t, task_type="inner", store=memory_store, guards=())
    seen: dict[str, Any] = {}

    def agent(task: str, attempt: cl.Attempt) -> str:
        seen["agent"] = inner.run(task)
        seen["current"] = cl.loop.current_step_id()
        return task

    def executor(proposal: str) -> str:
        seen["executor"] = inner.run(proposal)
        return proposal

    outer = cl.Loop(agent, task_type="outer", executor=executor, store=memory_store, guards=())
    result = outer.run("x", run_id="run-1")
    assert seen["current"] == result.step_id
    assert seen["agent"].event.parent_step_id == result.step_id
    assert seen["executor"].event.parent_step_id == result.step_id
    assert seen["agent"].event.run_id == seen["executor"].event.run_id == "run-1"
    assert result.event is not None and result.event.parent_step_id is None
    assert cl.loop.current_step_id() is None  # the step is over
    # a step started after it (not inside it) has no parent
    assert inner.run("y").event.parent_step_id is None  # type: ignore[union-attr]


async def test_async_nested_steps_find_their_parent_and_concurrent_steps_do_not_mix(
        memory_store: cl.Store) -> None:
    inner = cl.Loop(lambda t, a: t, task_type="inner", store=memory_store, guards=())

    async def agent(task: int, attempt: cl.Attempt) -> int:
        await asyncio.sleep(0)
        nested = await inner.arun(task)
        await asyncio.sleep(0)
        assert nested.event is not None
        return task if nested.event.parent_step_id == attempt.step_id else -1

    outer = cl.Loop(agent, task_type="outer", validators=[positive], store=memory_store,
                    guards=())
    results = await asyncio.gather(*(outer.arun(i, run_id=f"r{i}") for i in range(1, 21)))
    assert all(r.ok for r in results)
    by_parent = {e.parent_step_id: e for e in events(memory_store) if e.task_type == "inner"}
    for i, r in enumerate(results, start=1):
        assert by_parent[r.step_id].run_id == f"r{i}"


def test_a_nested_step_can_name_its_own_run(memory_store: cl.Store) -> None:
    inner = cl.Loop(lambda t, a: t, task_type="inner", store=memory_store, guards=())
    outer = cl.Loop(lambda t, a: inner.run(t, run_id="own").event, task_type="outer",
                    store=memory_store, guards=())
    child = outer.run("x", run_id="parent").proposal
    assert isinstance(child, cl.StepEvent)
    assert child.run_id == "own" and child.parent_step_id is not None


def test_versions_and_labels_are_recorded_and_call_labels_add_to_the_loops(
        memory_store: cl.Store) -> None:
    loop = cl.Loop(lambda t, a: t, task_type="t", store=memory_store, guards=(),
                   agent_version="agent-2.1", prompt_version="p7",
                   labels={"tier": "gold", "region": "eu"})
    first = loop.run(1)
    second = loop.run(2, labels={"region": "us", "experiment": "b"})
    assert first.event is not None and second.event is not None
    assert (first.event.agent_version, first.event.prompt_version) == ("agent-2.1", "p7")
    assert first.event.labels == {"tier": "gold", "region": "eu"}
    assert second.event.labels == {"tier": "gold", "region": "us", "experiment": "b"}
    assert loop.run(3).event.labels == {"tier": "gold", "region": "eu"}  # type: ignore[union-attr]
    assert first.event.labels is not second.event.labels


@pytest.mark.parametrize(("labels", "message"), [
    ({f"k{i}": "v" for i in range(17)}, "at most 16 labels per step, got 17"),
    ({"bad key": "v"}, "label name 'bad key' must be a name"),
    ({"k" * 65: "v"}, "at most 64 characters"),
    ({"tier": 3}, "label 'tier' must be a string, got int"),
    ({"tier": "x" * 129}, "label 'tier' is 129 characters long, at most 128"),
    (["tier"], "labels must be a mapping"),
])
def test_bad_labels_are_one_line_config_errors_before_anything_runs(
        labels: Any, message: str) -> None:
    ran: list[int] = []
    with pytest.raises(cl.ConfigError, match=re.escape(message)):
        cl.Loop(lambda t, a: ran.append(t), task_type="t", store=None, labels=labels)
    loop = cl.Loop(lambda t, a: ran.append(t), task_type="t", store=None, guards=())
    with pytest.raises(cl.ConfigError, match=re.escape(message)) as caught:
        loop.run(1, labels=labels)
    assert "\n" not in str(caught.value) and ran == []


def test_labels_of_loop_and_call_together_are_bounded() -> None:
    loop = cl.Loop(lambda t, a: t, task_type="t", store=None, guards=(),
                   labels={f"a{i}": "v" for i in range(10)})
    with pytest.raises(cl.ConfigError, match="at most 16 labels per step, got 17"):
        loop.run(1, labels={f"b{i}": "v" for i in range(7)})


@pytest.mark.parametrize("kwargs", [{"agent_version": ""}, {"prompt_version": "x" * 201},
                                    {"agent_version": "a\nb"}, {"prompt_version": 7}])
def test_bad_versions_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(cl.ConfigError, match="must be a non-empty printable string"):
        cl.Loop(lambda t, a: t, task_type="t", store=None, **kwargs)


def test_a_bad_run_id_is_a_config_error() -> None:
    loop = cl.Loop(lambda t, a: t, task_type="t", store=None, guards=())
    with pytest.raises(cl.ConfigError, match="run_id must be a non-empty printable string"):
        loop.run(1, run_id="")


def test_model_provider_cached_tokens_and_cost_reported_by_the_agent_are_recorded(
        memory_store: cl.Store) -> None:
    def agent(task: int, attempt: cl.Attempt) -> int:
        attempt.record_usage(100, 10, cached_input_tokens=60, cost_usd=0.25, model="small",
                             provider="acme")
        attempt.record_usage(50, 5, cached_input_tokens=20, cost_usd=0.5, model="big")
        return task

    event = cl.Loop(agent, task_type="t", store=memory_store, guards=()).run(1).event
    assert event is not None
    assert (event.input_tokens, event.output_tokens, event.cached_input_tokens) == (150, 15, 80)
    assert (event.model, event.provider, event.cost_usd) == ("big", "acme", 0.75)
    plain = cl.Loop(lambda t, a: t, task_type="t", store=None, guards=()).run(1).event
    assert plain is not None
    assert (plain.model, plain.provider, plain.cost_usd, plain.cached_input_tokens) == (
        None, None, None, 0)


def test_the_proposal_is_recorded_as_canonical_json_with_its_digest(
        memory_store: cl.Store) -> None:
    import hashlib
    import json

    proposals = iter([{"b": [1, 2], "a": "ü"}, {"a": "ü", "b": [1, 2]}, {"a": "ü", "b": [2, 1]}])
    loop = cl.Loop(lambda t, a: next(proposals), task_type="t", store=memory_store, guards=())
    first, same, other = (loop.run(i).event for i in range(3))
    assert first is not None and same is not None and other is not None
    assert first.proposal == '{"a":"ü","b":[1,2]}'
    assert json.loads(first.proposal) == {"a": "ü", "b": [1, 2]}
    assert first.proposal_digest == hashlib.sha256(first.proposal.encode()).hexdigest()
    assert same.proposal_digest == first.proposal_digest  # dict order does not matter
    assert other.proposal_digest != first.proposal_digest


def test_the_digest_is_over_the_unredacted_proposal_the_stored_text_is_redacted(
        memory_store: cl.Store) -> None:
    passwords = iter(["hunter2", "hunter3"])
    loop = cl.Loop(lambda t, a: {"db": {"password": next(passwords)}}, task_type="t",
                   store=memory_store, guards=())
    one, two = loop.run(1).event, loop.run(2).event
    assert one is not None and two is not None
    assert one.proposal_digest != two.proposal_digest  # an approval of one is not of the other
    stored = events(memory_store)
    assert [e.proposal for e in stored] == ['{"db":{"password":"[REDACTED:secret]"}}'] * 2
    assert [e.proposal_digest for e in stored] == [one.proposal_digest, two.proposal_digest]


def test_proposals_json_cannot_hold_are_recorded_all_the_same() -> None:
    import dataclasses

    @dataclasses.dataclass
    class Plan:
        name: str
        tags: frozenset[str]

    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    texts = iter([Plan("web", frozenset({"b", "a"})), {1: "int key", "a": "str key"}, cyclic,
                   "plain text", 42])
    loop = cl.Loop(lambda t, a: next(texts), task_type="t", store=None, guards=())
    got = [loop.run(i).event.proposal for i in range(5)]  # type: ignore[union-attr]
    assert got == ['{"name":"web","tags":["a","b"]}',
                   json_string(repr({1: "int key", "a": "str key"})),
                   json_string("{'self': {...}}"), '"plain text"', "42"]


def json_string(text: str) -> str:
    import json

    return json.dumps(text, ensure_ascii=False)


def test_no_proposal_no_digest(memory_store: cl.Store) -> None:
    def agent(task: int, attempt: cl.Attempt) -> int:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError):
        cl.Loop(agent, task_type="t", store=memory_store, guards=()).run(1)
    (event,) = events(memory_store)
    assert (event.proposal, event.proposal_digest) == (None, None)
    assert event.step_id is not None


def test_step_ids_of_a_forked_child_are_its_own() -> None:
    import os

    from closedloop.loop import new_step_id

    parent = new_step_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, new_step_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert HEX32.fullmatch(child)
    assert child[:20] != parent[:20]  # another process prefix, not the parent's counter


def test_an_agents_exception_names_the_step_it_was_recorded_as(memory_store: cl.Store) -> None:
    def agent(task: int, attempt: cl.Attempt) -> int:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError) as caught:
        cl.Loop(agent, task_type="t", store=memory_store, guards=()).run(1)
    (event,) = events(memory_store)
    assert caught.value.__notes__ == [
        f"closedloop: recorded as step {event.step_id} of trace {event.trace_id} (t)"]


def test_every_event_field_holds_its_own_value(memory_store: cl.Store) -> None:
    # The machine builds the event field by field: each field gets a value no other field
    # has, so that two values swapped (or shifted) fail here.
    now = [100.0]

    def clock() -> float:
        return now[0]

    def agent(task: str, attempt: cl.Attempt) -> dict[str, int]:
        now[0] += 1.0
        attempt.record_usage(7, 3, cached_input_tokens=2, cost_usd=0.5, model="m-1",
                             provider="p-1")
        return {"n": 1 if attempt.number == 1 else 2}

    def validator(proposal: dict[str, int]) -> str | None:
        now[0] += 3.0
        return "odd" if proposal["n"] == 1 else None

    def executor(proposal: dict[str, int]) -> str:
        now[0] += 5.0
        return "done"

    def verifier(task: str, result: str) -> str:
        now[0] += 7.0
        return "drifted"

    inner = cl.Loop(agent, task_type="inner-type", validators=[validator], executor=executor,
                    verifiers=[verifier], store=memory_store, guards=(), clock=clock,
                    wallclock=lambda: 1_700_000_000.5, agent_id="agent-x",
                    agent_version="a-1", prompt_version="pv-1", labels={"tier": "gold"})
    results: list[cl.StepResult[Any, Any]] = []
    parents: list[cl.Attempt] = []

    def outer_agent(task: str, attempt: cl.Attempt) -> str:
        results.append(inner.run(task, run_id="run-1"))
        parents.append(attempt)
        return task

    cl.Loop(outer_agent, task_type="outer", store=None, guards=()).run("task")
    (result,), (parent,) = results, parents
    event = result.event
    assert event is not None
    proposal = '{"n":2}'
    detail = event.detail
    assert detail is not None and set(detail) == {"attempts", "verification"}
    assert event._asdict() == {
        "ts": 1_700_000_000.5, "trace_id": result.trace_id, "agent_id": "agent-x",
        "task_type": "inner-type", "autonomy": "autonomous", "outcome": "failed",
        "attempts": 2, "input_tokens": 14, "output_tokens": 6, "latency_ms": 20_000.0,
        "validation_passed": True, "verification_passed": False,
        "error_type": "verification", "error_message": result.error_message,
        "propose_ms": 2_000.0, "validate_ms": 6_000.0, "act_ms": 5_000.0,
        "verify_ms": 7_000.0, "detail": detail, "step_id": result.step_id,
        "parent_step_id": parent.step_id, "run_id": "run-1", "model": "m-1",
        "provider": "p-1", "agent_version": "a-1", "prompt_version": "pv-1",
        "labels": {"tier": "gold"}, "cached_input_tokens": 4, "cost_usd": 1.0,
        "proposal": proposal, "proposal_digest": hashlib.sha256(proposal.encode()).hexdigest(),
    }
    assert result.error_message is not None and result.error_message.endswith("drifted")
    assert len(set(map(str, event))) == len(event)  # every value differs from the others
    assert result.step_id is not None and result.step_id != parent.step_id


def test_the_hot_path_builders_equal_the_dataclass_constructors() -> None:
    # new_result and new_attempt set the slots themselves: a field added to StepResult or
    # Attempt must be set there too, with the same value the constructor gives it.
    import dataclasses

    from closedloop.loop._result import new_attempt, new_result

    values: dict[str, Any] = {f.name: f"value of {f.name}" for f in
                              dataclasses.fields(cl.StepResult)}
    built = new_result(**values)
    assert built == cl.StepResult(**values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.outcome = cl.Outcome.FAILED  # type: ignore[misc]
    attempt = new_attempt("trace", "task", None, "step")
    expected = cl.Attempt(number=1, trace_id="trace", task_type="task", backpressure=None,
                          step_id="step")
    assert [getattr(attempt, f.name) for f in dataclasses.fields(cl.Attempt)] == [
        getattr(expected, f.name) for f in dataclasses.fields(cl.Attempt)]


def test_a_results_and_an_events_json_carry_the_step(memory_store: cl.Store) -> None:
    import json

    loop = cl.Loop(lambda t, a: {"n": t}, task_type="t", store=memory_store, guards=(),
                   labels={"tier": "gold"}, agent_version="v1")
    result = loop.run(1, run_id="r")
    assert result.to_dict()["step_id"] == result.step_id
    assert result.event is not None
    shown = json.loads(json.dumps(result.event.to_dict()))
    assert {k: shown[k] for k in ("step_id", "run_id", "labels", "agent_version", "proposal",
                                  "proposal_digest")} == {
        "step_id": result.step_id, "run_id": "r", "labels": {"tier": "gold"},
        "agent_version": "v1", "proposal": '{"n":1}',
        "proposal_digest": result.event.proposal_digest}


def test_a_guard_that_only_observes_is_not_asked_to_admit(memory_store: cl.Store) -> None:
    # `observe_only = True` says its admit never refuses: the loop saves the call, and the
    # guard still sees every event
    class Watcher:
        observe_only = True

        def __init__(self) -> None:
            self.admits = 0
            self.seen: list[str] = []

        def admit(self, task_type: str) -> None:
            self.admits += 1

        def observe(self, event: cl.StepEvent) -> None:
            self.seen.append(event.outcome)

    watcher, asked = Watcher(), Admitting()
    loop = cl.Loop(lambda task, attempt: task, task_type="t", executor=lambda p: p,
                   guards=[watcher, asked], store=memory_store)
    actions, result = drive(loop, 1)
    assert result.ok
    assert [a.guard for a in actions if isinstance(a, Admit)] == [asked]
    assert loop.run(2).ok
    assert watcher.admits == 0 and watcher.seen == ["succeeded", "succeeded"]


class _Awaitable:
    """An awaitable that is not a coroutine (its class has ``__await__``)."""

    def __await__(self) -> Any:
        yield from ()
        return 1


def test_a_hook_returning_an_awaitable_object_is_a_config_error_every_time(
        memory_store: cl.Store) -> None:
    # the driver remembers the types that are not awaitable; an awaitable type never is
    def agent(task: int, attempt: cl.Attempt) -> Any:
        return task if task < 2 else _Awaitable()

    loop = cl.Loop(agent, task_type="t", store=memory_store)
    assert loop.run(1).ok
    for _ in range(2):
        with pytest.raises(cl.ConfigError, match="arun"):
            loop.run(2)
    assert loop.run(1).ok
