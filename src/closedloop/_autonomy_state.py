"""The data of progressive autonomy, shared by ``autonomy/`` and the store backends.

:class:`LevelKey`, :class:`LevelRecord`, :class:`LevelChange`, :class:`Feedback` and the
:class:`LevelStore` port live here, apart from :mod:`closedloop.autonomy`, so that a store
backend can keep levels (its durable record of who may do what, with an audit trail) without
importing the autonomy layer; :mod:`closedloop.autonomy` re-exports them.

Levels are plain strings here (``suggest``, ``approve``, ``autonomous``): the store does not
interpret them. Every text is redacted before it is stored.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from closedloop._errors import ConfigError
from closedloop._redact import redact_text, redact_value

ANY_AGENT = "*"
"""The agent of a level that applies to every agent of its task type."""
LEVELS = ("suggest", "approve", "autonomous")
"""The levels, least autonomous first."""
CHANGE_KINDS = ("set", "promoted", "demoted")
_STEP_ID = re.compile(r"[0-9a-f]{32}")
_MAX_NAME = 200
_MAX_TEXT = 2000


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _name(value: object, what: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME:
        raise ConfigError(f"{what} must be a non-empty string of at most {_MAX_NAME} "
                          f"characters, got {str(value)[:80]!r}")
    return value


def check_level(value: object, what: str = "level") -> str:
    """``value`` if it names a level, else a one-line :class:`~closedloop.ConfigError`."""
    if value not in LEVELS:
        raise ConfigError(f"unknown {what} {str(value)[:80]!r}; use one of: "
                          f"{', '.join(LEVELS)}")
    return str(value)


def rank(level: str) -> int:
    """0 for ``suggest`` … 2 for ``autonomous``."""
    return LEVELS.index(level)


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelKey:
    """What a level applies to: a task type, the agent (``*``: any), and optionally a class
    of actions inside the task type (``None``: the task type as a whole)."""

    task_type: str
    agent_id: str = ANY_AGENT
    action_class: str | None = None

    def __post_init__(self) -> None:
        _name(self.task_type, "task_type")
        _name(self.agent_id, "agent_id")
        _name(self.action_class, "action class", optional=True)

    def __str__(self) -> str:
        cls = f"[{self.action_class}]" if self.action_class is not None else ""
        agent = "" if self.agent_id == ANY_AGENT else f" (agent {self.agent_id})"
        return f"{self.task_type}{cls}{agent}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelRecord:
    """A stored level: the key, the level, a ceiling it is never promoted above (``None``:
    none), and who set it, when, why, with what evidence."""

    key: LevelKey
    level: str
    by: str
    at: float
    reason: str
    ceiling: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_level(self.level)
        if self.ceiling is not None:
            check_level(self.ceiling, "ceiling")
            if rank(self.level) > rank(self.ceiling):
                raise ConfigError(f"level {self.level} is above the ceiling {self.ceiling} "
                                  f"of {self.key}")
        _name(self.by, "by")
        if not isinstance(self.reason, str) or not self.reason.strip():
            raise ConfigError("a reason is required to change an autonomy level")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with an ISO time for people."""
        out = asdict(self)
        out["time"] = _iso(self.at)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class LevelChange:
    """One entry of the audit trail: a key went from ``old`` (``None``: no stored level) to
    ``new``; ``kind`` is ``set`` (by a person or code), ``promoted`` or ``demoted``."""

    key: LevelKey
    old: str | None
    new: str
    kind: str
    by: str
    at: float
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with an ISO time for people."""
        out = asdict(self)
        out["time"] = _iso(self.at)
        return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Feedback:
    """What a human actually did about a suggestion: agreed with it (did the same) or not."""

    step_id: str
    agreed: bool
    by: str
    at: float
    note: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.step_id, str) or not _STEP_ID.fullmatch(self.step_id):
            raise ConfigError(f"a step id is 32 lowercase hex digits, got "
                              f"{str(self.step_id)[:80]!r}")
        if not isinstance(self.agreed, bool):
            raise ConfigError("agreed must be True or False")
        _name(self.by, "by")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with an ISO time for people."""
        out = asdict(self)
        out["time"] = _iso(self.at)
        return out


