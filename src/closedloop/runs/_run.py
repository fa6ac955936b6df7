"""The :class:`Run`: the steps of one agent task, with budgets, halts, rollback and a record.

A run is a context (``with Run(...)`` or ``async with Run(...)``). While it is open, every
:class:`~closedloop.Loop` step (and every guarded tool call, :func:`closedloop.tool`) started
in its context belongs to it: the step's event carries the run's id, the run admits the step
first (its budgets, its halt) and counts it afterwards. The decisions are the loop's: the run
is a :class:`~closedloop.loop.RunScope` the step machine consults, so sync and async steps
behave alike. Rollback (:meth:`Run.on_rollback`) is a generator of
:class:`~closedloop.loop.Compensate` actions driven by the loop's drivers (after a step's
failed verification) or by the run's own (when it ends aborted).

Halts from other processes (:func:`halt_run`, ``closedloop runs halt``) are rows of the
store's ``run_halts`` table. One :class:`_HaltWatch` thread per store and process reads the
halts of the runs open there every ``halt_poll`` seconds (one query by run id) and halts the
runs it finds; the agent's thread only compares the time of the watch's last good read with
a monotonic clock at each step (well under 0.3 µs), and refuses the step as
``control_unavailable`` when that read is older than ``halt_stale`` (fail closed).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from closedloop import _runtime
from closedloop._errors import ConfigError, ToolRefused
from closedloop._events import ErrorType, Outcome, StepEvent, check_labels
from closedloop._redact import clip
from closedloop._runstate import MAX_HALT_IDS, RunHalt, RunHaltStore, RunRecord
from closedloop._verdict import Verdict, as_verdict
from closedloop.loop import (
    Admission,
    Compensate,
    current_step_id,
    new_step_id,
    new_trace_id,
    run_scope,
)

if TYPE_CHECKING:
    from types import TracebackType

    from closedloop.store import Store

_log = logging.getLogger("closedloop")
_MAX_MESSAGE = 2000
_FAILED = frozenset({Outcome.FAILED.value, Outcome.BLOCKED.value, Outcome.ERROR.value})
_ROLLBACK_ON = frozenset({Outcome.ERROR, Outcome.ABORTED, Outcome.BUDGET_EXCEEDED,
                          Outcome.HALTED})
_monotonic = time.monotonic
HALT_POLL_S = 0.25
"""How often (seconds) a process reads the halts of its open runs from the store, by default:
a halt recorded elsewhere refuses every step that starts from one poll (and one read) later."""
HALT_STALE_S = 2.0
"""A run refuses its steps (``control_unavailable``) while its process has not read the halts
successfully for longer than this (seconds), by default: it cannot tell it is not halted."""


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()


def _describe(exc: BaseException) -> str:
    return clip(f"{type(exc).__name__}: {exc}", _MAX_MESSAGE)


def _budget(value: float | None, what: str, *, integer: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value) or value <= 0 or (integer and not isinstance(value, int)):
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{what} must be {kind} or None, got {value!r}")
    return value


def _refused(exc: BaseException) -> bool:
    """``exc`` is a :class:`ToolRefused`, or wraps one (as agent frameworks wrap the
    exceptions of the tools they call)."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ToolRefused):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


@dataclass(slots=True)
class _Rollback:
    """One registered compensation: ``fn(*args)``, then ``check(*args)`` if given."""

    step_id: str | None
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    check: Callable[..., Any] | None
    label: str
    task_type: str | None = None
    trace_id: str | None = None


