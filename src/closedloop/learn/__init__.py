"""The long-term learning layer: what the recorded events say about each task type.

Every step's :class:`~closedloop.StepEvent` lands in the store; this package turns a window
of them into signals — validation and verification pass rates, how often re-ask was needed
and whether it worked, outcomes, latency percentiles, tokens and the most frequent errors.
:func:`build_report` is its first query (``closedloop report`` prints it).
"""

from closedloop._figures import message_group, percentile
from closedloop.learn._report import (
    DEFAULT_TOP_ERRORS,
    DEFAULT_TOP_MESSAGES,
    ErrorCount,
    Latency,
    MessageCount,
    Rate,
    Report,
    TaskStats,
    Tokens,
    build_report,
    report_from_store,
)

__all__ = [
    "DEFAULT_TOP_ERRORS",
    "DEFAULT_TOP_MESSAGES",
    "ErrorCount",
    "Latency",
    "MessageCount",
    "Rate",
    "Report",
    "TaskStats",
    "Tokens",
    "build_report",
    "message_group",
    "percentile",
    "report_from_store",
]
