"""The closed loop: propose → validate (re-ask) → gate → act → verify → record."""

from closedloop.loop._guard import Admission, StepGuard
from closedloop.loop._loop import DEFAULT, Loop
from closedloop.loop._machine import new_trace_id
from closedloop.loop._result import Attempt, StepResult, current_attempt

__all__ = [
    "DEFAULT",
    "Admission",
    "Attempt",
    "Loop",
    "StepGuard",
    "StepResult",
    "current_attempt",
    "new_trace_id",
]
