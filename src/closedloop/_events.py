"""The structured event recorded for every step: the unit of the long-term learning layer.

``StepEvent`` is a ``NamedTuple`` on purpose: it is built on the agent's hot path and written
to the store as-is, so it must be cheap to create and already shaped like a table row.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Any, NamedTuple


class Outcome(StrEnum):
    """How a step ended."""

    SUCCEEDED = "succeeded"
    """Executed and every verifier passed."""
    SUGGESTED = "suggested"
    """Suggest-only autonomy: the validated proposal was recorded, never executed."""
    AWAITING_APPROVAL = "awaiting_approval"
    """Approve autonomy with no approver attached: recorded, not executed."""
    REJECTED = "rejected"
    """The approver said no."""
    FAILED = "failed"
    """Validation (after the last re-ask) or verification failed; see ``error_type``."""
    BLOCKED = "blocked"
    """A critical validation issue stopped the step without re-ask."""
    ERROR = "error"
    """An exception in the agent, the executor, or a check; see ``error_type``."""
    PAUSED = "paused"
    """A guard refused the step for now (for example a validation-failure spike)."""
    HALTED = "halted"
    """A guard refused the step until a human lifts the halt."""
    CONTROL_UNAVAILABLE = "control_unavailable"
    """Admission could not be decided (control state unreadable): refused, fail closed."""


class ErrorType(StrEnum):
    """Why a step did not succeed; stable values, safe as metric labels."""

    VALIDATION = "validation"
    VERIFICATION = "verification"
    VERIFICATION_UNKNOWN = "verification_unknown"
    BLOCKED = "blocked"
    AGENT = "agent"
    EXECUTOR = "executor"
    VALIDATOR_ERROR = "validator_error"
    VERIFIER_ERROR = "verifier_error"
    PAUSED = "paused"
    HALTED = "halted"
    CONTROL_UNAVAILABLE = "control_unavailable"


class StepEvent(NamedTuple):
    """One step of one agent, as recorded in the store (one row).

    The first ten fields after the timestamp are the design's event; the rest are
    closedloop's: the trace id, attempts, autonomy, outcome, per-stage timings, and a JSON
    ``detail`` with the issues and exception of a step that did not succeed.
    """

    ts: float
    trace_id: str
    agent_id: str
    task_type: str
    autonomy: str
    outcome: str
    attempts: int
    input_tokens: int
    output_tokens: int
    latency_ms: float
    validation_passed: bool | None
    verification_passed: bool | None
    error_type: str | None
    error_message: str | None
    propose_ms: float
    validate_ms: float
    act_ms: float
    verify_ms: float
    detail: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form, with an ISO-8601 timestamp added for people."""
        out = self._asdict()
        out["time"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(self.ts)) + "Z"
        return out

    def to_row(self) -> tuple[Any, ...]:
        """The row stored in SQL backends, a plain tuple with ``detail`` as JSON text."""
        if self.detail is None:
            return tuple(self)
        return (*self[:-1], json.dumps(self.detail, default=str, separators=(",", ":")))


EVENT_FIELDS: tuple[str, ...] = StepEvent._fields
