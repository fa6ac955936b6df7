"""Backpressure and fault control: the loop's protection against overload and bad streaks.

Two concerns, one place:

- **Flow control** around calls to rate-limited, failure-prone downstreams:
  :class:`Backpressure` (adaptive per-key rate that learns capacity without being told,
  in-flight cap, circuit breaker, full-jitter retries within a deadline and a retry budget),
  with its state local (:class:`LocalRates`) or shared through Redis (:class:`RedisRates`).
- **Fault control** of task types, as a :class:`~closedloop.loop.StepGuard`:
  :class:`FaultControl` pauses a task type whose validation failures spike and halts one
  whose outcome verification keeps failing, until a human resumes it.
"""

import typing

if typing.TYPE_CHECKING:
    from closedloop.control._alerts import (
        Alert,
        AlertSink,
        CaptureSink,
        LogSink,
        MetricSink,
        WebhookSink,
    )
    from closedloop.control._backpressure import (
        Backpressure,
        BackpressureError,
        CircuitOpen,
        DeadlineExceeded,
        default_backpressure,
        reset_default_backpressure,
    )
    from closedloop.control._core import BreakerState, Grant, KeyState, Limits
    from closedloop.control._fault import (
        FaultControl,
        default_fault_control,
        reset_default_fault_control,
        resume,
    )
    from closedloop.control._ledger import (
        CachedLedger,
        ControlLedger,
        MemoryLedger,
        Stop,
        StopKind,
        ledger_for_store,
    )
    from closedloop.control._redis import RedisLedger, RedisRates
    from closedloop.control._retry import RetryBudget, RetryPolicy
    from closedloop.control._signals import (
        RETRYABLE,
        Feedback,
        Signal,
        classify,
        parse_retry_after,
        retry_after_from_headers,
    )
    from closedloop.control._state import LocalRates, RateBackend
    from closedloop.store import SQLiteLedger

__all__ = [
    "RETRYABLE",
    "Alert",
    "AlertSink",
    "Backpressure",
    "BackpressureError",
    "BreakerState",
    "CachedLedger",
    "CaptureSink",
    "CircuitOpen",
    "ControlLedger",
    "DeadlineExceeded",
    "FaultControl",
    "Feedback",
    "Grant",
    "KeyState",
    "Limits",
    "LocalRates",
    "LogSink",
    "MemoryLedger",
    "MetricSink",
    "RateBackend",
    "RedisLedger",
    "RedisRates",
    "RetryBudget",
    "RetryPolicy",
    "SQLiteLedger",
    "Signal",
    "Stop",
    "StopKind",
    "WebhookSink",
    "classify",
    "default_backpressure",
    "default_fault_control",
    "ledger_for_store",
    "parse_retry_after",
    "reset_default_backpressure",
    "reset_default_fault_control",
    "resume",
    "retry_after_from_headers",
]


if not typing.TYPE_CHECKING:  # type checkers read the imports above; at run time, import on use
    from closedloop._lazy import lazy_exports as _lazy_exports

    __getattr__, __dir__ = _lazy_exports(__name__, {
        "._alerts": ("Alert", "AlertSink", "CaptureSink", "LogSink", "MetricSink", "WebhookSink"),
        "._backpressure": ("Backpressure", "BackpressureError", "CircuitOpen", "DeadlineExceeded",
                           "default_backpressure", "reset_default_backpressure"),
        "._core": ("BreakerState", "Grant", "KeyState", "Limits"),
        "._fault": ("FaultControl", "default_fault_control", "reset_default_fault_control",
                    "resume"),
        "._ledger": ("CachedLedger", "ControlLedger", "MemoryLedger", "Stop", "StopKind",
                     "ledger_for_store"),
        "._redis": ("RedisLedger", "RedisRates"),
        "._retry": ("RetryBudget", "RetryPolicy"),
        "._signals": ("RETRYABLE", "Feedback", "Signal", "classify", "parse_retry_after",
                      "retry_after_from_headers"),
        "._state": ("LocalRates", "RateBackend"),
        "closedloop.store": ("SQLiteLedger",),  # the store keeps it; re-exported as before
    })