class Run:
    """One agent task: the steps made inside it share its id, its budgets and its fate.

    ``with Run("triage", max_steps=20, max_tokens=50_000) as run:`` (or ``async with``).
    Inside, every :class:`~closedloop.Loop` step and guarded tool call
    (:func:`closedloop.tool`) records ``run_id=run.run_id`` and is admitted by the run
    first. Budgets: ``max_steps`` (steps admitted), ``max_tokens`` (input + output, the
    steps' and those :meth:`record_usage` reports, as the SDK integrations do for model calls
    made outside any step), ``max_cost_usd`` and ``max_seconds`` (wall time since the run
    started). Once one is spent, the next step is refused before it acts — recorded with
    outcome ``budget_exceeded`` — and so is every later one; the run ends with outcome
    ``budget_exceeded`` (also when the :class:`~closedloop.ToolRefused` a guarded tool then
    raises leaves the block). A step can overrun a budget (tokens are known once it ends): the
    budget bounds what the run *starts*.

    :meth:`halt` (any thread), a halt recorded in the store by another process
    (:func:`halt_run`, ``closedloop runs halt RUN_ID --reason ...``) and a halt of a step's
    task type by fault control (a step refused ``halted``) stop the run: later steps are
    refused (outcome ``halted``, error type ``run_halted``) and the run ends ``halted``.
    :meth:`abort` ends it ``aborted``. A halt in the store is read every ``halt_poll``
    seconds (0.25; None: not read), so it refuses every step that starts from one poll and
    one read of the store after it was recorded. If the store's halts cannot be read for
    longer than ``halt_stale`` seconds (2), the run cannot tell whether it was halted and
    refuses its steps (outcome ``control_unavailable``, counted in ``refused``) until a
    read succeeds again; it is not ended by that.

    Rollback: an action registers how to undo itself with :meth:`on_rollback` (a guarded
    tool's ``compensate=`` does it for you). When a step's verification fails, what that
    step registered is undone at once; when the run ends with an outcome in ``rollback_on``
    (default: an exception left the block, or :meth:`abort`), everything still registered is
    undone, newest first. Each compensation's ``check`` verifies the state was restored;
    each is recorded as a step event (outcome ``compensated`` or ``compensation_failed``,
    ``parent_step_id`` the step it undid) and a span.

    The run's record (:class:`~closedloop.runs.RunRecord`: outcome, counts, tokens, cost,
    duration, budgets) is written to ``store`` (default: the runtime's) when the run starts
    and when it ends, off the agent's path; ``closedloop runs list`` and ``closedloop
    report`` show it. With a telemetry pipeline, the run is an ``invoke_agent {name}`` span
    and its steps are its children (one trace per run).

    Runs nest: a run opened inside another is its child (``parent_run_id``); its steps
    count against its parent's budgets too.
    """

    def __init__(
        self,
        name: str | None = None,
        *,
        run_id: str | None = None,
        max_steps: int | None = None,
        max_tokens: int | None = None,
        max_cost_usd: float | None = None,
        max_seconds: float | None = None,
        rollback_on: Iterable[Outcome | str] = (Outcome.ERROR, Outcome.ABORTED),
        approve_irreversible_above: float | None = None,
        labels: Mapping[str, str] | None = None,
        halt_poll: float | None = HALT_POLL_S,
        halt_stale: float = HALT_STALE_S,
        store: Store | None = DEFAULT,
        telemetry: Any = DEFAULT,
        runtime: _runtime.Runtime | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name.strip()
                                 or len(name) > 200):
            raise ConfigError("a run's name must be a non-empty string of at most 200 "
                              f"characters, got {str(name)[:80]!r}")
        if run_id is not None and (not isinstance(run_id, str) or not run_id.strip()
                                   or len(run_id) > 200 or not run_id.isprintable()):
            raise ConfigError("run_id must be a non-empty printable string of at most 200 "
                              f"characters, got {str(run_id)[:80]!r}")
        self.name = name
        self.run_id: str = run_id or new_step_id()
        """The run's id: every step and span made inside the run carries it."""
        self.max_steps = _budget(max_steps, "max_steps", integer=True)
        self.max_tokens = _budget(max_tokens, "max_tokens", integer=True)
        self.max_cost_usd = _budget(max_cost_usd, "max_cost_usd")
        self.max_seconds = _budget(max_seconds, "max_seconds")
        try:
            self.rollback_on = frozenset(Outcome(o) for o in rollback_on)
        except ValueError as exc:
            raise ConfigError(f"rollback_on: {exc}") from None
        if not self.rollback_on <= _ROLLBACK_ON:
            raise ConfigError(f"rollback_on takes run outcomes among "
                              f"{sorted(o.value for o in _ROLLBACK_ON)}")
        if approve_irreversible_above is not None and (
                isinstance(approve_irreversible_above, bool)
                or not isinstance(approve_irreversible_above, int | float)
                or not 0 <= approve_irreversible_above < math.inf):
            raise ConfigError("approve_irreversible_above must be a number ≥ 0 or None, got "
                              f"{approve_irreversible_above!r}")
        self.approve_irreversible_above = approve_irreversible_above
        """Irreversible tool calls with a risk above this need approval (None: the tool's
        own threshold)."""
        self.labels = check_labels(labels)
        self.halt_poll = _budget(halt_poll, "halt_poll")
        """Seconds between reads of the store's halts of this run (None: only in-process
        halts)."""
        stale = _budget(halt_stale, "halt_stale")
        assert stale is not None
        if self.halt_poll is not None and stale <= self.halt_poll:
            raise ConfigError(f"halt_stale ({stale:g}s) must be longer than halt_poll "
                              f"({self.halt_poll:g}s)")
        self.halt_stale = stale
        self._watch: _HaltWatch | None = None
        self._store_arg = store
        self._telemetry_arg = telemetry
        self._runtime = runtime
        self.clock = clock
        self.wallclock = wallclock
        self._lock = threading.Lock()
        self._parent: Run | None = None
        self._token: Any = None
        self._span_cm: AbstractContextManager[Any] | None = None
        self._span: Any = None
        self._telemetry: Any = None
        self._store: Store | None = None
        self._rollbacks: list[_Rollback] = []
        self._invalid: dict[str, int] = {}
        self._stop: Admission | None = None
        self._end: Outcome | None = None  # the outcome a stop gives the run
        self._started = 0.0
        self._started_at = 0.0
        self._entered = False
        self._detached = False
        self.outcome: Outcome | None = None
        """How the run ended (None while it runs)."""
        self.error_type: str | None = None
        self.message: str | None = None
        """Why it ended as it did (the budget spent, the halt's reason, the exception)."""
        self.steps = 0
        """Steps the run admitted."""
        self.refused = 0
        """Steps the run refused (budget spent, run halted)."""
        self.failed = 0
        """Admitted steps that failed, were blocked or raised; failed compensations."""
        self.compensated = 0
        """Compensations that ran and were verified (or had no check)."""
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd: float | None = None
        self.ended: float | None = None

    # ----- the context --------------------------------------------------------------------
    def __enter__(self) -> Run:
        self._open()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        rollback = self._closing(exc)
        if rollback is not None:
            _drive(rollback)
        self._close()

    async def __aenter__(self) -> Run:
        self._open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        rollback = self._closing(exc)
        if rollback is not None:
            await _adrive(rollback)
        self._close()

    def _open(self) -> None:
        if self._entered:
            raise ConfigError(f"run {self.run_id} was already entered; a Run is used once")
        self._entered = True
        rt = self._runtime if self._runtime is not None else _runtime.current_runtime()
        self._store = rt.store if self._store_arg is DEFAULT else self._store_arg
        telemetry = rt.telemetry if self._telemetry_arg is DEFAULT else self._telemetry_arg
        self._telemetry = telemetry
        parent = run_scope.get()
        self._parent = parent if isinstance(parent, Run) else None
        self._started = self.clock()
        self._started_at = self.wallclock()
        if telemetry is not None:
            name = self.name or "run"
            attrs: dict[str, Any] = {"gen_ai.operation.name": "invoke_agent",
                                     "gen_ai.agent.name": name, "closedloop.task_type": name,
                                     "closedloop.run_id": self.run_id}
            self._span_cm = telemetry.span(f"invoke_agent {name}", **attrs)
            self._span = self._span_cm.__enter__()
        self._token = run_scope.set(self)
        if self.halt_poll is not None and self._store is not None:
            self._watch = _HaltWatch.register(self._store, self)
        self._save()

    def _closing(self, exc: BaseException | None) -> Generator[Compensate, Any, None] | None:
        """Decide the run's outcome; the rollback to drive, if it ends in one."""
        run_scope.reset(self._token)
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.unregister(self)
        with self._lock:
            # a tool refused because this run stopped raised ToolRefused (perhaps wrapped by
            # an agent framework): the run ends as its stop says (budget_exceeded, halted,
            # aborted), not in error
            if exc is not None and not (_refused(exc) and self._stop is not None):
                self.outcome, self.error_type = Outcome.ERROR, None
                self.message = _describe(exc)
            elif self._stop is not None:
                stop = self._stop
                self.outcome = self._end or stop.outcome
                self.error_type = stop.error_type.value
                self.message = stop.reason
            else:
                self.outcome = Outcome.SUCCEEDED
            entries = self._rollbacks if self.outcome in self.rollback_on else []
            self._rollbacks = []
        if not entries:
            return None
        return self._rollback(entries, f"run {self.outcome.value}: {self.message or ''}".rstrip(
            ": "))

    def _close(self) -> None:
        self.ended = self.wallclock()
        span = self._span
        if span is not None and self._span_cm is not None:
            assert self.outcome is not None
            span.set_attribute("closedloop.outcome", self.outcome.value)
            span.set_attribute("closedloop.run.steps", self.steps)
            span.set_attribute("closedloop.run.refused", self.refused)
            span.set_attribute("closedloop.usage.input_tokens", self.input_tokens)
            span.set_attribute("closedloop.usage.output_tokens", self.output_tokens)
            if self.cost_usd is not None:
                span.set_attribute("closedloop.cost_usd", self.cost_usd)
            if self.outcome is not Outcome.SUCCEEDED:
                span.set_attribute("closedloop.error_type", self.error_type or "error")
                if self.outcome is Outcome.ERROR:
                    from opentelemetry.trace import StatusCode

                    span.set_status(StatusCode.ERROR, self.message)
            self._span_cm.__exit__(None, None, None)
        self._save()

    def _save(self) -> None:
        store = self._store
        if store is not None:
            record_run = getattr(store, "record_run", None)
            if record_run is not None:
                record_run(self.record())

    # ----- the record -------------------------------------------------------------------
    def record(self) -> RunRecord:
        """The run's record as it stands (outcome ``running`` until it ends)."""
        budgets = {k: v for k, v in (("max_steps", self.max_steps),
                                     ("max_tokens", self.max_tokens),
                                     ("max_cost_usd", self.max_cost_usd),
                                     ("max_seconds", self.max_seconds)) if v is not None}
        with self._lock:
            return RunRecord(
                run_id=self.run_id, name=self.name, started=self._started_at, ended=self.ended,
                outcome=self.outcome.value if self.outcome is not None else "running",
                error_type=self.error_type, message=self.message, steps=self.steps,
                refused=self.refused, failed=self.failed, compensated=self.compensated,
                input_tokens=self.input_tokens, output_tokens=self.output_tokens,
                cost_usd=self.cost_usd, budgets=budgets,
                parent_run_id=self._parent.run_id if self._parent is not None else None,
                labels=dict(self.labels) if self.labels else None)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started (by its clock)."""
        return self.clock() - self._started

    # ----- the loop's side: admission and counting (RunScope) -----------------------------
    def admit(self, task_type: str) -> Admission | None:
        """Refuse the step when the run is stopped or a budget is spent; else count it."""
        parent = self._parent
        watch = self._watch
        if watch is not None and _monotonic() - watch.read_at > self.halt_stale \
                and self._stop is None:
            return self._unreadable(watch)
        with self._lock:
            refusal = self._stop or self._spent()
            if refusal is not None:
                self.refused += 1
                return refusal
            self.steps += 1
        if parent is not None:
            refusal = parent.admit(task_type)
            if refusal is not None:
                with self._lock:
                    self.steps -= 1
                    self.refused += 1
                    if self._stop is None:
                        self._stop = refusal
                return refusal
        return None

    def _unreadable(self, watch: _HaltWatch) -> Admission:
        """Refuse a step: the store's halts have not been read for too long (fail closed)."""
        watch.revive()
        with self._lock:
            self.refused += 1
        return Admission.unavailable(
            f"run {self.run_id}: cannot tell whether it was halted: the halts in "
            f"{watch.url} were last read {_monotonic() - watch.read_at:.1f}s ago (more than "
            f"{self.halt_stale:g}s){watch.error}")

    def _spent(self) -> Admission | None:
        """The budget that is spent, as the refusal of every later step (lock held)."""
        why = None
        if self.max_steps is not None and self.steps >= self.max_steps:
            why = f"step budget spent: {self.steps} of {self.max_steps:.0f} steps"
        elif self.max_tokens is not None and \
                self.input_tokens + self.output_tokens >= self.max_tokens:
            why = (f"token budget spent: {self.input_tokens + self.output_tokens} of "
                   f"{self.max_tokens:.0f} tokens")
        elif self.max_cost_usd is not None and (self.cost_usd or 0.0) >= self.max_cost_usd:
            why = f"cost budget spent: ${self.cost_usd or 0.0:.4f} of ${self.max_cost_usd:.4f}"
        elif self.max_seconds is not None and self.elapsed_s >= self.max_seconds:
            why = f"time budget spent: {self.elapsed_s:.1f}s of {self.max_seconds:g}s"
        if why is None:
            return None
        self._stop = Admission.over_budget(f"run {self.run_id}: {why}")
        return self._stop

    def observe(self, event: StepEvent) -> None:
        """Count one recorded step of the run: tokens, cost, failures; a halted task type
        halts the run."""
        parent = self._parent
        with self._lock:
            self._add_usage(event.input_tokens, event.output_tokens, event.cost_usd)
            if event.outcome in _FAILED:
                self.failed += 1
            elif event.outcome == "halted" and self._stop is None:
                self._stop = Admission.run_halted(
                    f"run {self.run_id} halted: a step of {event.task_type} was refused "
                    f"({event.error_message})")
            for entry in self._rollbacks:
                if entry.step_id == event.step_id:
                    entry.task_type, entry.trace_id = event.task_type, event.trace_id
        if parent is not None:
            parent._count_usage(event.input_tokens, event.output_tokens, event.cost_usd,
                                failed=event.outcome in _FAILED)

    def _count_usage(self, input_tokens: int, output_tokens: int, cost_usd: float | None,
                     *, failed: bool = False) -> None:
        with self._lock:
            self._add_usage(input_tokens, output_tokens, cost_usd)
            if failed:
                self.failed += 1
        if self._parent is not None:
            self._parent._count_usage(input_tokens, output_tokens, cost_usd, failed=failed)

    def _add_usage(self, input_tokens: int, output_tokens: int, cost_usd: float | None) -> None:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if cost_usd is not None:
            self.cost_usd = cost_usd if self.cost_usd is None else self.cost_usd + cost_usd

    def record_usage(self, input_tokens: int = 0, output_tokens: int = 0, *,
                     cost_usd: float | None = None) -> None:
        """Count model usage spent in the run outside any step (the agent's own model calls;
        the OpenAI and Anthropic integrations report theirs here when no step is running)."""
        self._count_usage(input_tokens, output_tokens, cost_usd)

    # ----- stopping -----------------------------------------------------------------------
    def halt(self, reason: str) -> None:
        """Stop the run: every later step is refused (``halted``/``run_halted``); the run
        ends ``halted``. Safe from any thread; the first stop wins."""
        with self._lock:
            if self._stop is None:
                self._stop = Admission.run_halted(
                    f"run {self.run_id} halted: {clip(str(reason), _MAX_MESSAGE)}")

    def _halted_in_store(self, halt: RunHalt) -> None:
        """A halt of this run recorded in the store (seen by the watch's thread)."""
        with self._lock:
            if self._stop is None:
                self._stop = Admission.run_halted(
                    f"run {self.run_id} halted by {halt.by}: {halt.reason}")

    def abort(self, reason: str) -> None:
        """Stop the run and have it end ``aborted``: later steps are refused, and when the
        block ends every registered compensation runs (newest first)."""
        with self._lock:
            if self._end is not Outcome.ABORTED:
                self._stop = Admission.run_halted(
                    f"run {self.run_id} aborted: {clip(str(reason), _MAX_MESSAGE)}")
                self._end = Outcome.ABORTED

    @property
    def stopped(self) -> str | None:
        """Why the run refuses steps (a budget, a halt, an abort), or None."""
        stop = self._stop
        return stop.reason if stop is not None else None

    # ----- tools --------------------------------------------------------------------------
    def count_invalid(self, tool: str) -> int:
        """Count one invalid call of ``tool`` in this run; the count so far."""
        with self._lock:
            n = self._invalid[tool] = self._invalid.get(tool, 0) + 1
        return n

    # ----- rollback -----------------------------------------------------------------------
    def on_rollback(self, fn: Callable[..., Any], *args: Any,
                    check: Callable[..., Any] | None = None, label: str | None = None) -> None:
        """Register how to undo an action: ``fn(*args)``, then ``check(*args)`` (a verdict,
        as a verifier returns: None/True passes) to verify the state was restored.

        Called from inside a step (its executor, a tool), it is tied to that step: undone at
        once if the step's verification fails, else when the run ends in a rollback outcome.
        Called outside any step, it is undone only then. May be async under ``async with``.
        """
        if not callable(fn) or (check is not None and not callable(check)):
            raise ConfigError("on_rollback needs a callable (and a callable check)")
        name = label or getattr(fn, "__name__", None) or type(fn).__name__
        with self._lock:
            self._rollbacks.append(_Rollback(current_step_id(), fn, args, check, str(name)))

    def compensate(self, step_id: str, event: StepEvent
                   ) -> Generator[Compensate, Any, None] | None:
        """The rollback of what ``step_id`` registered (its verification failed), or None."""
        with self._lock:
            mine = [e for e in self._rollbacks if e.step_id == step_id]
            if not mine:
                return None
            self._rollbacks = [e for e in self._rollbacks if e.step_id != step_id]
        return self._rollback(mine, f"verification failed: {event.error_message or ''}")

    def _rollback(self, entries: list[_Rollback], reason: str
                  ) -> Generator[Compensate, Any, None]:
        """Undo ``entries`` newest first, each checked, each recorded (event and span)."""
        for entry in reversed(entries):
            started, ts = self.clock(), self.wallclock()
            outcome, error, passed = Outcome.COMPENSATED, None, None
            try:
                yield Compensate(entry.fn, entry.args, entry.label)
            except Exception as exc:  # noqa: BLE001 - recorded as a failed compensation
                outcome, error = Outcome.COMPENSATION_FAILED, f"{entry.label}: {_describe(exc)}"
            act = self.clock()
            if outcome is Outcome.COMPENSATED and entry.check is not None:
                check = f"{entry.label}.check"
                try:
                    value = yield Compensate(entry.check, entry.args, entry.label, True)
                    verdict = (Verdict(check=check) if value is None or value is True
                               else as_verdict(value, check))
                except Exception as exc:  # noqa: BLE001 - a crashed check cannot tell
                    verdict = Verdict.cannot_tell(f"check crashed: {_describe(exc)}",
                                                  check=check)
                passed = verdict.passed
                if not passed:
                    outcome = Outcome.COMPENSATION_FAILED
                    issues = "; ".join(i.render() for i in verdict.blocking_issues)
                    unknown = f"unknown: {verdict.unknown}" if verdict.unknown else ""
                    error = clip(f"{check}: state not restored: {issues or unknown}",
                                 _MAX_MESSAGE)
            self._record_compensation(entry, reason, outcome=outcome, error=error, passed=passed,
                                      ts=ts, started=started, act=act)

    def _record_compensation(self, entry: _Rollback, reason: str, *, outcome: Outcome,
                             error: str | None, passed: bool | None, ts: float,
                             started: float, act: float) -> None:
        now = self.clock()
        with self._lock:
            if outcome is Outcome.COMPENSATED:
                self.compensated += 1
            else:
                self.failed += 1
        event = StepEvent(
            ts=ts, trace_id=entry.trace_id or new_trace_id(), agent_id="closedloop.compensate",
            task_type=entry.task_type or self.name or "run", autonomy="autonomous",
            outcome=outcome.value, attempts=0, input_tokens=0, output_tokens=0,
            latency_ms=(now - started) * 1000.0, validation_passed=None,
            verification_passed=passed,
            error_type=ErrorType.COMPENSATION.value if error is not None else None,
            error_message=error, propose_ms=0.0, validate_ms=0.0,
            act_ms=(act - started) * 1000.0, verify_ms=(now - act) * 1000.0,
            detail={"compensation": entry.label, "compensates": entry.step_id,
                    "reason": clip(reason, _MAX_MESSAGE)},
            step_id=new_step_id(), parent_step_id=entry.step_id,
            run_id=None if self._detached else self.run_id,
            labels=dict(self.labels) if self.labels else None)
        store = self._store
        if store is not None:
            try:
                store.record(event)
            except Exception:  # noqa: BLE001 - recording must never break the rollback
                _log.exception("closedloop: recording compensation %s failed", entry.label)
        if outcome is not Outcome.COMPENSATED:
            _log.error("closedloop: run %s: compensation %s failed: %s", self.run_id,
                       entry.label, error)
        telemetry = self._telemetry
        if telemetry is not None:
            attrs = {"closedloop.task_type": event.task_type, "closedloop.outcome": outcome.value,
                     "closedloop.step_id": event.step_id, "closedloop.run_id": self.run_id,
                     "closedloop.compensation": entry.label}
            if self._detached:
                del attrs["closedloop.run_id"]
            if entry.step_id is not None:
                attrs["closedloop.parent_step_id"] = entry.step_id
            span = telemetry.start_span(f"closedloop.compensate {entry.label}", attrs,
                                        parent=self._span.record if self._span else None)
            span.start_ns -= int((now - started) * 1e9)
            if error is not None:
                span.fail(error)
            telemetry.end_span(span)

    @classmethod
    def detached(cls, store: Store | None) -> Run:
        """A run that is never entered, to roll back a step made outside any run (its
        compensation events have no run id)."""
        run = cls(store=store, telemetry=None)
        run._store = store
        run._detached = True
        return run

    def __repr__(self) -> str:
        state = self.outcome.value if self.outcome is not None else "running"
        return f"Run({self.name!r}, run_id={self.run_id!r}, {state})"


