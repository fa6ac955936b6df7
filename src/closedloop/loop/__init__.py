"""The closed loop: propose → validate (re-ask) → gate → act → verify → record."""

from closedloop.loop._guard import Admission, StepGuard
from closedloop.loop._loop import DEFAULT, Loop
from closedloop.loop._machine import (
    Act,
    Action,
    Admit,
    Approve,
    Propose,
    Validate,
    Verify,
    new_trace_id,
)
from closedloop.loop._result import Attempt, StepResult, current_attempt

__all__ = [
    "DEFAULT",
    "Act",
    "Action",
    "Admission",
    "Admit",
    "Approve",
    "Attempt",
    "Loop",
    "Propose",
    "StepGuard",
    "StepResult",
    "Validate",
    "Verify",
    "current_attempt",
    "new_trace_id",
]