def redacted_record(record: LevelRecord) -> LevelRecord:
    """``record`` with its texts and evidence passed through the redactor and cut."""
    return replace(record, reason=redact_text(record.reason)[:_MAX_TEXT],
                   by=redact_text(record.by)[:_MAX_NAME],
                   evidence=redact_value(record.evidence))


def redacted_feedback(feedback: Feedback) -> Feedback:
    """``feedback`` with its texts passed through the redactor and cut."""
    note = None if feedback.note is None else redact_text(feedback.note)[:_MAX_TEXT]
    return replace(feedback, note=note, by=redact_text(feedback.by)[:_MAX_NAME])


def change_of(old: LevelRecord | None, new: LevelRecord, kind: str) -> LevelChange:
    """The audit entry of replacing ``old`` by ``new``."""
    if kind not in CHANGE_KINDS:
        raise ConfigError(f"unknown change kind {kind!r}; use one of: {', '.join(CHANGE_KINDS)}")
    return LevelChange(key=new.key, old=None if old is None else old.level, new=new.level,
                       kind=kind, by=new.by, at=new.at, reason=new.reason,
                       evidence=new.evidence)


# ----- rows, as the SQL backends keep them ---------------------------------------------------

LEVEL_COLUMNS = ("agent_id", "task_type", "action_class", "level", "ceiling", "by", "at",
                 "reason", "evidence")
HISTORY_COLUMNS = ("at", "agent_id", "task_type", "action_class", "old_level", "new_level",
                   "kind", "by", "reason", "evidence")
FEEDBACK_COLUMNS = ("step_id", "agreed", "by", "at", "note")


def _cls(stored: str) -> str | None:
    return stored or None  # '' in a key column (part of a primary key) means no class


def level_row(record: LevelRecord) -> tuple[Any, ...]:
    """A ``autonomy_levels`` row (see :data:`LEVEL_COLUMNS`)."""
    k = record.key
    return (k.agent_id, k.task_type, k.action_class or "", record.level, record.ceiling,
            record.by, record.at, record.reason, json.dumps(record.evidence, default=str))


def level_from_row(row: Sequence[Any]) -> LevelRecord:
    """A level from an ``autonomy_levels`` row."""
    key = LevelKey(agent_id=row[0], task_type=row[1], action_class=_cls(row[2]))
    return LevelRecord(key=key, level=row[3], ceiling=row[4], by=row[5], at=row[6],
                       reason=row[7], evidence=json.loads(row[8]) if row[8] else {})


def history_row(change: LevelChange) -> tuple[Any, ...]:
    """An ``autonomy_history`` row (see :data:`HISTORY_COLUMNS`)."""
    k = change.key
    return (change.at, k.agent_id, k.task_type, k.action_class or "", change.old, change.new,
            change.kind, change.by, change.reason, json.dumps(change.evidence, default=str))


def change_from_row(row: Sequence[Any]) -> LevelChange:
    """An audit entry from an ``autonomy_history`` row."""
    key = LevelKey(agent_id=row[1], task_type=row[2], action_class=_cls(row[3]))
    return LevelChange(key=key, at=row[0], old=row[4], new=row[5], kind=row[6], by=row[7],
                       reason=row[8], evidence=json.loads(row[9]) if row[9] else {})


def feedback_row(feedback: Feedback) -> tuple[Any, ...]:
    """An ``autonomy_feedback`` row (see :data:`FEEDBACK_COLUMNS`)."""
    return (feedback.step_id, feedback.agreed, feedback.by, feedback.at, feedback.note)


def feedback_from_row(row: Sequence[Any]) -> Feedback:
    """Feedback from an ``autonomy_feedback`` row."""
    return Feedback(step_id=row[0], agreed=bool(row[1]), by=row[2], at=row[3], note=row[4])


# ----- the port ------------------------------------------------------------------------------

