"""Human in the loop: the autonomy level of a task type decides whether a proposal executes.

``suggest`` records the validated proposal and never executes it; ``approve`` executes only
when an approver says yes (with no approver attached the step waits, recorded as
``awaiting_approval``); ``autonomous`` executes. Persistent approval queues and progressive
promotion between levels are not built yet.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any, TypeAlias

from closedloop._errors import ConfigError

__all__ = ["Approver", "Autonomy"]


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
