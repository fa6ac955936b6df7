"""The data of spans and scores, and the port a store backend implements to keep them.

:class:`StoredSpan`, :class:`TraceSummary`, :class:`TracePage`, :class:`Score`,
:class:`TaskScores` and the :class:`SpanStore` port live here, apart from
:mod:`closedloop.telemetry` (which re-exports them), so that the backends under
:mod:`closedloop.store` can implement the port without importing the telemetry layer.

Besides the records, the few rules every backend must apply alike live here too: how a batch
of spans rolls up into one summary per trace (:func:`rollup`), the opaque keyset cursor of a
trace listing (:func:`encode_cursor`), and how score aggregates fold into per-task-type
summaries (:func:`fold_scores`).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

from closedloop._errors import ConfigError

TASK_TYPE = "closedloop.task_type"
"""The span attribute that labels a trace with its task type (the first step span's)."""
OUTCOME = "closedloop.outcome"
"""The span attribute that gives a trace's outcome (read from the same span)."""
SPANS_PAGE = 10_000
"""Spans read at most by one :meth:`SpanStore.spans_since` call, by default."""


_dumps = json.JSONEncoder(default=repr).encode  # json.dumps(v, default=repr), made once


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredSpan:
    """A span as read back from the store (ids as hex, times in ns since the epoch)."""

    trace_id: str
    span_id: str
    parent_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    status: int
    status_message: str | None
    attributes: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    content: dict[str, str] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        """End minus start, in milliseconds."""
        return (self.end_ns - self.start_ns) / 1e6

    def to_row(self) -> tuple[Any, ...]:
        """The span as a row of the ``spans`` table (JSON columns as text; a value JSON cannot
        hold is stored as its ``repr``)."""
        return (self.trace_id, self.span_id, self.parent_id, self.name, self.kind,
                self.start_ns, self.end_ns, self.status, self.status_message,
                _dumps(self.attributes), _dumps(self.events) if self.events else None,
                _dumps(self.content) if self.content else None)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> StoredSpan:
        """The span of a row as :meth:`to_row` makes it."""
        return cls(trace_id=row[0], span_id=row[1], parent_id=row[2], name=row[3],
                   kind=row[4], start_ns=row[5], end_ns=row[6], status=row[7],
                   status_message=row[8], attributes=json.loads(row[9]),
                   events=json.loads(row[10]) if row[10] else [],
                   content=json.loads(row[11]) if row[11] else {})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"trace_id": self.trace_id, "span_id": self.span_id,
                "parent_id": self.parent_id, "name": self.name, "kind": self.kind,
                "start_ns": self.start_ns, "end_ns": self.end_ns,
                "duration_ms": round(self.duration_ms, 3), "status": self.status,
                "status_message": self.status_message, "attributes": self.attributes,
                "events": self.events, "content": self.content}


SPAN_COLUMNS = ("trace_id", "span_id", "parent_id", "name", "kind", "start_ns", "end_ns",
                "status", "status_message", "attributes", "events", "content")
"""The columns of the ``spans`` table, in :meth:`StoredSpan.to_row` order."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TraceSummary:
    """One trace in a listing: when, how long, how many spans, and its first step's labels."""

    trace_id: str
    start_ns: int
    end_ns: int
    spans: int
    task_type: str | None
    outcome: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"trace_id": self.trace_id, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "duration_ms": round((self.end_ns - self.start_ns) / 1e6, 3),
                "spans": self.spans, "task_type": self.task_type, "outcome": self.outcome}


@dataclass(frozen=True, slots=True, kw_only=True)
class TracePage:
    """One page of a trace listing, newest first; ``next_cursor`` continues it (None: the
    last page)."""

    traces: list[TraceSummary]
    next_cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"traces": [t.to_dict() for t in self.traces], "next_cursor": self.next_cursor}


@dataclass(frozen=True, slots=True, kw_only=True)
class Rollup:
    """What one batch of spans adds to its trace's summary (see :func:`rollup`)."""

    trace_id: str
    start_ns: int
    end_ns: int
    spans: int
    label_ns: int | None
    """Start of the earliest span carrying :data:`TASK_TYPE`: the one that labels the trace."""
    task_type: str | None
    outcome: str | None

    def to_row(self) -> tuple[Any, ...]:
        """A row of the ``traces`` summary table."""
        return (self.trace_id, self.start_ns, self.end_ns, self.spans, self.label_ns,
                self.task_type, self.outcome)


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(value)


def relabels(label_ns: int | None, outcome: str | None, new_ns: int | None,
             new_outcome: str | None) -> bool:
    """Whether a labelled span starting at ``new_ns`` labels a trace instead of the one
    starting at ``label_ns``: it started first, or at the same time and has an outcome where
    the other has none. The backends' upserts apply the same rule in SQL."""
    if new_ns is None:
        return False
    if label_ns is None or new_ns < label_ns:
        return True
    return new_ns == label_ns and outcome is None and new_outcome is not None


