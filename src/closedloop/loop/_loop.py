"""The :class:`Loop`: wraps an agent step in validation, gating, action and verification.

Two thin drivers run the one state machine of :mod:`closedloop.loop._machine`: each action it
yields is a call, ``action.fn(*action.args)``; :meth:`Loop.run` makes it directly,
:meth:`Loop.arun` awaits it when the hook is ``async def``. User hooks
are normalised here and nowhere else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import inspect
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import GeneratorType
from typing import TYPE_CHECKING, Any, Protocol

from closedloop import _runtime
from closedloop._errors import ConfigError
from closedloop._events import check_labels
from closedloop.autonomy import Approver, Autonomy
from closedloop.loop._gate import ApprovalGate, ApprovalPolicy
from closedloop.loop._guard import StepGuard
from closedloop.loop._machine import (
    Action,
    StepCall,
    StepGen,
    StepSpec,
    Wait,
    approved_machine,
    new_trace_id,
    step_machine,
)
from closedloop.loop._result import Attempt, StepResult

if TYPE_CHECKING:
    from collections.abc import Generator

    from closedloop._approvals import ApprovalStore, RiskRule
    from closedloop._runtime import Runtime
    from closedloop.autonomy import AutonomyLevels
    from closedloop.control import Backpressure
    from closedloop.store import Store

# Hook types are deliberately loose (Any in, Any out): a hook may be ``def`` or ``async def``
# and may be a lambda, which static checkers cannot infer a generic Loop from.
Agent = Callable[[Any, Attempt], Any]
"""``agent(task_input, attempt) -> proposal`` (may be async)."""
Validator = Callable[[Any], Any]
"""``validator(proposal) -> Verdict | Issue | str | list | bool | None`` (may be async)."""
Executor = Callable[[Any], Any]
"""``executor(proposal) -> result`` (may be async)."""
Verifier = Callable[[Any, Any], Any]
"""``verifier(intent, result) -> Verdict | ...``: the intent is the task input (may be async)."""


class _Default:
    """Sentinel: "use the runtime's" where ``None`` means "none at all"."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def _name(obj: object) -> str:
    name = getattr(obj, "name", None)
    if isinstance(name, str) and name:
        return name
    return getattr(obj, "__qualname__", None) or type(obj).__name__


_MAX_NAME = 200


