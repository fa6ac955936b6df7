"""The closed loop: propose → validate (re-ask) → gate → act → verify → record."""

from closedloop.loop._gate import ApprovalPolicy, current_idempotency_key
from closedloop.loop._guard import Admission, RunScope, StepGuard
from closedloop.loop._loop import DEFAULT, Loop
from closedloop.loop._machine import (
    Act,
    Action,
    Admit,
    Approve,
    Assess,
    Compensate,
    Gate,
    Level,
    Propose,
    StepGen,
    StepSpec,
    Validate,
    Verify,
    Wait,
    new_step_id,
    new_trace_id,
)
from closedloop.loop._result import (
    Attempt,
    StepResult,
    current_attempt,
    current_run_id,
    current_step_id,
    run_scope,
)

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
    "Compensate",
    "Gate",
    "Level",
    "Loop",
    "Propose",
    "RunScope",
    "StepGen",
    "StepGuard",
    "StepResult",
    "StepSpec",
    "Validate",
    "Verify",
    "Wait",
    "current_attempt",
    "current_idempotency_key",
    "current_run_id",
    "current_step_id",
    "new_step_id",
    "new_trace_id",
    "run_scope",
]
