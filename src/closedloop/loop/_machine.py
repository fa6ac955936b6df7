"""The closed loop's decision logic, written once, with no I/O.

:func:`step_machine` is a generator that yields one typed *action* for every call into user
code — :class:`Admit` (a guard), :class:`Propose` (the agent), :class:`Validate`,
:class:`Level` (the stored autonomy level, for a loop that has one), :class:`Assess` (a risk
rule), :class:`Approve` (an inline approver at the gate), :class:`Gate` and :class:`Wait` (the
durable gate's store I/O and its waits), :class:`Act` (the executor), :class:`Verify`,
:class:`Compensate` (a run's rollback) — and is resumed
with the call's return value, or has the call's exception thrown into it. An action is a
small immutable record naming its stage (its type), the check where there is one, the
callable and its arguments: the drivers in :mod:`closedloop.loop._loop` only call
``action.fn(*action.args)``, and observers (tracing, metrics, the approval gate to come)
switch on the action's type instead of guessing the stage from the callable. Every decision —
re-ask, gate, verdicts, timings, the recorded event — is made here, so both drivers behave
identically.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple, TypeAlias

from closedloop._approvals import ApprovalStatus, Risk, as_risk, digest, merge_risks
from closedloop._events import (
    ACT_MS,
    ATTEMPTS,
    AUTONOMY,
    CACHED_INPUT_TOKENS,
    COST_USD,
    DETAIL,
    ERROR_MESSAGE,
    ERROR_TYPE,
    INPUT_TOKENS,
    LABELS,
    LATENCY_MS,
    MODEL,
    OUTCOME,
    OUTPUT_TOKENS,
    PARENT_STEP_ID,
    PROPOSAL,
    PROPOSAL_DIGEST,
    PROPOSE_MS,
    PROVIDER,
    RUN_ID,
    STEP_ID,
    TRACE_ID,
    TS,
    VALIDATE_MS,
    VALIDATION_PASSED,
    VERIFICATION_PASSED,
    VERIFY_MS,
    ErrorType,
    Outcome,
    StepEvent,
    event_row,
    proposal_fields,
    proposal_text,
)
from closedloop._redact import clip
from closedloop._verdict import Issue, Verdict, as_verdict, render_feedback
from closedloop.autonomy import Autonomy
from closedloop.loop._gate import ApprovalGate, Lease, _current_key
from closedloop.loop._guard import Admission, RunScope, StepGuard
from closedloop.loop._result import (
    Attempt,
    StepResult,
    _current_attempt,
    _current_run,
    _current_step,
    new_attempt,
    new_result,
)

# Actions are NamedTuples: immutable, typed, and built on the agent's hot path several times
# per step, where a frozen dataclass would cost twice as much. ``fn`` and ``args`` come first
# in every one of them, so a driver calls any action the same way. The actions of every step
# are made with ``_new(Validate, (fn, args, check))``, the class's own ``__new__`` without its
# Python-level frame (a third of the cost; the same tuple).


class Admit(NamedTuple):
    """Ask one guard whether the step may run: ``guard.admit(task_type)``."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    guard: StepGuard

    @property
    def stage(self) -> str:
        """The stage's name: ``admit``."""
        return "admit"


class Propose(NamedTuple):
    """Ask the agent for a proposal: ``agent(task_input, attempt)``."""

    fn: Callable[..., Any]
    args: tuple[Any, Attempt]

    @property
    def stage(self) -> str:
        """The stage's name: ``propose``."""
        return "propose"

    @property
    def attempt(self) -> Attempt:
        """The attempt the agent is asked to make."""
        return self.args[1]


class Validate(NamedTuple):
    """Check the proposal with one validator: ``validator(proposal)``."""

    fn: Callable[..., Any]
    args: tuple[Any]
    check: str

    @property
    def stage(self) -> str:
        """The stage's name: ``validate``."""
        return "validate"


class Level(NamedTuple):
    """Look up the autonomy level of this proposal: ``levels(proposal) -> (Autonomy, detail)``
    (a loop whose autonomy is not pinned; the detail, if any, goes into the event's
    ``detail["autonomy"]``). Not a stage of its own: it decides the gate's mode."""

    fn: Callable[..., Any]
    args: tuple[Any]

    @property
    def stage(self) -> str:
        """The stage's name: ``level``."""
        return "level"


class Approve(NamedTuple):
    """Ask the approver at the gate: ``approver(task_input, proposal)``."""

    fn: Callable[..., Any]
    args: tuple[Any, Any]

    @property
    def stage(self) -> str:
        """The stage's name: ``gate``."""
        return "gate"


class Assess(NamedTuple):
    """Ask one risk rule whether the proposal is high-stakes: ``rule(proposal)``."""

    fn: Callable[..., Any]
    args: tuple[Any]
    check: str

    @property
    def stage(self) -> str:
        """The stage's name: ``risk``."""
        return "risk"