def _version(value: object, what: str) -> str | None:
    """A version or run id: None, or a non-empty one-line string of at most 200 characters."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME \
            or not value.isprintable():
        raise ConfigError(f"{what} must be a non-empty printable string of at most "
                          f"{_MAX_NAME} characters, got {str(value)[:80]!r}")
    return value


def _checks(items: Iterable[Callable[..., Any]], what: str) -> tuple[tuple[str, Any], ...]:
    out = []
    for item in items:
        if not callable(item):
            raise ConfigError(f"{what} {item!r} is not callable")
        out.append((_name(item), item))
    return tuple(out)


class Loop:
    """One task type's feedback loop around an agent.

    ``agent(task_input, attempt)`` proposes; each ``validators`` entry checks the proposal,
    and blocking issues go back to the agent as ``attempt.feedback`` up to ``max_attempts``
    times; the ``autonomy`` level gates execution; ``executor(proposal)`` acts; each
    ``verifiers`` entry compares the real state with the intent, ``verifier(task_input,
    result)``; and one :class:`~closedloop.StepEvent` is recorded in ``store``. ``guards``
    (fault control) may refuse a step before the agent runs and see every event after; by
    default a :class:`~closedloop.control.FaultControl` that pauses a task type on a
    validation-failure spike and halts it when verification keeps failing (``guards=()``
    turns it off). A guard that cannot decide (control state unreadable) refuses the step
    with outcome ``control_unavailable``; ``fail_open=True`` admits it instead (recorded in
    the event's detail) for a task type whose steps are safer run than refused (see
    docs/control.md). ``backpressure`` (default: the process-wide
    :class:`~closedloop.control.Backpressure`) is handed to the agent as
    ``attempt.backpressure`` for its calls to rate-limited providers. ``telemetry`` (default:
    the pipeline installed by :func:`closedloop.telemetry.configure`, if any) traces each step
    with a span per stage; ``None`` turns tracing off. Every hook
    may be a plain function or ``async def`` (async hooks need :meth:`arun`).

    Each step's event carries the loop's ``agent_version`` and ``prompt_version`` (say which
    agent and prompt made it, to compare versions) and ``labels``, a few low-cardinality
    dimensions to group steps by (``{"tier": "gold"}``; at most 16, names of at most 64 and
    values of at most 128 characters, a :class:`~closedloop.ConfigError` otherwise). Per
    call, ``run(task, run_id=..., labels=...)`` names the run the step belongs to and adds
    or overrides labels; a step run by another step's hook records that step as its parent
    and, unless given its own, its run id; a step started inside a :class:`closedloop.Run`
    takes the run's id and is admitted, counted and rolled back by it (docs/runs.md).

    Durable approval (docs/approvals.md): at the ``approve`` level without an inline
    ``approver``, and at every level for a proposal one of the ``risk_rules`` marks
    high-stakes (``rule(proposal) -> Risk | str | None``, e.g.
    :func:`closedloop.approvals.destructive_terraform`), the step stores an approval request
    in ``store`` and, as ``approval`` (an :class:`ApprovalPolicy`) says, waits for the
    decision and executes the approved proposal itself, or returns ``awaiting_approval``
    with ``result.approval_id`` for a worker (:meth:`run_approved`, ``closedloop worker``)
    to execute once approved, exactly once. A rejection asking for a revision goes back to
    the agent as feedback; an expired request ends the step ``expired``.

    ``store``, the default guards, ``backpressure`` and ``telemetry`` come from ``runtime``
    (a :class:`~closedloop.Runtime`), by default the process's: a loop follows
    :func:`closedloop.configure` and :func:`closedloop.reset` from its next step, while a
    loop given its own runtime keeps it.

    Autonomy is earned (docs/autonomy.md): a loop given no ``autonomy`` runs each step at the
    level stored for its (agent, task type, action class) in ``levels`` (an
    :class:`~closedloop.autonomy.AutonomyLevels`; default: the runtime's, for the loop's
    store; ``None``: no stored levels), looked up before the gate, cached briefly, failing
    closed; a key with no stored level runs at ``levels.default`` (``autonomous``).
    ``classify(proposal) -> str | None`` names the proposal's action class (``"create_replica"``,
    ``"delete_database"``), which can have a level of its own. With the default guards such a
    loop also feeds the demotion detector (``levels.monitor()``). ``autonomy=`` pins every
    step to that level, stored levels or not.
    """

    def __init__(
        self,
        agent: Agent,
        *,
        task_type: str,
        validators: Iterable[Validator] = (),
        executor: Executor | None = None,
        verifiers: Iterable[Verifier] = (),
        autonomy: Autonomy | str | None = None,
        approver: Approver | None = None,
        classify: Callable[[Any], str | None] | None = None,
        levels: AutonomyLevels | None = DEFAULT,
        max_attempts: int = 3,
        guards: Iterable[StepGuard] | None = DEFAULT,
        fail_open: bool = False,
        backpressure: Backpressure | None = DEFAULT,
        agent_id: str | None = None,
        store: Store | None = DEFAULT,
        clock: Callable[[], float] = time.perf_counter,
        wallclock: Callable[[], float] = time.time,
        telemetry: StepTracing | None = DEFAULT,
        runtime: Runtime | None = None,
        agent_version: str | None = None,
        prompt_version: str | None = None,
        labels: Mapping[str, str] | None = None,
        risk_rules: Iterable[RiskRule] = (),
        approval: ApprovalPolicy | None = None,
    ) -> None:
        if not callable(agent):
            raise ConfigError(f"agent {agent!r} is not callable")
        if not isinstance(task_type, str) or not task_type.strip():
            raise ConfigError("task_type must be a non-empty string")
        if not isinstance(max_attempts, int) or max_attempts < 1:
            raise ConfigError(f"max_attempts must be an integer ≥ 1, got {max_attempts!r}")
        if executor is not None and not callable(executor):
            raise ConfigError(f"executor {executor!r} is not callable")
        if approver is not None and not callable(approver):
            raise ConfigError(f"approver {approver!r} is not callable")
        if classify is not None and not callable(classify):
            raise ConfigError(f"classify {classify!r} is not callable")
        if autonomy is not None and classify is not None:
            raise ConfigError("classify= needs stored levels: leave autonomy= unpinned")
        if approval is not None and not isinstance(approval, ApprovalPolicy):
            raise ConfigError(f"approval must be an ApprovalPolicy, got {approval!r}")
        self.task_type = task_type
        self._runtime = runtime
        self._given = (store, guards, backpressure)
        self._pinned = None if autonomy is None else Autonomy.parse(autonomy)
        self._levels_given = levels
        self._classify = classify
        self._agent_id = agent_id or _name(agent)
        self._bind_lock = threading.Lock()
        rt = runtime if runtime is not None else _runtime._current
        store, record, guards, backpressure, (levels_of, cached) = self._collaborators(rt)
        self.store: Store | None = store
        """The store this loop records into (None: it records nothing)."""
        self._bound = rt
        self._approvals: tuple[Store, ApprovalStore] | None = None
        agent_id = self._agent_id
        self._spec = StepSpec(
            agent=agent,
            agent_id=self._agent_id,
            task_type=task_type,
            validators=_checks(validators, "validator"),
            executor=executor,
            verifiers=_checks(verifiers, "verifier"),
            autonomy=self._pinned or self._default_level(rt, store),
            approver=approver,
            max_attempts=max_attempts,
            record=record,
            guards=guards,
            backpressure=backpressure,
            clock=clock,
            wallclock=wallclock,
            fail_open=bool(fail_open),
            agent_version=_version(agent_version, "agent_version"),
            prompt_version=_version(prompt_version, "prompt_version"),
            labels=check_labels(labels),
            levels=levels_of,
            cached_level=cached,
            risk_rules=_checks(risk_rules, "risk rule"),
            gate=ApprovalGate(self.approval_store, approval or ApprovalPolicy(), agent_id),
        )
        self._telemetry = telemetry
        self._traced: tuple[StepTracing, StepTracer] | None = None

    def approval_store(self) -> ApprovalStore | None:
        """The approval port of this loop's store (None: the loop has no store)."""
        store = self.store
        if store is None:
            return None
        cached = self._approvals
        if cached is None or cached[0] is not store:
            from closedloop.store import approval_store_for

            cached = self._approvals = (store, approval_store_for(store))
        return cached[1]

    @property
    def approval(self) -> ApprovalPolicy:
        """How this loop's durable approvals behave."""
        assert self._spec.gate is not None
        return self._spec.gate.policy

    @property
    def autonomy(self) -> Autonomy:
        """The autonomy level this loop gates execution with: the pinned one, else the level
        of a key with no stored level (each step looks up its stored level)."""
        return self._spec.autonomy

    @property
    def pinned(self) -> bool:
        """True when ``autonomy=`` pinned every step's level (stored levels are not used)."""
        return self._pinned is not None

    def _levels(self, rt: Runtime, store: Store | None) -> AutonomyLevels | None:
        """The stored levels this loop follows (None: pinned, or none at all)."""
        if self._pinned is not None:
            return None
        levels = self._levels_given
        if levels is DEFAULT:
            levels = rt.levels_for(store) if store is not None else None
        return levels

    def _default_level(self, rt: Runtime, store: Store | None) -> Autonomy:
        levels = self._levels(rt, store)
        return levels.default if levels is not None else Autonomy.AUTONOMOUS

    def _collaborators(self, rt: Runtime) -> tuple[
            Store | None, Callable[..., object] | None, tuple[StepGuard, ...], Any,
            tuple[Callable[[Any], Any] | None, Callable[[], Autonomy | None] | None]]:
        """The store, its ``record``, the guards, the backpressure and the stored-level lookup
        (and its quick form), from ``rt`` where this loop was not given its own."""
        store, guards, backpressure = self._given
        if store is DEFAULT:
            store = rt.store
        levels = self._levels(rt, store)
        if guards is DEFAULT:
            # fault control by default, its pauses and halts kept with the store; the demotion
            # detector of the stored levels this loop follows
            guards = (rt.fault_control_for(store),) if levels is None else (
                rt.fault_control_for(store), levels.monitor())
            drift = rt.drift_for(store) if store is not None else None
            if drift is not None:  # configure(drift=...): drift and budget detection
                guards = (*guards, drift)
        if backpressure is DEFAULT:
            backpressure = rt.backpressure
        record = store.record if store is not None else None
        levels_of = (levels.resolver(self._agent_id, self.task_type, self._classify)
                     if levels is not None else None)
        cached = (levels.cached_level(self._agent_id, self.task_type)
                  if levels is not None and self._classify is None else None)
        return store, record, tuple(guards or ()), backpressure, (levels_of, cached)

    def _rebind(self, rt: Runtime) -> None:
        """Follow a process runtime that :func:`closedloop.configure` or ``reset`` replaced."""
        with self._bind_lock:
            if self._bound is rt:
                return
            store, record, guards, backpressure, (levels_of, cached) = self._collaborators(rt)
            autonomy = self._pinned or self._default_level(rt, store)
            self._spec = dataclasses.replace(self._spec, record=record, guards=guards,
                                             backpressure=backpressure, levels=levels_of,
                                             cached_level=cached, autonomy=autonomy)
            self.store = store
            self._bound = rt

    def _step(self, task_input: Any, run_id: str | None,
              labels: Mapping[str, str] | None) -> StepGen:
        """The step's state machine, traced when a telemetry pipeline is in use."""
        if self._runtime is None and _runtime._current is not self._bound:
            self._rebind(_runtime._current)
        machine: Callable[[StepSpec, Any, str], StepGen] = step_machine
        if run_id is not None or labels is not None:
            machine = functools.partial(step_machine, call=StepCall(
                _version(run_id, "run_id"), check_labels(labels, self._spec.labels)))
        telemetry = self._telemetry
        if telemetry is DEFAULT:
            telemetry = self._bound.telemetry
        if telemetry is None:
            return machine(self._spec, task_input, new_trace_id())
        traced = self._traced
        if traced is None or traced[0] is not telemetry:
            traced = self._traced = (telemetry, telemetry.tracer(self._spec))
        return traced[1].step(machine, task_input, new_trace_id())

    def run(self, task_input: Any, *, run_id: str | None = None,
            labels: Mapping[str, str] | None = None) -> StepResult[Any, Any]:
        """Run one step synchronously; every hook must be a plain function.

        ``run_id`` names the run (a multi-step agent's task) the step belongs to (default:
        the enclosing step's, if any); ``labels`` add to, or override, the loop's labels for
        this step. A bad one is a :class:`~closedloop.ConfigError` before anything runs.
        """
        result: StepResult[Any, Any] = _drive(self._step(task_input, run_id, labels))
        return result

    async def arun(self, task_input: Any, *, run_id: str | None = None,
                   labels: Mapping[str, str] | None = None) -> StepResult[Any, Any]:
        """Run one step in asyncio; hooks may be plain functions or ``async def``.

        ``run_id`` and ``labels`` as for :meth:`run`."""
        result: StepResult[Any, Any] = await _adrive(self._step(task_input, run_id, labels))
        return result

    def _approved(self, request_id: str | None, by: str | None) -> Generator[Action, Any, Any]:
        if self._runtime is None and _runtime._current is not self._bound:
            self._rebind(_runtime._current)
        if self._spec.executor is None:
            raise ConfigError(f"loop {self.task_type!r} has no executor: it cannot execute "
                              "approved requests")
        who = by or f"worker:{socket.gethostname()}:{os.getpid()}"
        return approved_machine(self._spec, request_id, who)

    def run_approved(self, request_id: str | None = None, *,
                     by: str | None = None) -> StepResult[Any, Any] | None:
        """Execute one approved request of this loop's task type, exactly once: the one named,
        else the oldest approved one this process can execute. Returns its step's result
        (recorded like any step: the request's step id, autonomy ``approve``, the real
        outcome after verification), or None when there is none to run (or the guards refuse
        for now: it stays approved). ``by`` names this worker in the request's history.

        The executor receives the request's id as its idempotency key
        (:func:`closedloop.current_idempotency_key`); the proposal it receives is the
        approved one, checked by digest: in another process than the one that asked, the
        proposal is rebuilt from its canonical JSON (a dict, a list, a string...). A request
        this process cannot execute as approved (its proposal held a secret and no
        ``CLOSEDLOOP_APPROVAL_KEY`` is set) is refused with the reason recorded
        (:class:`~closedloop.ApprovalError`); exceptions of the executor propagate, as in
        :meth:`run`.
        """
        spec = self._spec
        hooks = [spec.executor, *(v for _, v in spec.verifiers)]
        if any(_is_async(h) for h in hooks):  # before claiming: never a claim left half-run
            raise ConfigError(f"loop {self.task_type!r} has async hooks; call "
                              "`await loop.arun_approved(...)` instead of run_approved()")
        result: StepResult[Any, Any] | None = _drive(self._approved(request_id, by))
        return result

    async def arun_approved(self, request_id: str | None = None, *,
                            by: str | None = None) -> StepResult[Any, Any] | None:
        """:meth:`run_approved` in asyncio; hooks may be ``async def``."""
        result: StepResult[Any, Any] | None = await _adrive(self._approved(request_id, by))
        return result


