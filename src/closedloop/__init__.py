"""closedloop: closed-loop, self-correcting production runtime for AI agents.

Every agent step runs through propose → validate (re-ask) → gate → act → verify → record.
The layers live in their own subpackages: :mod:`closedloop.loop` (the loop),
:mod:`closedloop.validate` (immediate validation), :mod:`closedloop.verify` (outcome
verification), :mod:`closedloop.autonomy` (human in the loop), :mod:`closedloop.store` and
:mod:`closedloop.learn` (the long-term learning signals). :func:`configure` sets the
process's store, control, backpressure and telemetry at once (:class:`Runtime`).
"""

import typing

from closedloop._version import __version__

if typing.TYPE_CHECKING:
    from closedloop._errors import (
        ApprovalError,
        Blocked,
        CheckCrashed,
        CheckTimeout,
        ClosedLoopError,
        ConfigError,
        ControlUnavailable,
        NotExecuted,
        StepFailed,
        StoreError,
        ValidationFailed,
        VerificationFailed,
    )
    from closedloop._events import ErrorType, Outcome, StepEvent
    from closedloop._redact import (
        Redactor,
        default_redactor,
        reset_default_redactor,
        set_default_redactor,
    )
    from closedloop._runtime import Runtime, configure, current_runtime, reset
    from closedloop._verdict import Issue, Severity, Verdict, as_verdict, render_feedback
    from closedloop.autonomy import Autonomy
    from closedloop.loop import (
        ApprovalPolicy,
        Attempt,
        Loop,
        StepResult,
        current_attempt,
        current_idempotency_key,
    )
    from closedloop.store import Store, default_store, open_store, reset_default_store

__all__ = [
    "ApprovalError",
    "ApprovalPolicy",
    "Attempt",
    "Autonomy",
    "Blocked",
    "CheckCrashed",
    "CheckTimeout",
    "ClosedLoopError",
    "ConfigError",
    "ControlUnavailable",
    "ErrorType",
    "Issue",
    "Loop",
    "NotExecuted",
    "Outcome",
    "Redactor",
    "Runtime",
    "Severity",
    "StepEvent",
    "StepFailed",
    "StepResult",
    "Store",
    "StoreError",
    "ValidationFailed",
    "Verdict",
    "VerificationFailed",
    "__version__",
    "as_verdict",
    "configure",
    "current_attempt",
    "current_idempotency_key",
    "current_runtime",
    "default_redactor",
    "default_store",
    "open_store",
    "render_feedback",
    "reset",
    "reset_default_redactor",
    "reset_default_store",
    "set_default_redactor",
]

if not typing.TYPE_CHECKING:  # type checkers read the imports above; at run time, import on use
    from closedloop._lazy import lazy_exports as _lazy_exports

    __getattr__, __dir__ = _lazy_exports(__name__, {
        "._errors": ("ApprovalError", "Blocked", "CheckCrashed", "CheckTimeout",
                     "ClosedLoopError", "ConfigError", "ControlUnavailable", "NotExecuted",
                     "StepFailed", "StoreError", "ValidationFailed", "VerificationFailed"),
        "._events": ("ErrorType", "Outcome", "StepEvent"),
        "._redact": ("Redactor", "default_redactor", "reset_default_redactor",
                     "set_default_redactor"),
        "._runtime": ("Runtime", "configure", "current_runtime", "reset"),
        "._verdict": ("Issue", "Severity", "Verdict", "as_verdict", "render_feedback"),
        ".autonomy": ("Autonomy",),
        ".loop": ("ApprovalPolicy", "Attempt", "Loop", "StepResult", "current_attempt",
                  "current_idempotency_key"),
        ".store": ("Store", "default_store", "open_store", "reset_default_store"),
    })
