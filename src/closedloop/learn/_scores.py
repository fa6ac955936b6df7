"""What the semantic scores say per task type: the section ``closedloop report`` shows for
scores, aggregated by the store (in SQL on SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from closedloop._spans import TaskScores
from closedloop.store import span_store_for

if TYPE_CHECKING:
    from closedloop.store import Store


def score_summary(store: Store, *, since: float | None = None,
                  until: float | None = None) -> list[TaskScores]:
    """Per task type with scores: steps, success rate, mean of each score and its daily means.

    Scores join their step through the trace id (the task type of the trace's latest step in
    the period); a score on a trace with no recorded step in the period is left out. The
    store aggregates (in SQL on SQLite and PostgreSQL). This is the section ``closedloop
    report`` shows for scores.
    """
    return span_store_for(store).score_summary(since=since, until=until)
