"""What the agent sees of an attempt, and what a caller gets back from a step."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
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


_new_object = object.__new__


@dataclass(slots=True, eq=False)
class Attempt:
    """One try of the agent at a task; passed to the agent as its second argument.

    On a retry, ``feedback`` holds the previous attempt's validation errors rendered for the
    model, and ``issues`` the same errors as data. Report model usage with
    :meth:`record_usage` (integrations do it for you); it adds up over attempts. Make calls to
    rate-limited providers through ``backpressure`` (``attempt.backpressure.call(key, fn)``
    or ``await ...acall(...)``): the loop's adaptive limiter, breaker and retry budget.
    ``step_id`` is the step's id, the one its event is recorded under.
    """

    number: int
    trace_id: str
    task_type: str
    feedback: str | None = None
    issues: tuple[Issue, ...] = ()
    input_tokens: int = 0
    output_tokens: int = 0
    backpressure: Backpressure | None = None
    step_id: str | None = None
    cached_input_tokens: int = 0
    """Of ``input_tokens``, those read from the provider's prompt cache."""
    cost_usd: float | None = None
    """What the step's model calls cost, when someone priced them (None: not priced)."""
    model: str | None = None
    """The model of the step's last model call (the event's ``model``)."""
    provider: str | None = None
    """Who served it: ``openai``, ``anthropic``… (the event's ``provider``)."""

    @property
    def is_retry(self) -> bool:
        """True from the second attempt on."""
        return self.number > 1

    def record_usage(self, input_tokens: int = 0, output_tokens: int = 0, *,
                     cached_input_tokens: int = 0, cost_usd: float | None = None,
                     model: str | None = None, provider: str | None = None) -> None:
        """Add what one model call used to this step's totals.

        ``input_tokens`` counts every input token, cached ones too; ``cached_input_tokens``
        says how many of them came from the prompt cache. ``cost_usd`` adds to the step's
        cost; ``model`` and ``provider``, when given, become the step's (the last call's win).
        """
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        if cached_input_tokens:
            self.cached_input_tokens += cached_input_tokens
        if cost_usd is not None:
            self.cost_usd = cost_usd if self.cost_usd is None else self.cost_usd + cost_usd
        if model is not None:
            self.model = model
        if provider is not None:
            self.provider = provider


def new_attempt(trace_id: str, task_type: str, backpressure: Backpressure | None,
                step_id: str) -> Attempt:
    """A step's first :class:`Attempt`, as ``Attempt(number=1, trace_id=..., task_type=...,
    backpressure=..., step_id=...)`` builds it at half the cost: on the loop's hot path, a
    dataclass call with keywords goes through a keyword dict."""
    attempt = _new_object(Attempt)
    attempt.number = 1
    attempt.trace_id = trace_id
    attempt.task_type = task_type
    attempt.feedback = None
    attempt.issues = ()
    attempt.input_tokens = 0
    attempt.output_tokens = 0
    attempt.backpressure = backpressure
    attempt.step_id = step_id
    attempt.cached_input_tokens = 0
    attempt.cost_usd = None
    attempt.model = None
    attempt.provider = None
    return attempt


_current_attempt: ContextVar[Attempt | None] = ContextVar("closedloop_attempt", default=None)
_current_step: ContextVar[tuple[str, str | None] | None] = ContextVar("closedloop_step",
                                                                      default=None)
"""``(step_id, run_id)`` of the step whose hooks run in this context: a step started there
is its child (``parent_step_id``) and, unless given its own, joins its run."""


def current_attempt() -> Attempt | None:
    """The attempt running in this context, for integrations that record model usage."""
    return _current_attempt.get()


def current_step_id() -> str | None:
    """The id of the step whose agent, check, approver or executor runs in this context.

    A :class:`~closedloop.Loop` step started there records it as its ``parent_step_id``.
    Context follows asyncio tasks; a thread you start yourself needs the context copied
    (``contextvars.copy_context().run``) to carry it, as with OpenTelemetry.
    """
    step = _current_step.get()
    return step[0] if step is not None else None


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
    approval_id: str | None = None
    """The durable approval request this step made (``closedloop approvals show ID``)."""

    @property
    def step_id(self) -> str | None:
        """The step's id (its event's ``step_id``)."""
        return self.event.step_id if self.event is not None else None

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
            "step_id": self.step_id,
            "outcome": self.outcome.value,
            "attempts": self.attempts,
            "error_type": self.error_type.value if self.error_type else None,
            "error_message": self.error_message,
            "approval_id": self.approval_id,
            "validation": [v.to_dict() for v in self.validation],
            "verification": [v.to_dict() for v in self.verification],
        }


_SETTERS: tuple[Callable[[object, Any], None], ...] = tuple(
    StepResult.__dict__[f.name].__set__ for f in fields(StepResult))
"""Each field's slot setter, in field order (a slotted dataclass keeps its fields in member
descriptors); :func:`new_result` takes its parameters in the same order."""


def new_result(
    *, trace_id: str, outcome: Outcome, proposal: Any, result: Any, attempts: int,
    validation: tuple[Verdict, ...], verification: tuple[Verdict, ...],
    error_type: ErrorType | None, error_message: str | None, event: StepEvent | None,
    approval_id: str | None = None,
) -> StepResult[Any, Any]:
    """``StepResult(...)`` at under half the cost, for the loop's hot path (equal to it).

    The frozen dataclass's ``__init__`` is reached through a keyword dict and sets each
    field with ``object.__setattr__`` (~1 µs for ten fields); this sets each slot through
    its descriptor. The result is as immutable as any other."""
    new = _new_object(StepResult)
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10 = _SETTERS
    s0(new, trace_id)
    s1(new, outcome)
    s2(new, proposal)
    s3(new, result)
    s4(new, attempts)
    s5(new, validation)
    s6(new, verification)
    s7(new, error_type)
    s8(new, error_message)
    s9(new, event)
    s10(new, approval_id)
    return new
