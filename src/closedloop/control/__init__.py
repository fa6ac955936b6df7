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

from closedloop.control._backpressure import (
    Backpressure,
    BackpressureError,
    CircuitOpen,
    DeadlineExceeded,
)
from closedloop.control._core import BreakerState, Grant, KeyState, Limits
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

__all__ = [
    "RETRYABLE",
    "Backpressure",
    "BackpressureError",
    "BreakerState",
    "CircuitOpen",
    "DeadlineExceeded",
    "Feedback",
    "Grant",
    "KeyState",
    "Limits",
    "LocalRates",
    "RateBackend",
    "RetryBudget",
    "RetryPolicy",
    "Signal",
    "classify",
    "parse_retry_after",
    "retry_after_from_headers",
]