RELABEL = ("({new}.label_ns < coalesce({old}.label_ns, {new}.label_ns + 1) OR "
           "({new}.label_ns = {old}.label_ns AND {old}.outcome IS NULL "
           "AND {new}.outcome IS NOT NULL))")
""":func:`relabels` in SQL, for an upsert: ``{new}`` names the incoming row (``excluded``),
``{old}`` the stored one."""


def rollup(spans: Iterable[StoredSpan]) -> list[Rollup]:
    """One summary per trace of ``spans``, by trace id: first start, last end, span count and
    the labels of the earliest span that has a task type.

    A backend merges each into its stored summary: earliest start, latest end, counts added,
    labels from whichever labelled span started first.
    """
    found: dict[str, list[Any]] = {}
    for s in spans:
        entry = found.get(s.trace_id)
        if entry is None:
            entry = found[s.trace_id] = [s.start_ns, s.end_ns, 1, None, None, None]
        else:
            entry[0] = min(entry[0], s.start_ns)
            entry[1] = max(entry[1], s.end_ns)
            entry[2] += 1
        task_type = s.attributes.get(TASK_TYPE)
        if task_type is not None:
            outcome = _text(s.attributes.get(OUTCOME))
            if relabels(entry[3], entry[5], s.start_ns, outcome):
                entry[3:] = [s.start_ns, _text(task_type), outcome]
    return [Rollup(trace_id=t, start_ns=e[0], end_ns=e[1], spans=e[2], label_ns=e[3],
                   task_type=e[4], outcome=e[5]) for t, e in sorted(found.items())]


def encode_cursor(summary: TraceSummary) -> str:
    """The opaque cursor that continues a listing after ``summary``."""
    raw = f"{summary.start_ns}:{summary.trace_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """``(start_ns, trace_id)`` of a cursor from :func:`encode_cursor`; anything else is a
    :class:`~closedloop.ConfigError`."""
    text = cursor.strip()
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
        start, sep, trace_id = raw.partition(":")
        if not sep or not trace_id:
            raise ValueError(raw)
        return int(start), trace_id
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ConfigError(f"cursor {cursor!r} is not one a trace listing gave") from None


def page_of(found: Sequence[TraceSummary], limit: int) -> TracePage:
    """A page from up to ``limit + 1`` summaries read newest first (one more says there is a
    next page)."""
    if len(found) > limit:
        kept = list(found[:limit])
        return TracePage(traces=kept, next_cursor=encode_cursor(kept[-1]) if kept else None)
    return TracePage(traces=list(found))


@dataclass(frozen=True, slots=True, kw_only=True)
class Score:
    """A judgement attached after the fact to a trace (or one span of it).

    ``value`` is numeric (a rating, a quality score; booleans count as 1/0) and/or ``label``
    is categorical ("good", "wrong_region"); ``source`` says who judged: ``human``, ``rule``
    or ``model``.
    """

    trace_id: str
    name: str
    value: float | None = None
    label: str | None = None
    span_id: str | None = None
    comment: str | None = None
    source: str = "human"
    ts: float = 0.0

    def to_row(self) -> tuple[Any, ...]:
        """The score as a row of the ``scores`` table."""
        return (self.ts, self.trace_id, self.span_id, self.name, self.value, self.label,
                self.comment, self.source)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Score:
        """The score of a row as :meth:`to_row` makes it."""
        return cls(ts=row[0], trace_id=row[1], span_id=row[2], name=row[3], value=row[4],
                   label=row[5], comment=row[6], source=row[7])

    def to_event(self) -> dict[str, Any]:
        """The score as a ``gen_ai.evaluation.result`` event (name plus attributes)."""
        attrs: dict[str, Any] = {"gen_ai.evaluation.name": self.name,
                                 "closedloop.score.source": self.source}
        if self.value is not None:
            attrs["gen_ai.evaluation.score.value"] = self.value
        if self.label is not None:
            attrs["gen_ai.evaluation.score.label"] = self.label
        if self.comment:
            attrs["gen_ai.evaluation.explanation"] = self.comment
        return {"name": "gen_ai.evaluation.result", "timestamp": self.ts,
                "trace_id": self.trace_id, "span_id": self.span_id, "attributes": attrs}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"ts": self.ts, "trace_id": self.trace_id, "span_id": self.span_id,
                "name": self.name, "value": self.value, "label": self.label,
                "comment": self.comment, "source": self.source}


SCORE_COLUMNS = ("ts", "trace_id", "span_id", "name", "value", "label", "comment", "source")
"""The columns of the ``scores`` table, in :meth:`Score.to_row` order."""


@dataclass(frozen=True, slots=True)
class ScoreStat:
    """How many numeric values a score got, and their sum; ``len()`` is the count."""

    n: int = 0
    total: float = 0.0

    def __len__(self) -> int:
        return self.n

    @property
    def mean(self) -> float | None:
        """The mean value, or None without values."""
        return self.total / self.n if self.n else None

    def __add__(self, other: ScoreStat) -> ScoreStat:
        return ScoreStat(self.n + other.n, self.total + other.total)


@dataclass(slots=True, kw_only=True)
class TaskScores:
    """One task type's outcomes and scores over a period."""

    task_type: str
    steps: int = 0
    succeeded: int = 0
    scores: dict[str, ScoreStat] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    daily: dict[str, dict[str, ScoreStat]] = field(default_factory=dict)

    @property
    def success_rate(self) -> float | None:
        """Succeeded steps over all steps, or None without steps."""
        return self.succeeded / self.steps if self.steps else None

    def mean(self, name: str) -> float | None:
        """The mean of a numeric score, or None when it was never given."""
        stat = self.scores.get(name)
        return stat.mean if stat is not None else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: counts, success rate, mean per score, and per-day means."""
        return {
            "task_type": self.task_type, "steps": self.steps, "succeeded": self.succeeded,
            "success_rate": self.success_rate,
            "scores": {n: {"n": s.n, "mean": s.mean} for n, s in sorted(self.scores.items())},
            "labels": {n: dict(sorted(c.items())) for n, c in sorted(self.labels.items())},
            "daily": {day: {n: s.mean for n, s in sorted(by_name.items()) if s.n}
                      for day, by_name in sorted(self.daily.items())},
        }


def day_of(ts: float) -> str:
    """The UTC day of a Unix time, ``YYYY-MM-DD`` (how score summaries group by day)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


