"""``Store.task_types()``: every task type with a stored step, sorted, on every backend (the
autonomy page lists task types without levels from it)."""

from __future__ import annotations

import closedloop as cl
from closedloop import StepEvent


def _event(i: int, task_type: str) -> StepEvent:
    return StepEvent(1_790_000_000.0 + i * 3600.0, f"{i:032x}", "agent", task_type,
                     "autonomous", "succeeded", 1, 10, 5, 12.5, True, True, None, None,
                     1.0, 1.0, 1.0, 1.0, None)


def test_task_types_are_distinct_and_sorted_on_every_backend(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        assert store.task_types() == []
        for i, name in enumerate(["deploy", "b-plan", "deploy", "<x> 'quoted'", "deploy",
                                  "b-plan", "zeta", "Alpha"]):
            store.record(_event(i, name))
        assert store.flush()
        assert store.task_types() == sorted({"deploy", "b-plan", "<x> 'quoted'", "zeta",
                                             "Alpha"})
