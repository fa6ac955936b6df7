"""Autonomy levels in memory: the level-store port of ``memory://`` stores, and the test double
for users' own tests."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Collection, Iterable
from typing import Any

from closedloop._autonomy_state import (
    EvidenceGroup,
    Feedback,
    LevelChange,
    LevelKey,
    LevelRecord,
    change_of,
    evidence_groups_of,
    redacted_feedback,
    redacted_record,
)
from closedloop._events import StepEvent
from closedloop.store._retention import level_change_kept


class MemoryLevelStore:
    """Levels, their audit trail, feedback and detector states in dicts; thread-safe; nothing
    survives the process. ``events(task_type, since)``: the steps its evidence counts (the
    memory backend's own; None: it counts none, the autonomy layer reads the store)."""

    def __init__(self, *, events: Callable[[str, float], Iterable[StepEvent]] | None = None
                 ) -> None:
        self._events = events
        self._levels: dict[LevelKey, LevelRecord] = {}
        self._history: list[LevelChange] = []
        self._feedback: dict[str, Feedback] = {}
        self._detectors: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def levels(self, task_type: str | None = None) -> list[LevelRecord]:
        """Every stored level (of ``task_type``), by task type, agent and class."""
        with self._lock:
            found = [r for r in self._levels.values()
                     if task_type is None or r.key.task_type == task_type]
        return sorted(found, key=lambda r: (r.key.task_type, r.key.agent_id,
                                            r.key.action_class or ""))

    def set_level(self, record: LevelRecord, *, kind: str = "set",
                  only_from: Collection[str | None] | None = None) -> LevelChange | None:
        """Store ``record`` and its audit entry (see the port)."""
        record = redacted_record(record)
        with self._lock:
            old = self._levels.get(record.key)
            if only_from is not None and (None if old is None else old.level) not in only_from:
                return None
            change = change_of(old, record, kind)
            self._levels[record.key] = record
            self._history.append(change)
        return change

    def history(self, *, task_type: str | None = None, limit: int = 50) -> list[LevelChange]:
        """Recent level changes (of ``task_type``), newest first."""
        with self._lock:
            found = [(c.at, i, c) for i, c in enumerate(self._history)
                     if task_type is None or c.key.task_type == task_type]
        found.sort(key=lambda item: item[:2], reverse=True)  # newest first, ties: last written
        return [c for _, _, c in found[:max(0, int(limit))]]

    def put_feedback(self, feedback: Feedback) -> None:
        """Record feedback on a suggestion (the last one per step id counts)."""
        feedback = redacted_feedback(feedback)
        with self._lock:
            self._feedback.pop(feedback.step_id, None)
            self._feedback[feedback.step_id] = feedback

    def feedback(self, *, since: float | None = None) -> list[Feedback]:
        """Feedback recorded at or after ``since``, oldest first."""
        with self._lock:
            items = list(self._feedback.values())
        return sorted((f for f in items if since is None or f.at >= since), key=lambda f: f.at)

    def evidence_groups(self, task_type: str, *, since: float,
                        classes: bool) -> list[EvidenceGroup] | None:
        """``task_type``'s steps since ``since`` grouped in one pass (the evidence port,
        :class:`~closedloop.autonomy.EvidenceQueries`)."""
        if self._events is None:
            return None
        agreed = {f.step_id: f.agreed for f in self.feedback(since=since)}
        return evidence_groups_of(self._events(task_type, since), agreed, since=since,
                                  classes=classes)

    def prune(self, before: float, *, dry_run: bool = False) -> dict[str, int]:
        """Forget audit records and feedback older than ``before``; never a level, nor the
        record that set a level in force (see
        :func:`~closedloop.store._retention.level_change_kept`)."""
        with self._lock:
            kept = [c for c in self._history if level_change_kept(
                c.at, getattr(self._levels.get(c.key), "at", None), before)]
            feedback = {k: f for k, f in self._feedback.items() if f.at >= before}
            removed = {"autonomy_history": len(self._history) - len(kept),
                       "autonomy_feedback": len(self._feedback) - len(feedback)}
            if not dry_run:
                self._history, self._feedback = kept, feedback
        return removed

    def counts(self) -> dict[str, int]:
        """Rows held, by the SQL backends' table names."""
        with self._lock:
            return {"autonomy_levels": len(self._levels), "autonomy_history": len(self._history),
                    "autonomy_feedback": len(self._feedback),
                    "detector_state": len(self._detectors)}

    def put_detector(self, name: str, state: dict[str, Any], *, at: float) -> None:
        """Save a detector's state under ``name``."""
        with self._lock:
            self._detectors[name] = copy.deepcopy(state)

    def detector(self, name: str) -> dict[str, Any] | None:
        """The state saved under ``name``, if any."""
        with self._lock:
            state = self._detectors.get(name)
        return copy.deepcopy(state) if state is not None else None