class _HaltWatch:
    """Reads the store's halts of the runs open in this process, from a thread of its own.

    One per store (and process); its thread runs while runs are registered, reading every
    ``interval`` seconds (the shortest ``halt_poll`` of its runs) the halts of all of them in
    one query, and halting each run it finds. ``read_at`` is the monotonic time the last
    good read started: the runs compare it with their ``halt_stale``.
    """

    _watches: ClassVar[weakref.WeakKeyDictionary[Any, _HaltWatch]] = (
        weakref.WeakKeyDictionary())
    _watches_lock = threading.Lock()

    def __init__(self, port: RunHaltStore, url: str) -> None:
        self.port = port
        self.url = url
        self.read_at = _monotonic()
        self.error = ""
        """``": <why the last read failed>"`` while reads fail, else empty."""
        self.interval = HALT_POLL_S
        self._runs: dict[str, Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @classmethod
    def register(cls, store: Store, run: Run) -> _HaltWatch | None:
        """Watch ``run``'s halts in ``store``; None when the store keeps no halts."""
        from closedloop.store import run_store_for

        with cls._watches_lock:
            try:
                watch = cls._watches.get(store)
            except TypeError:  # not weakly referenceable: a stand-in for a Store
                return None
            if watch is None:
                port: object = run_store_for(store) if hasattr(store, "backend") else None
                if not isinstance(port, RunHaltStore):
                    return None
                watch = cls._watches[store] = _HaltWatch(port, store.url)
        watch.add(run)
        return watch

    def add(self, run: Run) -> None:
        assert run.halt_poll is not None
        with self._lock:
            if not self._runs:
                self.interval = run.halt_poll
            else:
                self.interval = min(self.interval, run.halt_poll)
            self._runs[run.run_id] = run
            if self._thread is None or self._pid != os.getpid():
                self._start()

    def _start(self) -> None:
        """Start the thread (lock held); the runs get a fresh grace of ``halt_stale``."""
        self._pid = os.getpid()
        self.read_at = _monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name="closedloop-run-halts")
        self._thread.start()

    def revive(self) -> None:
        """Start the thread again in a forked child (the parent's did not come along)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid() and self._runs:
                    self._start()

    def unregister(self, run: Run) -> None:
        with self._lock:
            if self._runs.get(run.run_id) is run:
                del self._runs[run.run_id]
            if not self._runs:
                self._wake.set()

    def _loop(self) -> None:
        me = threading.current_thread()
        warned = False
        while True:
            self._wake.wait(self.interval)
            with self._lock:
                self._wake.clear()
                if not self._runs or self._thread is not me:
                    if self._thread is me:
                        self._thread = None
                    return
                runs = dict(self._runs)
            started = _monotonic()
            try:
                halts: dict[str, RunHalt] = {}
                ids = list(runs)
                for i in range(0, len(ids), MAX_HALT_IDS):
                    halts.update(self.port.run_halts(ids[i:i + MAX_HALT_IDS]))
            except Exception as exc:  # noqa: BLE001 - the runs fail closed once it lasts
                self.error = f": {clip(f'{type(exc).__name__}: {exc}', 300)}"
                if not warned:
                    warned = True
                    _log.warning("closedloop: cannot read the halts of runs in %s (%s); runs "
                                 "refuse their steps once this lasts longer than their "
                                 "halt_stale", self.url, self.error[2:])
                continue
            for run_id, halt in halts.items():
                run = runs.get(run_id)
                if run is not None:
                    run._halted_in_store(halt)
            self.read_at = started  # after the halts are applied: no step slips between
            if warned:
                warned = False
                self.error = ""
                _log.warning("closedloop: the halts of runs in %s are read again", self.url)


def _who() -> str:
    user = os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"
    return f"{user}@{socket.gethostname()} (pid {os.getpid()})"


def halt_run(run_id: str, *, reason: str, by: str | None = None,
             store: Store | None = None) -> RunHalt:
    """Halt the run ``run_id`` wherever it runs: the halt (who, when, why) is recorded in
    ``store`` (default: the runtime's), and the run's process, polling the store, refuses
    every later step; the run ends ``halted``. ``by`` defaults to user@host (pid).

    Returns the halt in force: the first one recorded, if the run was halted already.
    Raises :class:`~closedloop.ConfigError` for an empty reason, a run the store does not
    know or one that has ended, or a store that keeps no halts (a plug-in backend's).
    """
    from closedloop.store import run_store_for

    if not isinstance(reason, str) or not reason.strip():
        raise ConfigError("a reason is required to halt a run (--reason TEXT)")
    run_id = run_id.strip() if isinstance(run_id, str) else ""
    if not run_id:
        raise ConfigError("a run id is required")
    store = store if store is not None else _runtime.current_runtime().store
    runs = run_store_for(store)
    port: object = runs
    if runs is None or not isinstance(port, RunHaltStore):
        raise ConfigError(f"store {store.url} keeps no run halts (use a sqlite:///, "
                          "postgresql:// or memory:// store)")
    record = runs.get_run(run_id)
    if record is None:
        raise ConfigError(f"no run {run_id} in {store.url}")
    if record.ended is not None:
        raise ConfigError(f"run {run_id} has ended ({record.outcome}); nothing to halt")
    halt = RunHalt(run_id=run_id, reason=reason.strip(),
                   by=by.strip() if by and by.strip() else _who(), at=time.time())
    return port.halt_run(halt.redacted())


def current_run() -> Run | None:
    """The :class:`Run` open in this context, or None."""
    run = run_scope.get()
    return run if isinstance(run, Run) else None


def _drive(gen: Generator[Compensate, Any, None]) -> None:
    """Run a rollback's actions in this thread (async ones are an error here)."""
    try:
        action = next(gen)
        while True:
            try:
                value = action.fn(*action.args)
                if inspect.isawaitable(value):
                    close = getattr(value, "close", None)
                    if callable(close):
                        close()
                    raise ConfigError(f"compensation {action.name} is async; use `async with "
                                      "Run(...)` (or an async tool) to run it")
            except Exception as exc:  # noqa: BLE001 - handed to the rollback, which records it
                action = gen.throw(exc)
                continue
            action = gen.send(value)
    except StopIteration:
        pass
    finally:
        gen.close()


async def _adrive(gen: Generator[Compensate, Any, None]) -> None:
    """Run a rollback's actions in asyncio, awaiting the async ones."""
    try:
        action = next(gen)
        while True:
            try:
                value = action.fn(*action.args)
                if inspect.isawaitable(value):
                    value = await value
            except Exception as exc:  # noqa: BLE001 - handed to the rollback, which records it
                action = gen.throw(exc)
                continue
            action = gen.send(value)
    except StopIteration:
        pass
    finally:
        gen.close()