class Gate(NamedTuple):
    """The durable gate's store I/O: ``what`` is ``request`` (store the approval request),
    ``poll`` (read its decision), ``claim`` (take the fenced lease to execute it) or
    ``finish`` (record the execution's end)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    what: str

    @property
    def stage(self) -> str:
        """The stage's name: ``gate``."""
        return "gate"


class Wait(NamedTuple):
    """Wait ``seconds`` before reading the decision again: ``time.sleep(seconds)`` in
    :meth:`~closedloop.Loop.run`, ``await asyncio.sleep(seconds)`` in ``arun``."""

    fn: Callable[..., Any]
    args: tuple[float]

    @property
    def stage(self) -> str:
        """The stage's name: ``wait``."""
        return "wait"


class Act(NamedTuple):
    """Execute the validated proposal: ``executor(proposal)``."""

    fn: Callable[..., Any]
    args: tuple[Any]

    @property
    def stage(self) -> str:
        """The stage's name: ``act``."""
        return "act"


class Verify(NamedTuple):
    """Compare the real state with the intent: ``verifier(task_input, result)``."""

    fn: Callable[..., Any]
    args: tuple[Any, Any]
    check: str

    @property
    def stage(self) -> str:
        """The stage's name: ``verify``."""
        return "verify"


class Compensate(NamedTuple):
    """Undo an action, or check that it was undone: ``fn(*args)`` (a run's rollback).

    ``check`` is False for the compensation itself, True for its check (a verdict-like
    value, as a verifier returns); ``name`` names the compensation."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    name: str
    check: bool = False

    @property
    def stage(self) -> str:
        """The stage's name: ``compensate``."""
        return "compensate"


Action: TypeAlias = (Admit | Propose | Validate | Level | Assess | Approve | Gate | Wait | Act
                     | Verify | Compensate)
"""Every action the machine yields; observers switch on its type."""
StepGen: TypeAlias = Generator[Action, Any, StepResult[Any, Any]]
ApprovedGen: TypeAlias = Generator[Action, Any, "StepResult[Any, Any] | None"]

_MAX_MESSAGE = 2000
# Enum ``.value`` goes through a descriptor (~0.5 µs on 3.11); a dict lookup does not.
_VALUE: dict[Enum, str] = {m: m.value for e in (Outcome, ErrorType, Autonomy) for m in e}
_RANK = {a: i for i, a in enumerate(Autonomy)}  # suggest < approve < autonomous
_AUTONOMOUS = Autonomy.AUTONOMOUS  # an enum member read from its class costs ~20 local reads
_log = logging.getLogger("closedloop")
_new: Any = tuple.__new__  # see the note on actions above
_warned: dict[tuple[str, bool], float] = {}
_monotonic = time.monotonic  # the process clock the warning throttle reads


def _warn_now(task_type: str, fail_open: bool) -> bool:
    """At most one admission warning per task type and policy every 10 s (outages are long).

    Shared by every loop of the process, so timed by the process's monotonic clock, not by a
    loop's own (injectable) one."""
    key, now = (task_type, fail_open), _monotonic()
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
    """The level every step runs at; for a loop with ``levels``, the level of a step that
    ends before the gate."""
    approver: Callable[..., Any] | None
    max_attempts: int
    record: Callable[[StepEvent], object] | None
    guards: Sequence[StepGuard]
    backpressure: Any
    clock: Callable[[], float]
    wallclock: Callable[[], float]
    fail_open: bool = False
    """Admit when a guard cannot decide (raises) instead of refusing: an explicit opt-in."""
    agent_version: str | None = None
    prompt_version: str | None = None
    labels: dict[str, str] | None = None
    """The loop's labels, checked (:func:`closedloop._events.check_labels`); never mutated."""
    levels: Callable[[Any], tuple[Autonomy, dict[str, Any] | None]] | None = None
    """The stored-level lookup of a loop whose autonomy is not pinned (a :class:`Level`
    action before the gate); ``None``: every step runs at ``autonomy``."""
    risk_rules: Sequence[tuple[str, Callable[..., Any]]] = ()
    """Risk rules: a proposal any of them marks is gated at every level, durably."""
    gate: ApprovalGate | None = None
    """The durable gate's I/O (requests in the loop's store); None: every gated step waits
    as ``awaiting_approval`` with no request (a loop built without one)."""
    cached_level: Callable[[], Autonomy | None] | None = None
    """With ``levels``, its answer when known from memory alone, else None
    (:meth:`closedloop.autonomy.AutonomyLevels.cached_level`): a fresh answer is taken
    without yielding the :class:`Level` action."""
    admissions: tuple[tuple[Admit, Callable[[str], bool] | None], ...] = field(
        init=False, repr=False, compare=False)
    """One :class:`Admit` action per guard, built once (its arguments never change), with
    the guard's ``admits_now`` if it has one (:class:`~closedloop.loop.StepGuard`)."""
    passes: dict[str, Verdict] = field(init=False, repr=False, compare=False)
    """Each check's passing verdict, built once: the verdict of a check returning None/True."""
    event_template: list[Any] = field(init=False, repr=False, compare=False)
    """The row every event of the loop starts from: the loop's own fields set, by name
    (:func:`closedloop._events.event_row`); copied per event, never changed."""

    def __post_init__(self) -> None:
        # a guard that only observes (``observe_only``: its admit never refuses) is not asked
        admissions = tuple((Admit(g.admit, (self.task_type,), g), _admits_now(g))
                           for g in self.guards if not getattr(g, "observe_only", False))
        passes = {name: Verdict(check=name) for name, _ in (*self.validators, *self.verifiers)}
        template = event_row(agent_id=self.agent_id, task_type=self.task_type,
                             agent_version=self.agent_version,
                             prompt_version=self.prompt_version)
        object.__setattr__(self, "admissions", admissions)
        object.__setattr__(self, "passes", passes)
        object.__setattr__(self, "event_template", template)


