"""Human in the loop: the autonomy level of a task type decides whether a proposal executes.

``suggest`` records the validated proposal and never executes it; ``approve`` executes only
after a yes: an inline ``approver=`` callback decides at once, and without one the step
stores a durable approval request that a person decides (``closedloop approvals``) and that
executes exactly once, in the asking process or a worker (:mod:`closedloop.approvals`,
docs/approvals.md); ``autonomous`` executes. A proposal a risk rule marks high-stakes waits
for a person at every level.

Levels are earned (docs/autonomy.md): a loop whose ``autonomy`` is not pinned runs each step
at the **stored** level of its (agent, task type, action class) (:class:`AutonomyLevels`,
kept by the store behind the :class:`LevelStore` port, with an audit trail of every change).
Evidence — humans' agreement with suggestions, the approval rate (from the store's approval
records when it keeps them: :class:`ApprovalDecisions`) and verification pass rates — earns
promotions (recommended; applied automatically only when opted in), and a change detector on
the verification pass rate of autonomous steps demotes a task type to ``approve`` with an
alert. Everything but :class:`Autonomy` is imported on first use.
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, TypeAlias

from closedloop._errors import ConfigError

if typing.TYPE_CHECKING:
    from closedloop._autonomy_state import (
        ANY_AGENT,
        LEVELS,
        EvidenceGroup,
        EvidenceQueries,
        Feedback,
        LevelChange,
        LevelKey,
        LevelRecord,
        LevelStore,
    )
    from closedloop.autonomy._decisions import ApprovalDecisions
    from closedloop.autonomy._evidence import (
        Assessment,
        AutonomyPolicy,
        Decisions,
        DecisionSource,
        Evidence,
        Proportion,
        count_events,
        count_groups,
        wilson_lower,
    )
    from closedloop.autonomy._levels import AutonomyLevels, LevelMonitor, Resolved

__all__ = [
    "ANY_AGENT",
    "LEVELS",
    "ApprovalDecisions",
    "Approver",
    "Assessment",
    "Autonomy",
    "AutonomyLevels",
    "AutonomyPolicy",
    "DecisionSource",
    "Decisions",
    "Evidence",
    "EvidenceGroup",
    "EvidenceQueries",
    "Feedback",
    "LevelChange",
    "LevelKey",
    "LevelMonitor",
    "LevelRecord",
    "LevelStore",
    "Proportion",
    "Resolved",
    "count_events",
    "count_groups",
    "wilson_lower",
]


class Autonomy(StrEnum):
    """How much a task type may do on its own."""

    SUGGEST = "suggest"
    APPROVE = "approve"
    AUTONOMOUS = "autonomous"

    @classmethod
    def parse(cls, value: Autonomy | str) -> Autonomy:
        """Accept an :class:`Autonomy` or its name; a bad value is a :class:`ConfigError`."""
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(a.value for a in cls)
            raise ConfigError(f"unknown autonomy level {value!r}; use one of: {allowed}") from None


Approver: TypeAlias = Callable[[Any, Any], "bool | Awaitable[bool]"]
"""``approver(task_input, proposal) -> bool``: a human (or policy) decision; may be async."""


if not typing.TYPE_CHECKING:  # type checkers read the imports above; at run time, import on use
    from closedloop._lazy import lazy_exports as _lazy_exports

    __getattr__, __dir__ = _lazy_exports(__name__, {
        "closedloop._autonomy_state": ("ANY_AGENT", "LEVELS", "EvidenceGroup",
                                       "EvidenceQueries", "Feedback", "LevelChange",
                                       "LevelKey", "LevelRecord", "LevelStore"),
        "._decisions": ("ApprovalDecisions",),
        "._evidence": ("Assessment", "AutonomyPolicy", "DecisionSource", "Decisions",
                       "Evidence", "Proportion", "count_events", "count_groups",
                       "wilson_lower"),
        "._levels": ("AutonomyLevels", "LevelMonitor", "Resolved"),
    })
