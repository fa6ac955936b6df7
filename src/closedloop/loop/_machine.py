"""The closed loop's decision logic, written once, with no I/O.

:func:`step_machine` is a generator: it yields ``(callable, args)`` for every call into user
code (agent, validators, approver, executor, verifiers) and is resumed with the call's
return value, or has the call's exception thrown into it. The sync and async drivers in
:mod:`closedloop.loop._loop` only make those calls; every decision — re-ask, gate, verdicts,
timings, the recorded event — is made here, so both paths behave identically.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from closedloop._events import ErrorType, Outcome, StepEvent
from closedloop._redact import clip
from closedloop._verdict import Verdict, as_verdict, render_feedback
from closedloop.autonomy import Autonomy
from closedloop.loop._guard import Admission, StepGuard
from closedloop.loop._result import Attempt, StepResult, _current_attempt

Call = tuple[Callable[..., Any], tuple[Any, ...]]
StepGen = Generator[Call, Any, StepResult[Any, Any]]

_MAX_MESSAGE = 2000
# Enum ``.value`` goes through a descriptor (~0.5 µs on 3.11); a dict lookup does not.
_VALUE: dict[Enum, str] = {m: m.value for e in (Outcome, ErrorType, Autonomy) for m in e}
_log = logging.getLogger("closedloop")
_warned: dict[tuple[str, bool], float] = {}


def _warn_now(task_type: str, fail_open: bool, now: float) -> bool:
    """At most one admission warning per task type and policy every 10 s (outages are long)."""
    key = (task_type, fail_open)
    if now - _warned.get(key, float("-inf")) < 10.0:
        return False
    _warned[key] = now
    return True


@dataclass(frozen=True, slots=True)
class StepSpec:
    """Everything a step needs, resolved once when the :class:`~closedloop.Loop` is built."""

    agent: Callable[..., Any]
    agent_id: str
    task_type: str
    validators: Sequence[tuple[str, Callable[..., Any]]]
    executor: Callable[..., Any] | None
    verifiers: Sequence[tuple[str, Callable[..., Any]]]
    autonomy: Autonomy
    approver: Callable[..., Any] | None
    max_attempts: int
    record: Callable[[StepEvent], object] | None
    guards: Sequence[StepGuard]
    backpressure: Any
    clock: Callable[[], float]
    wallclock: Callable[[], float]
    fail_open: bool = False
    """Admit when a guard cannot decide (raises) instead of refusing: an explicit opt-in."""


def new_trace_id() -> str:
    """A W3C/OpenTelemetry-compatible 128-bit trace id (32 lowercase hex digits)."""
    return f"{random.getrandbits(128):032x}"


def _describe(exc: BaseException) -> str:
    return clip(f"{type(exc).__name__}: {exc}", _MAX_MESSAGE)  # redacted before the cut


def _verdict_message(verdicts: Sequence[Verdict]) -> str:
    parts: list[str] = []
    for v in verdicts:
        if v.passed:
            continue
        if v.unknown is not None:
            parts.append(f"{v.check}: unknown: {v.unknown}")
        parts.extend(f"{v.check}: {i.render()}" for i in v.blocking_issues)
    return clip("; ".join(parts), _MAX_MESSAGE)


def _failed(verdicts: Sequence[Verdict]) -> list[dict[str, Any]]:
    return [v.to_dict() for v in verdicts if not v.passed or v.issues]


def step_machine(spec: StepSpec, task_input: Any, trace_id: str) -> StepGen:
    """Run one step: admit → propose → validate (re-ask) → gate → act → verify → record.

    Guards see the recorded event (``observe``) right after it is recorded, also when the
    agent or executor raised, so that fault control sees every step.
    """
    clock = spec.clock
    started = clock()
    ts = spec.wallclock()
    attempt = Attempt(number=1, trace_id=trace_id, task_type=spec.task_type,
                      backpressure=spec.backpressure)
    propose_s = validate_s = act_s = verify_s = 0.0
    history: list[dict[str, Any]] = []
    proposal: Any = None
    result: Any = None
    verdicts: list[Verdict] = []
    checked: list[Verdict] = []
    validation_passed: bool | None = None
    verification_passed: bool | None = None
    admitted_open: list[str] = []  # guards that could not decide, admitted by fail_open

    def finish(
        outcome: Outcome,
        error_type: ErrorType | None = None,
        error_message: str | None = None,
        exception: BaseException | None = None,
    ) -> StepResult[Any, Any]:
        detail: dict[str, Any] | None = None
        # failing verdicts, and passing ones that carry warnings (e.g. "converged after 3 s")
        noted = _failed(checked) if checked else None
        if history or exception is not None or noted or admitted_open:
            detail = {}
            if admitted_open:
                detail["fail_open"] = admitted_open
            if history:
                detail["attempts"] = history
            if noted:
                detail["verification"] = noted
            if exception is not None:
                detail["exception"] = {"type": type(exception).__qualname__,
                                       "module": type(exception).__module__,
                                       "message": clip(str(exception), _MAX_MESSAGE)}
        event = StepEvent(
            ts, trace_id, spec.agent_id, spec.task_type, _VALUE[spec.autonomy], _VALUE[outcome],
            attempt.number, attempt.input_tokens, attempt.output_tokens,
            (clock() - started) * 1000.0, validation_passed, verification_passed,
            _VALUE[error_type] if error_type is not None else None, error_message,
            propose_s * 1000.0, validate_s * 1000.0, act_s * 1000.0, verify_s * 1000.0, detail,
        )
        if spec.record is not None:
            try:
                spec.record(event)
            except Exception:  # noqa: BLE001 - telemetry must never break the agent's step
                _log.exception("closedloop: recording step %s failed", trace_id)
        for guard in spec.guards:
            try:
                guard.observe(event)
            except Exception:  # noqa: BLE001 - fault-control bookkeeping must not break a step
                _log.exception("closedloop: guard %r failed to observe step %s", guard, trace_id)
        if exception is not None:
            exception.add_note(f"closedloop: recorded as step {trace_id} ({spec.task_type})")
        return StepResult(
            trace_id=trace_id, outcome=outcome, proposal=proposal, result=result,
            attempts=attempt.number, validation=tuple(verdicts), verification=tuple(checked),
            error_type=error_type, error_message=error_message, event=event,
        )

    # guards (pause / halt / fault control) may refuse the step before the agent runs; a
    # guard that cannot decide refuses it too (fail closed), unless the loop opted out
    for guard in spec.guards:
        try:
            refusal: Admission | None = yield guard.admit, (spec.task_type,)
        except Exception as exc:  # noqa: BLE001 - a guard that cannot decide refuses
            why = f"admission could not be decided: {_describe(exc)}"
            if _warn_now(spec.task_type, spec.fail_open, clock()):
                _log.warning("closedloop: %s; %s steps of %s (this warning repeats at most "
                             "every 10 s)", why, "ADMITTING (fail_open=True)" if spec.fail_open
                             else "refusing (fail closed)", spec.task_type)
            if spec.fail_open:
                admitted_open.append(why)
                continue
            refusal = Admission.unavailable(why)
        if refusal is not None:
            attempt.number = 0
            return finish(refusal.outcome, refusal.error_type, refusal.reason)

    # propose → validate, re-asking with feedback up to max_attempts
    while True:
        t = clock()
        token = _current_attempt.set(attempt)
        try:
            proposal = yield spec.agent, (task_input, attempt)
        except Exception as exc:
            propose_s += clock() - t
            finish(Outcome.ERROR, ErrorType.AGENT, _describe(exc), exc)
            raise
        finally:
            _current_attempt.reset(token)
        now = clock()
        propose_s += now - t
        verdicts = []
        for name, check in spec.validators:
            t = now
            try:
                verdict = as_verdict((yield check, (proposal,)), name)
            except Exception as exc:  # noqa: BLE001 - a crashed validator is its own error type
                now = clock()
                validate_s += now - t
                verdicts.append(Verdict.cannot_tell(f"validator crashed: {_describe(exc)}",
                                                    check=name))
                validation_passed = False
                history.append({"attempt": attempt.number, "verdicts": _failed(verdicts)})
                return finish(Outcome.ERROR, ErrorType.VALIDATOR_ERROR,
                              f"{name}: {_describe(exc)}")
            now = clock()
            validate_s += now - t
            verdicts.append(verdict)
        failing = [v for v in verdicts if not v.passed]
        if not failing:
            validation_passed = True if verdicts else None  # None: nothing was validated
            if any(v.issues for v in verdicts):
                history.append({"attempt": attempt.number, "verdicts": _failed(verdicts)})
            break
        validation_passed = False
        history.append({"attempt": attempt.number, "verdicts": _failed(verdicts)})
        if any(v.critical for v in failing):
            return finish(Outcome.BLOCKED, ErrorType.BLOCKED, _verdict_message(failing))
        if attempt.number >= spec.max_attempts:
            return finish(Outcome.FAILED, ErrorType.VALIDATION, _verdict_message(failing))
        attempt.feedback = render_feedback(failing)
        attempt.issues = tuple(i for v in failing for i in v.blocking_issues)
        attempt.number += 1

    # gate
    if spec.executor is None:
        return finish(Outcome.SUCCEEDED)
    if spec.autonomy is Autonomy.SUGGEST:
        return finish(Outcome.SUGGESTED)
    if spec.autonomy is Autonomy.APPROVE:
        if spec.approver is None:
            return finish(Outcome.AWAITING_APPROVAL)
        try:
            approved = yield spec.approver, (task_input, proposal)
        except Exception as exc:
            finish(Outcome.ERROR, ErrorType.EXECUTOR, f"approver: {_describe(exc)}", exc)
            raise
        if not approved:
            return finish(Outcome.REJECTED)

    # act
    t = clock()
    try:
        result = yield spec.executor, (proposal,)
    except Exception as exc:
        act_s += clock() - t
        finish(Outcome.ERROR, ErrorType.EXECUTOR, _describe(exc), exc)
        raise
    now = clock()
    act_s += now - t

    # verify: run every verifier and report every mismatch, not just the first
    crashed = False
    for name, check in spec.verifiers:
        t = now
        try:
            verdict = as_verdict((yield check, (task_input, result)), name)
        except Exception as exc:  # noqa: BLE001 - a crashed verifier is its own error type
            verdict = Verdict.cannot_tell(f"verifier crashed: {_describe(exc)}", check=name)
            crashed = True
        now = clock()
        verify_s += now - t
        checked.append(verdict)
    if not checked:
        return finish(Outcome.SUCCEEDED)
    failing = [v for v in checked if not v.passed]
    if not failing:
        verification_passed = True
        return finish(Outcome.SUCCEEDED)
    verification_passed = False
    if crashed:
        return finish(Outcome.ERROR, ErrorType.VERIFIER_ERROR, _verdict_message(failing))
    # a mismatch found by any verifier is a failure, even beside checks that could not tell
    kind = (ErrorType.VERIFICATION if any(v.blocking_issues for v in failing)
            else ErrorType.VERIFICATION_UNKNOWN)
    return finish(Outcome.FAILED, kind, _verdict_message(failing))
