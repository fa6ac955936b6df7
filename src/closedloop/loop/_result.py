"""What the agent sees of an attempt, and what a caller gets back from a step."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from closedloop._errors import (
    Blocked,
    CheckCrashed,
    NotExecuted,
    StepFailed,
    ValidationFailed,
    VerificationFailed,
)
from closedloop._events import ErrorType, Outcome, StepEvent
from closedloop._verdict import Issue, Verdict

if TYPE_CHECKING:
    from closedloop.control import Backpressure

PropT = TypeVar("PropT")
ResT = TypeVar("ResT")


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of the agent at a task; passed to the agent as its second argument.

    On a retry, ``feedback`` holds the previous attempt's validation errors rendered for the
    model, and ``issues`` the same errors as data. Report model usage with
    :meth:`record_usage` (integrations do it for you); it adds up over attempts. Make calls to
    rate-limited providers through ``backpressure`` (``attempt.backpressure.call(key, fn)``
    or ``await ...acall(...)``): the loop's adaptive limiter, breaker and retry budget.
    """

    number: int
    trace_id: str
    task_type: str
    feedback: str | None = None
    issues: tuple[Issue, ...] = ()
    input_tokens: int = 0
    output_tokens: int = 0
    backpressure: Backpressure | None = None

    @property
    def is_retry(self) -> bool:
        """True from the second attempt on."""
        return self.number > 1

    def record_usage(self, input_tokens: int = 0, output_tokens: int = 0) -> None:
        """Add the tokens one model call used to this step's totals."""
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens


_current_attempt: ContextVar[Attempt | None] = ContextVar("closedloop_attempt", default=None)


def current_attempt() -> Attempt | None:
    """The attempt running in this context, for integrations that record model usage."""
    return _current_attempt.get()


_FAILURES: dict[str, type[StepFailed]] = {
    ErrorType.VALIDATION: ValidationFailed,
    ErrorType.BLOCKED: Blocked,
    ErrorType.VERIFICATION: VerificationFailed,
    ErrorType.VERIFICATION_UNKNOWN: VerificationFailed,
    ErrorType.VALIDATOR_ERROR: CheckCrashed,
    ErrorType.VERIFIER_ERROR: CheckCrashed,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult(Generic[PropT, ResT]):
    """The end of one step: the outcome, the last proposal, the action's result, the verdicts.

    A failed validation or verification is an outcome, not an exception: inspect ``ok`` and
    ``outcome``, or call :meth:`raise_for_outcome` to turn anything but success into a
    :class:`~closedloop.StepFailed`.
    """

    trace_id: str
    outcome: Outcome
    proposal: PropT | None
    result: ResT | None
    attempts: int
    validation: tuple[Verdict, ...] = ()
    verification: tuple[Verdict, ...] = ()
    error_type: ErrorType | None = None
    error_message: str | None = None
    event: StepEvent | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """True when the proposal was executed and verified (or needed no executor)."""
        return self.outcome is Outcome.SUCCEEDED

    def raise_for_outcome(self) -> StepResult[PropT, ResT]:
        """Return self on success; otherwise raise the matching :class:`StepFailed`."""
        if self.outcome is Outcome.SUCCEEDED:
            return self
        message = f"step {self.trace_id} {self.outcome.value}"
        if self.error_message:
            message += f": {self.error_message}"
        exc_type = _FAILURES.get(self.error_type or "", NotExecuted)
        raise exc_type(message, self)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the proposal and result are left out: they are the user's)."""
        return {
            "trace_id": self.trace_id,
            "outcome": self.outcome.value,
            "attempts": self.attempts,
            "error_type": self.error_type.value if self.error_type else None,
            "error_message": self.error_message,
            "validation": [v.to_dict() for v in self.validation],
            "verification": [v.to_dict() for v in self.verification],
        }