StepsRow = tuple[str, int, int]
"""``(task_type, steps, succeeded)`` over a period."""
ScoreRow = tuple[str, str, str, str | None, int, float | None, int]
"""``(task_type, name, day, label, numeric values, their sum, scores)``: one group of the
scores whose trace has a step of ``task_type`` in the period."""


def fold_scores(steps: Iterable[StepsRow], groups: Iterable[ScoreRow]) -> list[TaskScores]:
    """Per-task-type summaries, by task type, from the aggregates a backend computed."""
    by_task: dict[str, TaskScores] = {}
    for task_type, n, ok in steps:
        by_task[task_type] = TaskScores(task_type=task_type, steps=int(n), succeeded=int(ok or 0))
    for task_type, name, day, label, n, total, count in groups:
        ts = by_task.setdefault(task_type, TaskScores(task_type=task_type))
        if n:
            stat = ScoreStat(int(n), float(total or 0.0))
            ts.scores[name] = ts.scores.get(name, ScoreStat()) + stat
            by_day = ts.daily.setdefault(day, {})
            by_day[name] = by_day.get(name, ScoreStat()) + stat
        if label is not None:
            counts = ts.labels.setdefault(name, {})
            counts[label] = counts.get(label, 0) + int(count)
    return [by_task[k] for k in sorted(by_task)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Pruned:
    """What :meth:`SpanStore.prune` removed."""

    spans: int = 0
    traces: int = 0
    scores: int = 0


@runtime_checkable
class SpanStore(Protocol):
    """Reads and writes spans and scores; ``write_spans`` is called from one thread.

    Telemetry side of the store: a write that fails raises, and the span pipeline drops the
    batch and counts it; reads raise :class:`~closedloop.StoreError` with a one-line reason.
    """

    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        """Persist a batch of spans, all or nothing."""

    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every span of one trace, by start time."""

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None, cursor: str | None = None) -> TracePage:
        """Traces newest first (by their first span's start), ``limit`` at most, started at
        or after ``since_ns``; ``cursor`` (a page's ``next_cursor``) continues a listing."""

    def add_score(self, score: Score) -> None:
        """Persist one score."""

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        """Scores, oldest first."""

    def score_summary(self, *, since: float | None = None,
                      until: float | None = None) -> list[TaskScores]:
        """Per task type that has scores: the scores given in the period to traces whose
        latest step in the period is of that task type, and its steps and successes in the
        period. A score on a trace without a step in the period counts nowhere."""

    def spans_since(self, cursor: int, *, limit: int = SPANS_PAGE
                    ) -> tuple[list[StoredSpan], int]:
        """Spans written after ``cursor`` (0 = from the start), in write order, ``limit`` at
        most, and the cursor to continue from."""

    def span_cursor(self) -> int:
        """The cursor after the latest span written: :meth:`spans_since` from it returns only
        spans written later."""

    def prune(self, before: float) -> Pruned:
        """Remove spans that started, traces that began and scores given before ``before``
        (Unix seconds)."""


def iter_children(spans: Sequence[StoredSpan]) -> Iterator[tuple[int, StoredSpan]]:
    """``(depth, span)`` in tree order: roots (no parent in the set) first, children by start."""
    ids = {s.span_id for s in spans}
    children: dict[str | None, list[StoredSpan]] = {}
    for s in spans:
        parent = s.parent_id if s.parent_id in ids else None
        children.setdefault(parent, []).append(s)
    for group in children.values():
        group.sort(key=lambda s: s.start_ns)

    def walk(parent: str | None, depth: int) -> Iterator[tuple[int, StoredSpan]]:
        for s in children.get(parent, []):
            yield depth, s
            yield from walk(s.span_id, depth + 1)

    yield from walk(None, 0)
