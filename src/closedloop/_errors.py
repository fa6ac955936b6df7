"""closedloop's exceptions, one rooted tree.

::

    ClosedLoopError
    ├── ConfigError          a user mistake: bad store URL, bad option, async hook in a sync run
    ├── StoreError           the event store cannot be opened, migrated or read
    ├── CheckTimeout         a validator or verifier missed its deadline (also a TimeoutError)
    ├── ControlUnavailable   pause/halt state or autonomy levels cannot be read or written
    ├── ApprovalError        an approval request refused a decision, claim or execution
    ├── BackpressureError    flow control did not make (or retry) a call   [closedloop.control]
    │   ├── CircuitOpen          the key's breaker is open past the call's deadline
    │   └── DeadlineExceeded     the next slot or retry comes after the deadline
    └── StepFailed           raised by ``StepResult.raise_for_outcome()`` (and guarded tools)
        ├── ValidationFailed     validation still failed after the last re-ask
        ├── Blocked              a critical validation issue stopped the step, no re-ask
        ├── VerificationFailed   the real outcome did not match the intent (or was unknown)
        ├── NotExecuted          suggest-only, awaiting approval, or rejected by the approver
        ├── CheckCrashed         a validator or verifier itself raised
        └── ToolRefused          a guarded tool refused a call: its run stopped (budget, halt),
                                 its task type is halted, or too many invalid calls

``StepFailed`` is raised only by ``StepResult.raise_for_outcome()`` and by guarded tools
(:func:`closedloop.tool`), which raise ``ToolRefused``.

Exceptions raised by the user's own agent or executor are never wrapped: they propagate
unchanged, after being recorded, with a note naming the trace id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from closedloop.loop import StepResult


class ClosedLoopError(Exception):
    """Root of every exception closedloop raises itself."""


class ConfigError(ClosedLoopError):
    """A user mistake in configuration or call: the message names the problem and the fix."""


class StoreError(ClosedLoopError):
    """The event store cannot be opened, migrated or read."""


class CheckTimeout(ClosedLoopError, TimeoutError):
    """A validator or verifier did not return within its deadline.

    It is raised (never turned into a verdict) so that the loop records the step as
    ``validator_error``/``verifier_error``: the check failed, not the agent.
    """


class ControlUnavailable(ClosedLoopError):
    """Pause and halt state (or autonomy levels) cannot be read or written: Redis down, disk
    full, no descriptors.

    A guard raises it from ``admit`` when it cannot decide; the loop then refuses the step
    with outcome ``control_unavailable`` (fail closed) unless the loop was built with
    ``fail_open=True``. See docs/control.md.
    """


class ApprovalError(ClosedLoopError):
    """An approval request refused what was asked of it: ``code`` says why, one of
    ``not_found``, ``not_pending``, ``expired``, ``self_approval``, ``same_approver``,
    ``not_retryable``, ``cannot_execute``, ``digest_mismatch``, ``unavailable`` (the store
    could not be read or written: nothing was decided or executed)."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


class StepFailed(ClosedLoopError):
    """A step ended without a verified action; carries the step's result."""

    def __init__(self, message: str, result: StepResult[Any, Any]) -> None:
        super().__init__(message)
        self.result = result

    @property
    def trace_id(self) -> str:
        """The trace id of the failed step, to find it in the store."""
        return self.result.trace_id


class ValidationFailed(StepFailed):
    """Validation still failed after the last allowed attempt."""


class Blocked(StepFailed):
    """A critical issue (for example a destructive change) stopped the step without re-ask."""


class VerificationFailed(StepFailed):
    """The action ran but the resulting state did not match the intent, or could not be read."""


class NotExecuted(StepFailed):
    """The proposal was recorded but not executed (suggest-only, awaiting approval, rejected)."""


class CheckCrashed(StepFailed):
    """A validator or verifier raised instead of returning a verdict."""


class ToolRefused(StepFailed):
    """A guarded tool (:func:`closedloop.tool`) refused the call, and the agent should stop
    calling it: the run's budget is spent or the run is halted, the tool's task type is
    halted or its control state unreadable, or the model made more invalid calls in the run
    than the tool allows. The refused call is recorded (``result.event``)."""
