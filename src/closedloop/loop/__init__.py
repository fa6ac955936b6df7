"""The closed loop: propose → validate (re-ask) → gate → act → verify → record."""

from closedloop.loop._gate import ApprovalPolicy, current_idempotency_key
from closedloop.loop._guard import Admission, StepGuard
from closedloop.loop._loop import DEFAULT, Loop
from closedloop.loop._machine import (
    Act,
    Action,
    Admit,
    Approve,
    Assess,
    Gate,
    Propose,
    StepGen,
    StepSpec,
    Validate,
    Verify,
    Wait,
    new_step_id,
    new_trace_id,
)
from closedloop.loop._result import Attempt, StepResult, current_attempt, current_step_id

__all__ = [
    "DEFAULT",
    "Act",
    "Action",
    "Admission",
    "Admit",
    "ApprovalPolicy",
    "Approve",
    "Assess",
    "Attempt",
    "Gate",
    "Loop",
    "Propose",
    "StepGen",
    "StepGuard",
    "StepResult",
    "StepSpec",
    "Validate",
    "Verify",
    "Wait",
    "current_attempt",
    "current_idempotency_key",
    "current_step_id",
    "new_step_id",
    "new_trace_id",
]