def _is_async(fn: object) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None))  # noqa: B004 - a callable object's own method


def _drive(gen: Generator[Action, Any, Any]) -> Any:
    """Run a machine synchronously: each action is a plain call."""
    send, plain = gen.send, _NOT_AWAITABLE  # looked up once per step
    try:
        action = next(gen)
        while True:
            try:
                # action[0](*action[1]) is action.fn(*action.args) (every action starts with
                # them): a NamedTuple's field names are slower lookups than its positions
                value = action[0](*action[1])
            except Exception as exc:  # noqa: BLE001 - handed to the machine, which decides
                action = gen.throw(exc)
                continue
            if type(value) not in plain and _awaitable(value):  # a set test: no call
                _discard(value)
                gen.close()
                raise ConfigError(f"{_name(action.fn)} is async; call "
                                  "`await loop.arun(...)` instead of loop.run()")
            action = send(value)
    except StopIteration as stop:
        return stop.value
    finally:
        # A no-op once the machine has finished; after an interrupt it unwinds the machine
        # here, in this context, rather than later from the garbage collector.
        gen.close()


async def _adrive(gen: Generator[Action, Any, Any]) -> Any:
    """Run a machine in asyncio: awaitable results are awaited, waits are asyncio sleeps."""
    try:
        action = next(gen)
        while True:
            try:
                if type(action) is Wait:
                    await asyncio.sleep(action.args[0])
                    value = None
                else:
                    value = action[0](*action[1])  # action.fn(*action.args), as in _drive
                    if type(value) not in _NOT_AWAITABLE and _awaitable(value):
                        value = await value
            except Exception as exc:  # noqa: BLE001 - handed to the machine, which decides
                action = gen.throw(exc)
                continue
            action = gen.send(value)
    except StopIteration as stop:
        return stop.value
    finally:
        gen.close()  # on cancellation: unwind the machine in this task's context


