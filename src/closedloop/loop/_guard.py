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

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

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
    def unavailable(cls, reason: str) -> Admission:
        """Refuse because admission cannot be decided (fail closed)."""
        return cls(outcome=Outcome.CONTROL_UNAVAILABLE,
                   error_type=ErrorType.CONTROL_UNAVAILABLE, reason=reason)


@runtime_checkable
class StepGuard(Protocol):
    """Decides whether a task type's step may run, and learns from each step's event."""

    def admit(self, task_type: str) -> object:
        """Return ``None`` to admit, or an :class:`Admission` to refuse (may be async).

        Raise (preferably :class:`~closedloop.ControlUnavailable`) when the decision cannot
        be made: the loop refuses the step unless it was opted into fail-open.
        """

    def observe(self, event: StepEvent) -> None:
        """See one recorded event: plain and quick; an exception is logged, never raised."""