def _admits_now(guard: StepGuard) -> Callable[[str], bool] | None:
    """The guard's ``admits_now``, when the class that defines its ``admit`` defines it too
    (a subclass overriding ``admit`` alone is always asked)."""
    mro = type(guard).__mro__
    admit = next((c for c in mro if "admit" in c.__dict__), None)
    quick = next((c for c in mro if "admits_now" in c.__dict__), None)
    return getattr(guard, "admits_now", None) if quick is not None and quick is admit else None


def new_trace_id() -> str:
    """A W3C/OpenTelemetry-compatible 128-bit trace id (32 lowercase hex digits).

    The first 48 bits are the Unix time in milliseconds, the other 80 random (as a UUIDv7
    lays them out; W3C asks for the right-most 56 bits to be random). Ids made close in time
    are close in every index keyed by trace id, so a store's B-tree takes new ids at its right
    edge instead of on random pages: 21 % less of PostgreSQL's CPU per ingested loop event
    (BENCHMARKS.md, "Branch pgingest (stop 20)"). The id thus tells when its step started,
    to the millisecond, which the stored event says anyway."""
    # "%032x" formatting costs twice what to_bytes().hex() does
    return ((_time_ns() // 1_000_000) << 80 | _getrandbits(80)).to_bytes(16).hex()


_getrandbits = random.getrandbits
_time_ns = time.time_ns
_step_prefix = ""
_step_counter = itertools.count()
_COUNT_BIT = 1 << 48  # a process's count stays under it (2.8e14 steps)


def _new_step_prefix() -> None:
    """80 random bits for this process's step ids (again in a forked child)."""
    global _step_prefix, _step_counter
    _step_prefix = os.urandom(10).hex()
    _step_counter = itertools.count()


_new_step_prefix()
os.register_at_fork(after_in_child=_new_step_prefix)


def new_step_id() -> str:
    """A step id: 32 lowercase hex digits, unique across processes and machines.

    20 digits are random per process (80 bits, drawn again after ``fork``), 12 count the
    process's steps: a third of what a random 128-bit id costs, unique as long as no two
    of a million processes draw the same 80 bits (odds ~1e-12), and ordered within a
    process."""
    # the count's 12 digits, zero-padded: hex() of it with a 13th bit set, less "0x1"
    return _step_prefix + hex(next(_step_counter) | _COUNT_BIT)[3:]


class StepCall(NamedTuple):
    """What one call of :meth:`~closedloop.Loop.run` adds to the loop's spec."""

    run_id: str | None
    labels: dict[str, str] | None


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


class _Ending(NamedTuple):
    """How a stage ended the step (a stage returns ``None`` to go on to the next one)."""

    outcome: Outcome
    error_type: ErrorType | None = None
    error_message: str | None = None


_SUCCEEDED = _Ending(Outcome.SUCCEEDED)
_AGAIN = _Ending(Outcome.FAILED)  # validation failed, re-ask (never recorded: identity-tested)


def step_machine(spec: StepSpec, task_input: Any, trace_id: str,
                 call: StepCall | None = None, *, claimed: _Step | None = None) -> StepGen:
    """Run one step: admit → propose → validate (re-ask) → gate → act → verify → record.

    Guards see the recorded event (``observe``) right after it is recorded, also when the
    agent or executor raised, so that fault control sees every step. While the step runs,
    it is the context's current step: a step started by one of its hooks is its child.

    One generator for the whole step: the stages every step runs (admit, propose, validate,
    the autonomous act, verify) are written here, in order, and leave their decisions to
    :class:`_Step`'s plain methods; only the gate's rarer paths (risk rules, the approver,
    the durable approval request, an approved request's execution) are generators of their
    own. A nested generator costs a step ~1,500 machine instructions (made, entered,
    returned from) and each action yielded through it a few hundred more.

    ``claimed``: an approved request's step, claimed by :func:`approved_machine`: it is
    executed (under its lease), verified and recorded; nothing before the gate runs again.
    """
    step = _Step(spec, task_input, trace_id, call) if claimed is None else claimed
    token = _current_step.set((step.step_id, step.run_id))
    run, clock, passes = step.run, step.clock, spec.passes
    now = 0.0  # the clock after the last hook call: the next stage's timer starts there
    try:
        if claimed is not None:
            ending = yield from step.execute()
            now = step.mark
        else:
            ending = step.run_admit(run) if run is not None else None
            if ending is None:
                task_type = spec.task_type
                for action, admits_now in spec.admissions:  # admit: guards may refuse it
                    if admits_now is not None and admits_now(task_type):
                        continue  # admitted from the guard's memory: nothing to ask
                    try:
                        refusal: Admission | None = yield action
                    except Exception as exc:  # noqa: BLE001 - a guard that cannot decide
                        refusal = step.undecided(exc)
                    if refusal is not None:
                        ending = step.refused(refusal)
                        break
        if ending is None and claimed is None:
            ending = _AGAIN
            while ending is _AGAIN:  # re-ask with the validators' (or a reviewer's) feedback
                ending = None
                # ----- propose
                attempt = step.attempt
                t = clock()
                attempt_token = _current_attempt.set(attempt)
                try:
                    proposal = yield _new(Propose, (spec.agent, (task_input, attempt)))
                except Exception as exc:
                    step.propose_s += clock() - t
                    step.finish(_Ending(Outcome.ERROR, ErrorType.AGENT, _describe(exc)), exc)
                    raise
                finally:
                    _current_attempt.reset(attempt_token)
                step.proposal = proposal
                now = clock()
                step.propose_s += now - t
                # ----- validate: every validator, their verdicts judged together
                if spec.validators:
                    verdicts: list[Verdict] = []
                    step.verdicts = verdicts
                    clean = True  # every check returned None/True: nothing to judge
                    for name, check in spec.validators:
                        try:
                            value = yield _new(Validate, (check, (proposal,), name))
                            if value is None or value is True:
                                verdicts.append(passes[name])
                            else:
                                verdicts.append(as_verdict(value, name))
                                clean = False
                        except Exception as exc:  # noqa: BLE001 - its own error type
                            ending = step.validator_crashed(name, exc, verdicts)
                            break
                    t, now = now, clock()
                    step.validate_s += now - t
                    if ending is not None:
                        break
                    if clean:
                        step.validation_passed = True
                    else:
                        ending = step.judge(verdicts)
                        if ending is not None:
                            continue  # stopped, or _AGAIN: re-ask
                # ----- gate → act
                if spec.executor is None:
                    ending = _SUCCEEDED
                    break
                if spec.levels is not None:  # the stored level of this proposal
                    cached = spec.cached_level
                    level = cached() if cached is not None else None
                    if level is not None:  # known from memory: nothing to ask
                        step.autonomy = level
                    else:
                        try:
                            step.autonomy, step.leveled = yield _new(Level, (spec.levels,
                                                                             (proposal,)))
                        except Exception as exc:  # noqa: BLE001 - fail closed: never unasked
                            step.unleveled(exc)
                if spec.risk_rules or step.autonomy is not _AUTONOMOUS:
                    ending = yield from step.decide()
                    if ending is not None:
                        continue  # not executed, or _AGAIN: re-ask
                    if step.lease is not None:  # an approved request, claimed: under its key
                        ending = yield from step.execute()
                        now = step.mark
                        break
                t = clock()  # approved inline, or autonomous (every step's path): execute
                try:
                    step.result = yield _new(Act, (spec.executor, (proposal,)))
                except Exception as exc:
                    step.act_s += clock() - t
                    step.finish(_Ending(Outcome.ERROR, ErrorType.EXECUTOR, _describe(exc)), exc)
                    raise
                now = clock()
                step.act_s += now - t
        # ----- verify: every verifier, every mismatch reported (not just the first)
        if ending is None:
            if spec.verifiers:
                checked, intent, result = step.checked, step.task_input, step.result
                clean, crashed = True, False
                for name, check in spec.verifiers:
                    try:
                        value = yield _new(Verify, (check, (intent, result), name))
                        if value is None or value is True:
                            checked.append(passes[name])
                        else:
                            checked.append(as_verdict(value, name))
                            clean = False
                    except Exception as exc:  # noqa: BLE001 - a crashed verifier: its own type
                        checked.append(Verdict.cannot_tell(
                            f"verifier crashed: {_describe(exc)}", check=name))
                        crashed, clean = True, False
                step.verify_s += clock() - now
                if clean:
                    step.verification_passed = True
                    ending = _SUCCEEDED
                else:
                    ending = step.judge_verification(crashed)
            else:
                ending = _SUCCEEDED
        if step.lease is not None:
            yield from step.release(ending)
        result = step.finish(ending)
        if (run is not None and claimed is None and step.verification_passed is False
                and result.event is not None):
            # the run rolls back what this step registered (run.on_rollback, a tool's
            # compensate=); the actions run in the drivers, like every other hook
            rollback = run.compensate(step.step_id, result.event)
            if rollback is not None:
                yield from rollback
        return result
    finally:
        _current_step.reset(token)
        if step.lease is not None:  # cancelled while executing: the lease runs out (crashed)
            step.lease.stop()


def approved_machine(spec: StepSpec, request_id: str | None, by: str) -> ApprovedGen:
    """Execute one approved request of the loop's task type, as a worker: admit → claim →
    act → verify → record. None when the guards refuse for now or there is nothing to
    claim (the request stays approved).

    The claim is fenced and takes the request only while it is approved, so a request
    executes once however many processes run this. The recorded event has the request's
    step and trace ids, autonomy ``approve`` and the real outcome.
    """
    gate = spec.gate
    if gate is None:
        return None
    for action, _ in spec.admissions:
        try:
            refusal: Admission | None = yield action
        except Exception:  # noqa: BLE001 - cannot decide: fail closed, claim nothing
            _log.warning("closedloop: admission could not be decided; approved requests of "
                         "%s wait", spec.task_type, exc_info=True)
            return None
        if refusal is not None:
            return None
    claimed = yield Gate(gate.claim_next, (request_id, spec.task_type, by), "claim")
    if claimed is None:
        return None
    lease, proposal, task_input = claimed
    request = lease.request
    step = _Step(spec, task_input, request.trace_id or new_trace_id(),
                 StepCall(request.run_id, None))
    if request.step_id:
        step.step_id = step.attempt.step_id = request.step_id
    step.proposal, step.lease, step.request_id = proposal, lease, request.request_id
    step.gated = True
    step.validation_passed = True  # validated before it was asked for
    return (yield from step_machine(spec, task_input, step.trace_id, claimed=step))


class _Step:
    """One step's state, shared by its stages; each stage is a generator of actions."""

    __slots__ = ("act_s", "admitted_open", "attempt", "autonomy", "checked", "clock", "gated",
                 "history", "labels", "lease", "leveled", "mark", "noted", "parent_step_id",
                 "proposal", "propose_s", "request_id", "result", "run", "run_id", "spec",
                 "started", "step_id", "task_input", "trace_id", "ts", "validate_s",
                 "validation_passed", "verdicts", "verification_passed", "verify_s")

    def __init__(self, spec: StepSpec, task_input: Any, trace_id: str,
                 call: StepCall | None) -> None:
        self.spec = spec
        self.task_input = task_input
        self.trace_id = trace_id
        self.clock = spec.clock
        self.started = self.clock()
        self.ts = spec.wallclock()
        self.step_id = step_id = new_step_id()
        parent = _current_step.get()
        run: RunScope | None = _current_run.get()
        self.parent_step_id: str | None
        self.run_id: str | None
        if parent is not None:
            self.parent_step_id, self.run_id = parent
        else:
            self.parent_step_id = None
            self.run_id = run.run_id if run is not None else None
        if call is None:
            self.labels = spec.labels
        else:
            self.labels = call.labels
            if call.run_id is not None:
                self.run_id = call.run_id
        # the open run governs the step only if the step is one of its own
        self.run = run if run is not None and run.run_id == self.run_id else None
        self.attempt = new_attempt(trace_id, spec.task_type, spec.backpressure, step_id)
        self.propose_s = self.validate_s = self.act_s = self.verify_s = 0.0
        self.mark = 0.0  # the clock after the last hook call: the next stage's timer starts there
        self.history: list[dict[str, Any]] | None = None  # attempts worth recording
        self.proposal: Any = None
        self.result: Any = None
        self.verdicts: Sequence[Verdict] = ()
        self.checked: list[Verdict] = []
        self.noted: list[dict[str, Any]] | None = None  # verifier verdicts worth recording
        self.validation_passed: bool | None = None
        self.verification_passed: bool | None = None
        self.admitted_open: list[str] | None = None  # guards that could not decide, admitted
        self.autonomy = spec.autonomy  # the gate's level: the stored one, if the loop has levels
        self.leveled: dict[str, Any] | None = None  # how it was resolved, for the event
        self.gated = False  # decided by the durable gate: recorded with autonomy `approve`
        self.lease: Lease | None = None  # the claim of the approved request being executed
        self.request_id: str | None = None  # the durable approval request, if one was made

    # ----- admit (step_machine yields each guard's Admit) ------------------------------------
    def run_admit(self, run: RunScope) -> _Ending | None:
        """The step's run (budgets, halts) may refuse it before any guard or hook runs."""
        try:
            refusal = run.admit(self.spec.task_type)
        except Exception as exc:  # noqa: BLE001 - a run that cannot decide refuses (fail closed)
            refusal = Admission.unavailable(f"run admission could not be decided: "
                                            f"{_describe(exc)}")
        if refusal is None:
            return None
        self.attempt.number = 0
        return _Ending(refusal.outcome, refusal.error_type, refusal.reason)

    def undecided(self, exc: Exception) -> Admission | None:
        """A guard could not decide: refuse the step (fail closed), or admit it when the loop
        opted out (``fail_open``; noted in the event's detail)."""
        spec = self.spec
        task_type = spec.task_type
        why = f"admission could not be decided: {_describe(exc)}"
        if _warn_now(task_type, spec.fail_open):
            _log.warning("closedloop: %s; %s steps of %s (this warning repeats at most "
                         "every 10 s)", why, "ADMITTING (fail_open=True)"
                         if spec.fail_open else "refusing (fail closed)", task_type)
        if spec.fail_open:
            if self.admitted_open is None:
                self.admitted_open = []
            self.admitted_open.append(why)
            return None
        return Admission.unavailable(why)

    def refused(self, refusal: Admission) -> _Ending:
        """A guard refused the step before the agent ran."""
        self.attempt.number = 0
        return _Ending(refusal.outcome, refusal.error_type, refusal.reason)

    # ----- validate (step_machine yields each validator's Validate) -----------------------
    def validator_crashed(self, name: str, exc: Exception, verdicts: list[Verdict]) -> _Ending:
        """A validator raised: the step stops with its own error type (no re-ask)."""
        verdicts.append(Verdict.cannot_tell(f"validator crashed: {_describe(exc)}", check=name))
        self.validation_passed = False
        self._note(verdicts)
        return _Ending(Outcome.ERROR, ErrorType.VALIDATOR_ERROR, f"{name}: {_describe(exc)}")

    def judge(self, verdicts: list[Verdict]) -> _Ending | None:
        """Verdicts that were not all clean: pass (None), stop (a critical issue, the last
        attempt) or prepare the re-ask (``_AGAIN``)."""
        attempt = self.attempt
        failing = [v for v in verdicts if not v.passed]
        if not failing:
            self.validation_passed = True
            if any(v.issues for v in verdicts):
                self._note(verdicts)
            return None
        self.validation_passed = False
        self._note(verdicts)
        if any(v.critical for v in failing):
            return _Ending(Outcome.BLOCKED, ErrorType.BLOCKED, _verdict_message(failing))
        if attempt.number >= self.spec.max_attempts:
            return _Ending(Outcome.FAILED, ErrorType.VALIDATION, _verdict_message(failing))
        attempt.feedback = render_feedback(failing)
        attempt.issues = tuple(i for v in failing for i in v.blocking_issues)
        attempt.number += 1
        return _AGAIN

    def _note(self, verdicts: Sequence[Verdict]) -> None:
        """Keep this attempt's failing verdicts (and warnings) for the event's detail."""
        entry = {"attempt": self.attempt.number, "verdicts": _failed(verdicts)}
        if self.history is None:
            self.history = [entry]
        else:
            self.history.append(entry)

    # ----- gate → act -------------------------------------------------------------------------
    def unleveled(self, exc: Exception) -> None:
        """The stored level could not be read: fail closed, never without a human."""
        self.autonomy = min(self.spec.autonomy, Autonomy.APPROVE, key=_RANK.__getitem__)
        self.leveled = {"source": "unreadable", "error": _describe(exc)}

    def decide(self) -> Generator[Action, Any, _Ending | None]:
        """The gate: None lets the executor run (approved inline, or a claimed request)."""
        spec = self.spec
        risk: dict[str, Any] | None = None
        if spec.risk_rules:
            assessed = yield from self.assess()
            if isinstance(assessed, _Ending):
                return assessed
            risk = assessed
        if self.autonomy is Autonomy.SUGGEST:
            return _Ending(Outcome.SUGGESTED)
        if risk is not None or (self.autonomy is Autonomy.APPROVE and spec.approver is None):
            return (yield from self.gate(risk))
        if self.autonomy is Autonomy.APPROVE and spec.approver is not None:
            try:
                approved = yield Approve(spec.approver, (self.task_input, self.proposal))
            except Exception as exc:
                self.finish(_Ending(Outcome.ERROR, ErrorType.EXECUTOR,
                                    f"approver: {_describe(exc)}"), exc)
                raise
            if not approved:
                return _Ending(Outcome.REJECTED)
        return None

    def execute(self) -> Generator[Action, Any, _Ending | None]:
        """Run the executor (with the approval request's id as the idempotency key, when one
        was approved)."""
        spec, clock, lease = self.spec, self.clock, self.lease
        t = clock()
        key = _current_key.set(lease.request.request_id) if lease is not None else None
        try:
            self.result = yield Act(spec.executor, (self.proposal,))  # type: ignore[arg-type]
        except Exception as exc:
            self.act_s += clock() - t
            ending = _Ending(Outcome.ERROR, ErrorType.EXECUTOR, _describe(exc))
            if self.lease is not None:
                yield from self.release(ending, exc)
            self.finish(ending, exc)
            raise
        finally:
            if key is not None:
                _current_key.reset(key)
        self.mark = now = clock()
        self.act_s += now - t
        return None

    def assess(self) -> Generator[Action, Any, dict[str, Any] | _Ending | None]:
        """Ask every risk rule; the merged risk, or None. A rule that crashes stops the step
        (fail closed: a risk that cannot be assessed is not taken)."""
        risks: list[Risk] = []
        for name, rule in self.spec.risk_rules:
            try:
                found = as_risk((yield Assess(rule, (self.proposal,), name)), name)
            except Exception as exc:  # noqa: BLE001 - a crashed rule is a crashed check
                return _Ending(Outcome.ERROR, ErrorType.VALIDATOR_ERROR,
                               f"risk rule {name}: {_describe(exc)}")
            if found is not None:
                risks.append(found)
        return merge_risks(risks)

    def gate(self, risk: dict[str, Any] | None) -> Generator[Action, Any, _Ending | None]:
        """Store an approval request; unless the loop waits, stop there (``awaiting_approval``).
        Waiting: read the decision until it comes, the wait times out or the request expires;
        approved, claim it (None: go on and execute it from memory)."""
        spec = self.spec
        gate = spec.gate
        self.gated = True
        if gate is None:
            return _Ending(Outcome.AWAITING_APPROVAL)
        try:
            request = yield Gate(gate.request, (
                spec.task_type, spec.agent_id, self.proposal, self.task_input, self.step_id,
                self.trace_id, self.run_id, _failed(self.verdicts), risk), "request")
        except Exception as exc:  # noqa: BLE001 - fail closed: nothing executes unasked
            return _Ending(Outcome.ERROR, ErrorType.APPROVAL,
                           f"the approval request could not be stored: {_describe(exc)}")
        rid = self.request_id = request.request_id
        policy = gate.policy
        if not policy.wait:
            return _Ending(Outcome.AWAITING_APPROVAL)
        clock = self.clock
        deadline = None if policy.timeout is None else clock() + policy.timeout
        while True:
            try:
                found = yield Gate(gate.decision, (rid,), "poll")
            except Exception as exc:  # noqa: BLE001 - the request stays; a worker may run it
                return _Ending(Outcome.AWAITING_APPROVAL, ErrorType.APPROVAL,
                               f"stopped waiting: the decision cannot be read: "
                               f"{_describe(exc)}")
            if found.status is not ApprovalStatus.PENDING:
                break
            left = None if deadline is None else deadline - clock()
            if left is not None and left <= 0:
                return _Ending(Outcome.AWAITING_APPROVAL)
            yield Wait(time.sleep, (policy.poll if left is None else min(policy.poll, left),))
        status = found.status
        if status is ApprovalStatus.APPROVED:
            try:
                lease = yield Gate(gate.claim_own, (rid, self.proposal), "claim")
            except Exception as exc:  # noqa: BLE001 - fail closed
                return _Ending(Outcome.ERROR, ErrorType.APPROVAL, _describe(exc))
            if lease is None:
                return _Ending(Outcome.AWAITING_APPROVAL, None,
                               "approved and claimed by another process, which executes it")
            self.lease = lease
            return None
        if status is ApprovalStatus.REJECTED:
            last = next((d for d in reversed(found.history) if d.action == "rejected"), None)
            by, why = (last.by, last.reason) if last is not None else ("?", "")
            attempt = self.attempt
            if found.revise and attempt.number < spec.max_attempts:
                message = f"rejected by {by}: {why}" if why else f"rejected by {by}"
                attempt.feedback = (f"A reviewer rejected the proposal ({message}). "
                                    "Propose a revised one.")
                attempt.issues = (Issue(code="rejected", message=message),)
                attempt.number += 1
                return _AGAIN
            return _Ending(Outcome.REJECTED, None,
                           clip(f"rejected by {by}: {why}" if why else f"rejected by {by}",
                                _MAX_MESSAGE))
        if status is ApprovalStatus.EXPIRED:
            return _Ending(Outcome.EXPIRED, None, "no decision before the request expired")
        return _Ending(Outcome.AWAITING_APPROVAL, None,
                       f"the request is {status.value} by another process")

    def release(self, ending: _Ending, exception: BaseException | None = None
                ) -> Generator[Action, Any, None]:
        """Record the end of an approved request's execution under its lease."""
        lease, self.lease = self.lease, None
        if lease is None or self.spec.gate is None:
            return
        outcome, error_type, error_message = ending
        result = {"outcome": outcome.value, "error_type": error_type.value if error_type
                  else None, "error_message": error_message, "step_id": self.step_id,
                  "trace_id": self.trace_id,
                  "executed_digest": digest(proposal_text(self.proposal))}
        try:
            yield Gate(self.spec.gate.finish, (lease, exception is None, result), "finish")
        except Exception:  # noqa: BLE001 - the lease runs out: reported crashed, never re-run
            lease.stop()
            _log.exception("closedloop: could not record the end of approval request %s",
                           lease.request.request_id)

    # ----- verify (step_machine yields each verifier's Verify) -------------------------------
    def judge_verification(self, crashed: bool) -> _Ending:
        """Verdicts that were not all clean: succeeded (passing ones with warnings noted), a
        crashed verifier's error, or a failure (a mismatch, or checks that could not tell)."""
        checked = self.checked
        # failing verdicts, and passing ones that carry warnings (e.g. "converged after 3 s")
        self.noted = _failed(checked) or None
        failing = [v for v in checked if not v.passed]
        if not failing:
            self.verification_passed = True
            return _SUCCEEDED
        self.verification_passed = False
        if crashed:
            return _Ending(Outcome.ERROR, ErrorType.VERIFIER_ERROR, _verdict_message(failing))
        # a mismatch found by any verifier is a failure, even beside checks that could not tell
        kind = (ErrorType.VERIFICATION if any(v.blocking_issues for v in failing)
                else ErrorType.VERIFICATION_UNKNOWN)
        return _Ending(Outcome.FAILED, kind, _verdict_message(failing))

    # ----- record ----------------------------------------------------------------------------
    def finish(self, ending: _Ending,
               exception: BaseException | None = None) -> StepResult[Any, Any]:
        """Record the step's event, show it to the guards, and build the caller's result."""
        spec, trace_id, history, noted = self.spec, self.trace_id, self.history, self.noted
        outcome, error_type, error_message = ending
        detail: dict[str, Any] | None = None
        if (history or exception is not None or noted or self.admitted_open or self.leveled
                or self.request_id):
            detail = {}
            if self.request_id is not None:
                detail["approval"] = {"request_id": self.request_id}
            if self.admitted_open:
                detail["fail_open"] = self.admitted_open
            if self.leveled:
                detail["autonomy"] = self.leveled
            if history:
                detail["attempts"] = history
            if noted:
                detail["verification"] = noted
            if exception is not None:
                detail["exception"] = {"type": type(exception).__qualname__,
                                       "module": type(exception).__module__,
                                       "message": clip(str(exception), _MAX_MESSAGE)}
        attempt, clock, labels = self.attempt, self.clock, self.labels
        # By field name, into a copy of the loop's template (agent_id, task_type and the
        # versions are set there): as cheap as a positional tuple (a test checks every field)
        row = spec.event_template.copy()
        row[TS] = self.ts
        row[TRACE_ID] = trace_id
        row[AUTONOMY] = _VALUE[Autonomy.APPROVE if self.gated else self.autonomy]
        row[OUTCOME] = _VALUE[outcome]
        row[ATTEMPTS] = attempt.number
        row[INPUT_TOKENS] = attempt.input_tokens
        row[OUTPUT_TOKENS] = attempt.output_tokens
        row[LATENCY_MS] = (clock() - self.started) * 1000.0
        row[VALIDATION_PASSED] = self.validation_passed
        row[VERIFICATION_PASSED] = self.verification_passed
        if error_type is not None:
            row[ERROR_TYPE] = _VALUE[error_type]
            row[ERROR_MESSAGE] = error_message
        elif error_message is not None:
            row[ERROR_MESSAGE] = error_message
        row[PROPOSE_MS] = self.propose_s * 1000.0
        row[VALIDATE_MS] = self.validate_s * 1000.0
        row[ACT_MS] = self.act_s * 1000.0
        row[VERIFY_MS] = self.verify_s * 1000.0
        row[DETAIL] = detail
        row[STEP_ID] = self.step_id
        row[PARENT_STEP_ID] = self.parent_step_id
        row[RUN_ID] = self.run_id
        row[MODEL] = attempt.model
        row[PROVIDER] = attempt.provider
        if labels is not None:
            row[LABELS] = labels.copy()
        row[CACHED_INPUT_TOKENS] = attempt.cached_input_tokens
        if not attempt.unpriced:
            row[COST_USD] = attempt.cost_usd
        row[PROPOSAL], row[PROPOSAL_DIGEST] = proposal_fields(self.proposal)
        event: StepEvent = _new(StepEvent, row)
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
        if self.run is not None:
            try:
                self.run.observe(event)
            except Exception:  # noqa: BLE001 - the run's bookkeeping must not break a step
                _log.exception("closedloop: run %s failed to count step %s", self.run_id,
                               trace_id)
        if exception is not None:
            exception.add_note(f"closedloop: recorded as step {self.step_id} of trace "
                               f"{trace_id} ({spec.task_type})")
        return new_result(
            trace_id=trace_id, outcome=outcome, proposal=self.proposal, result=self.result,
            attempts=attempt.number, validation=tuple(self.verdicts),
            verification=tuple(self.checked),
            error_type=error_type, error_message=error_message, event=event,
            approval_id=self.request_id,
        )