class StepTracer(Protocol):
    """Runs one loop's steps traced: wraps the state machine, never changes its decisions."""

    def step(self, machine: Callable[[StepSpec, Any, str], StepGen], task_input: Any,
             trace_id: str) -> StepGen:
        """``machine(spec, task_input, trace_id)`` with spans around its stages."""
        ...


class StepTracing(Protocol):
    """A telemetry pipeline (:class:`closedloop.telemetry.Telemetry`) as the loop sees it."""

    def tracer(self, spec: StepSpec) -> StepTracer:
        """The tracer for one loop, built once."""
        ...


_NOT_AWAITABLE: set[type] = {type(None)}
"""Types whose values are never awaitable, learnt as hooks return them (few distinct types):
the drivers test a value's type against it inline, with no call."""


def _awaitable(value: object) -> bool:
    """``inspect.isawaitable``, remembering the types that never are (:data:`_NOT_AWAITABLE`)."""
    cls = type(value)
    if cls is GeneratorType:  # generator-based coroutines depend on the instance's flags
        return inspect.isawaitable(value)
    if hasattr(cls, "__await__"):
        return True
    _NOT_AWAITABLE.add(cls)
    return False


def _discard(awaitable: object) -> None:
    close = getattr(awaitable, "close", None)
    if callable(close):
        close()