@runtime_checkable
class LevelStore(Protocol):
    """Where autonomy levels, their audit trail, feedback on suggestions and detector states
    live (a store backend's ``level_store()``).

    Every method raises :class:`~closedloop.ControlUnavailable` when it cannot read or
    write; reads never create anything (a store that never stored a level has none).
    """

    def levels(self, task_type: str | None = None) -> list[LevelRecord]:
        """Every stored level (of ``task_type``), by task type, agent and class."""

    def set_level(self, record: LevelRecord, *, kind: str = "set",
                  only_from: Collection[str | None] | None = None) -> LevelChange | None:
        """Store ``record`` (replacing the key's level) and its audit entry, atomically.

        With ``only_from``, only when the key's current level (``None``: none stored) is one
        of them; returns the change made, or ``None`` when the condition did not hold."""

    def history(self, *, task_type: str | None = None, limit: int = 50) -> list[LevelChange]:
        """Recent level changes (of ``task_type``), newest first."""

    def put_feedback(self, feedback: Feedback) -> None:
        """Record a human's feedback on a suggestion (the last one per step id counts)."""

    def feedback(self, *, since: float | None = None) -> list[Feedback]:
        """Feedback recorded at or after ``since``, oldest first."""

    def put_detector(self, name: str, state: dict[str, Any], *, at: float) -> None:
        """Save a change detector's state (JSON-ready) under ``name``."""

    def detector(self, name: str) -> dict[str, Any] | None:
        """The state saved under ``name``, if any."""


# ----- evidence counted where the events are ------------------------------------------------

EXECUTED_ERRORS = ("executor", "verifier_error", "verification", "verification_unknown")
"""Error types of steps whose executor ran (or was called): the gate let them through."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EvidenceGroup:
    """``steps`` steps of one task type alike in everything the evidence for a level counts
    (:func:`closedloop.autonomy.count_groups`): the agent, the autonomy mode and outcome
    the step ran with, whether its error type is one of :data:`EXECUTED_ERRORS`, its
    verification verdict, its action class (``detail["autonomy"]["class"]``; None when not
    asked for), whether it went through a durable approval request (``detail["approval"]``
    an object; counted for approve-mode steps only) and, for a suggestion, the feedback on it
    (None: none since the time counted from)."""

    agent_id: str
    mode: str
    outcome: str
    executed_error: bool
    verification_passed: bool | None
    action_class: Any
    durable: bool
    agreed: bool | None
    steps: int


@runtime_checkable
class EvidenceQueries(Protocol):
    """A level store that counts the evidence for levels where the steps are (SQL on SQLite
    and PostgreSQL, the memory backend's events in Python): the optional part of the
    level-store port. Raises :class:`~closedloop.ControlUnavailable` when it cannot read."""

    def evidence_groups(self, task_type: str, *, since: float,
                        classes: bool) -> list[EvidenceGroup] | None:
        """``task_type``'s steps stored with ``ts >= since``, grouped (:class:`EvidenceGroup`),
        with the feedback recorded at or after ``since``; ``classes`` False: every group's
        ``action_class`` None (none of the key's task type needs it). None when this store
        cannot count them (the caller reads the events)."""


def evidence_key(e: Any, agreed: bool | None, classes: bool) -> tuple[Any, ...]:
    """The :class:`EvidenceGroup` (less its count) of a step event, in the Python pass."""
    detail = e.detail
    cls = None
    if classes and detail:
        info = detail.get("autonomy")
        cls = info.get("class") if isinstance(info, dict) else None
    durable = (e.autonomy == "approve" and detail is not None
               and isinstance(detail.get("approval"), dict))
    return (e.agent_id, e.autonomy, e.outcome, e.error_type in EXECUTED_ERRORS,
            e.verification_passed, cls, durable,
            agreed if e.outcome == "suggested" else None)


def evidence_groups_of(events: Any, feedback: dict[str, bool], *, since: float,
                       classes: bool) -> list[EvidenceGroup]:
    """:meth:`EvidenceQueries.evidence_groups` in one pass over a task type's ``events``
    (``feedback``: step id to agreed, recorded since ``since``)."""
    counts: dict[tuple[Any, ...], int] = {}
    for e in events:
        if e.ts < since:
            continue
        key = evidence_key(e, feedback.get(e.step_id or ""), classes)
        counts[key] = counts.get(key, 0) + 1
    return [EvidenceGroup(agent_id=k[0], mode=k[1], outcome=k[2], executed_error=k[3],
                          verification_passed=k[4], action_class=k[5], durable=k[6],
                          agreed=k[7], steps=n) for k, n in counts.items()]
