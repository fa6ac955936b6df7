"""The plug point for fault control: guards admit (or refuse) a step and observe its event.

Backpressure and fault control (pause on validation-failure spikes, a halt only a human
lifts) are guards. ``admit`` runs before the agent and may be plain or ``async def`` (a
guard backed by a server may await it). ``observe`` sees every recorded event, on the
agent's own path: it must be a plain, quick, non-blocking call (in-memory bookkeeping;
anything slower belongs on a background thread of the guard's own).

Guards fail closed: an ``admit`` that raises (for example
:class:`~closedloop.ControlUnavailable` when the halt state cannot be read) refuses the
step with outcome ``control_unavailable``, unless its loop was built with
``fail_open=True``. An ``observe`` that raises is logged and the step's result stands.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from closedloop._events import ErrorType, Outcome, StepEvent


@dataclass(frozen=True, slots=True, kw_only=True)
class Admission:
    """A guard's refusal: the step is recorded with this outcome and reason, nothing runs."""

    outcome: Outcome
    error_type: ErrorType
    reason: str

    @classmethod
    def paused(cls, reason: str) -> Admission:
        """Refuse for now; the guard will admit again on its own."""
        return cls(outcome=Outcome.PAUSED, error_type=ErrorType.PAUSED, reason=reason)

    @classmethod
    def halted(cls, reason: str) -> Admission:
        """Refuse until a human lifts the halt."""
        return cls(outcome=Outcome.HALTED, error_type=ErrorType.HALTED, reason=reason)

    @classmethod
    def over_budget(cls, reason: str) -> Admission:
        """Refuse because a budget of the step's run is spent."""
        return cls(outcome=Outcome.BUDGET_EXCEEDED, error_type=ErrorType.BUDGET_EXCEEDED,
                   reason=reason)

    @classmethod
    def run_halted(cls, reason: str) -> Admission:
        """Refuse because the step's run was halted or aborted."""
        return cls(outcome=Outcome.HALTED, error_type=ErrorType.RUN_HALTED, reason=reason)

    @classmethod
    def unavailable(cls, reason: str) -> Admission:
        """Refuse because admission cannot be decided (fail closed)."""
        return cls(outcome=Outcome.CONTROL_UNAVAILABLE,
                   error_type=ErrorType.CONTROL_UNAVAILABLE, reason=reason)


@runtime_checkable
class StepGuard(Protocol):
    """Decides whether a task type's step may run, and learns from each step's event.

    A guard whose ``admit`` never refuses (it only learns) may say so with a class attribute
    ``observe_only = True``: the loop then does not ask it, saving a call per step. A guard
    whose answer is usually known from memory may define ``admits_now(task_type) -> bool``
    (plain, quick, no I/O, never raising): True admits the step without yielding its
    :class:`~closedloop.loop.Admit` action; False asks ``admit`` as usual. It is used only
    when the class defining ``admit`` defines it too (as
    :class:`~closedloop.control.FaultControl` does)."""

    def admit(self, task_type: str) -> object:
        """Return ``None`` to admit, or an :class:`Admission` to refuse (may be async).

        Raise (preferably :class:`~closedloop.ControlUnavailable`) when the decision cannot
        be made: the loop refuses the step unless it was opted into fail-open.
        """

    def observe(self, event: StepEvent) -> None:
        """See one recorded event: plain and quick; an exception is logged, never raised."""


class RunScope(Protocol):
    """A run as the loop sees it (:class:`closedloop.Run` implements it).

    While a run is open in a context, every step started there that belongs to it (its
    ``run_id`` is the run's) is admitted by it first (``admit``: budgets and halts; plain,
    quick, no I/O), shown to it after it is recorded (``observe``), and, when its
    verification failed, handed back for rollback (``compensate``: the actions that undo
    what the step registered, or None).
    """

    run_id: str

    def admit(self, task_type: str) -> Admission | None:
        """``None`` to admit the step, or the refusal to record."""

    def observe(self, event: StepEvent) -> None:
        """Count one recorded step of the run (plain and quick; never raises)."""

    def compensate(self, step_id: str, event: StepEvent) -> Generator[Any, Any, None] | None:
        """The rollback of what ``step_id`` registered (its verification failed), as a
        generator of actions the loop's drivers run, or None when it registered nothing."""
