"""The evidence groups of a SQL store, from its grouped rows and its feedback (SQLite and
PostgreSQL; :mod:`closedloop.store.sqlite._evidence`, :mod:`closedloop.store.postgres.
_evidence`).

A step's group (:class:`~closedloop.autonomy.EvidenceGroup`) is known when it is stored,
except the feedback on a suggestion, recorded later: the evidence roll-ups therefore keep the
groups less their feedback, and the suggestions with feedback (a join from the feedback
table, a few rows) are moved from their group without feedback to the one with it here.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from closedloop._autonomy_state import EvidenceGroup

FOLD_EVERY_S = 10.0
"""A writable level store folds the new steps into the evidence roll-up before a count at
most this often (the store's roll-up keeper folds every minute too): a page counting the
evidence of every task type checks once. The count is exact either way."""


class Folds:
    """Calls ``fold`` at most once per :data:`FOLD_EVERY_S` (the level store's throttle)."""

    def __init__(self, fold: Callable[..., object]) -> None:
        self.fold = fold
        self._last = -math.inf

    def __call__(self, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= FOLD_EVERY_S:
            self._last = now
            self.fold(*args)


def _key(row: Sequence[Any]) -> tuple[Any, ...]:
    """A row's group less its count, as a dict key (an action class stored as JSON may be
    any JSON value: a list, or 1 apart from true)."""
    agent, mode, outcome, executed, verified, cls, durable = row[:7]
    tag = cls if cls is None or isinstance(cls, str) else (
        "#", type(cls).__name__, json.dumps(cls, sort_keys=True))
    return (agent, mode, outcome, bool(executed), None if verified is None else bool(verified),
            tag, bool(durable))


def evidence_groups(rows: Iterable[Sequence[Any]],
                    feedback: Iterable[Sequence[Any]]) -> list[EvidenceGroup]:
    """The groups of ``rows`` (``(agent, mode, outcome, executed error, verdict, class,
    durable, steps)``, a group in several rows added up) with the suggestions of ``feedback``
    (``(..., durable, agreed, steps)``: those with feedback) moved to their group with it."""
    counts: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        found = counts.setdefault((*_key(row), None), [row[5], 0])
        found[1] += int(row[7])
    for row in feedback:
        key, n = _key(row), int(row[8])
        counts.setdefault((*key, None), [row[5], 0])[1] -= n
        counts.setdefault((*key, bool(row[7])), [row[5], 0])[1] += n
    return [EvidenceGroup(agent_id=k[0], mode=k[1], outcome=k[2], executed_error=k[3],
                          verification_passed=k[4], action_class=cls, durable=k[6],
                          agreed=k[7], steps=n)
            for k, (cls, n) in counts.items() if n]
