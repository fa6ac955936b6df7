"""The query port: questions the store answers about its events without handing each one over.

:class:`EventQueries` is what a backend implements to answer them itself (SQLite and
PostgreSQL in SQL, memory in Python): a per-task-type summary of a window of steps (what
``closedloop report`` shows) and a keyset-paginated listing of steps, newest first (what
``closedloop steps`` and the dashboard page through). :class:`~closedloop.store.Store` uses the
backend's answers when it has them and otherwise makes one pass over
:meth:`~closedloop.store.Store.events` with :func:`summarize_events`.

Definitions of the summary's figures (the SQL backends give the same numbers):

- ``validated``/``validation_passed``: steps where validation ran, and passed on the last
  attempt; ``reasked``/``reask_passed``: of those, steps with more than one attempt, and
  re-asked steps that then passed; ``verified``/``verification_passed`` likewise;
- ``cost_usd`` sums the steps that have a cost (``priced`` of them; None when none has),
  ``cached_input_tokens`` the prompt-cache part of ``input_tokens`` (both schema v3);
- latency percentiles are nearest-rank (:func:`closedloop._figures.percentile`), exact on every
  backend; the mean is the sum over runs (SQL sums in double precision, so over millions of
  steps it may differ from the Python pass's exactly rounded sum in the last digits; so
  may ``cost_usd``);
- failure messages (a step's ``error_message`` when not empty) are grouped by
  :func:`closedloop._figures.message_group`, keyed by ``(error_type or "", group)``, ranked by
  count then key; each keeps its most recent message as the example (among messages recorded
  at the same instant, any one of them). The Python pass keeps at most :data:`MAX_GROUPS`
  groups per row (later ones are counted in one ``"(other messages)"`` group per error type,
  to bound its memory); the SQL backends count every group exactly.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from closedloop._errors import ConfigError
from closedloop._events import StepEvent, check_labels
from closedloop._figures import message_group, percentile

MAX_GROUPS = 1000
"""Distinct failure-message groups the Python pass keeps per row."""
OTHER_MESSAGES = "(other messages)"
MAX_PAGE = 1000
"""The largest page :meth:`EventQueries.list_steps` returns."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepFilter:
    """Which steps: ``since <= ts < until`` (Unix seconds), and optionally one task type,
    outcome, error type, model and run (exact values) and one label (``(key, value)``: the step's
    label ``key`` is ``value``). ``None`` leaves a field unfiltered."""

    since: float | None = None
    until: float | None = None
    task_type: str | None = None
    outcome: str | None = None
    error_type: str | None = None
    model: str | None = None
    label: tuple[str, str] | None = None
    run_id: str | None = None

    def __post_init__(self) -> None:
        if self.label is not None:
            check_label_filter(self.label)

    def matches(self, e: StepEvent) -> bool:
        """True when ``e`` passes every filter."""
        return ((self.since is None or e.ts >= self.since)
                and (self.until is None or e.ts < self.until)
                and (self.task_type is None or e.task_type == self.task_type)
                and (self.outcome is None or e.outcome == self.outcome)
                and (self.error_type is None or e.error_type == self.error_type)
                and (self.model is None or e.model == self.model)
                and (self.run_id is None or e.run_id == self.run_id)
                and (self.label is None
                     or (e.labels or {}).get(self.label[0]) == self.label[1]))

    def columns(self) -> list[tuple[str, str, Any]]:
        """``(column, operator, value)`` of every filter that is set but :attr:`label` (a
        JSON look-up each SQL backend spells its own way), for SQL backends."""
        out: list[tuple[str, str, Any]] = []
        if self.since is not None:
            out.append(("ts", ">=", self.since))
        if self.until is not None:
            out.append(("ts", "<", self.until))
        for name in ("task_type", "outcome", "error_type", "model", "run_id"):
            value = getattr(self, name)
            if value is not None:
                out.append((name, "=", value))
        return out


def check_label_filter(label: tuple[str, str]) -> tuple[str, str]:
    """``label`` if it is a ``(key, value)`` a step's labels may hold (the key a name as
    :func:`~closedloop.check_labels` wants), else a :class:`ConfigError`."""
    if (not isinstance(label, tuple) or len(label) != 2
            or not all(isinstance(part, str) for part in label)):
        raise ConfigError("a label filter is a (key, value) pair of strings")
    check_labels({label[0]: label[1]})
    return label


def parse_label_filter(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` as a label filter; a :class:`ConfigError` (one line) if it is not one."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"a label filter is KEY=VALUE, got {text[:80]!r}")
    return check_label_filter((key.strip(), value))


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageGroup:
    """Steps whose failure message fell in one group; ``example`` is the most recent message
    of the group, recorded at ``example_ts``."""

    error_type: str
    group: str
    count: int
    example: str
    example_ts: float


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFigures:
    """The aggregated figures of one task type, or of every task type (``task_type`` None)."""

    task_type: str | None
    runs: int
    first_ts: float | None
    last_ts: float | None
    validated: int
    validation_passed: int
    reasked: int
    reask_passed: int
    verified: int
    verification_passed: int
    input_tokens: int
    output_tokens: int
    outcomes: Mapping[str, int]
    """Steps per outcome that occurred."""
    errors: Mapping[str, int]
    """Steps per (non-empty) error type that occurred."""
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_mean_ms: float | None
    latency_max_ms: float | None
    messages: tuple[MessageGroup, ...]
    """The most frequent failure-message groups, most frequent first."""
    cached_input_tokens: int = 0
    """Of ``input_tokens``, those served from a prompt cache (schema v3; older steps: 0)."""
    cost_usd: float | None = None
    """The summed cost of the steps that have one (``priced``); None when none has."""
    priced: int = 0
    """Steps with a cost (``cost_usd`` not None)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EventSummary:
    """Per task type figures (sorted by name) and the ``overall`` figures over all of them."""

    rows: tuple[TaskFigures, ...]
    overall: TaskFigures


@dataclass(frozen=True, slots=True, kw_only=True)
class StepPage:
    """One page of steps, newest first; ``next_cursor`` fetches the next page (None: last)."""

    steps: tuple[StepEvent, ...]
    next_cursor: str | None
    head_cursor: str | None = None
    """The position of the page's first step: :meth:`EventQueries.list_steps_after` from it
    lists the matching steps stored since with a later position (None: an empty page)."""


@runtime_checkable
class EventQueries(Protocol):
    """A backend that answers the store's queries itself (the query port).

    Both methods read one consistent snapshot of the events and raise
    :class:`~closedloop.StoreError` (one line) when the store cannot be read.
    """

    def summarize(self, where: StepFilter, *, top_messages: int) -> EventSummary | None:
        """The figures of the steps matching ``where``, with at most ``top_messages`` failure
        message groups per row; ``None`` when this store's schema predates the queries (an
        older store opened read-only): the caller then makes the Python pass."""

    def list_steps(self, where: StepFilter, *, limit: int,
                   cursor: str | None = None) -> StepPage:
        """Up to ``limit`` steps matching ``where``, newest first, after ``cursor`` (a
        :attr:`StepPage.next_cursor` of the same store and filter). A cursor that is not one
        of this store's is a :class:`~closedloop.ConfigError`."""

    def list_steps_after(self, where: StepFilter, *, limit: int,
                         cursor: str | None = None) -> StepPage:
        """Up to ``limit`` steps matching ``where`` whose position is after ``cursor`` (a
        :attr:`StepPage.head_cursor` or a ``next_cursor`` of this method; None: from the
        first step), oldest first: "anything newer than this". ``next_cursor`` is the
        position of the last step listed (None when none is), to pass back next time."""

    def task_types(self) -> list[str]:
        """Every task type with a stored step, sorted; read from an index that starts with
        the task type (one probe per task type, not a pass over the steps)."""


def task_types_sql(table: str) -> str:
    """The SQL backends' :meth:`EventQueries.task_types`: a loose index scan (each next task
    type is the smallest one above the last), the same text for SQLite and PostgreSQL."""
    return (f"WITH RECURSIVE t(name) AS (SELECT MIN(task_type) FROM {table} UNION ALL "
            f"SELECT (SELECT MIN(task_type) FROM {table} WHERE task_type > t.name) FROM t "
            "WHERE t.name IS NOT NULL) SELECT name FROM t WHERE name IS NOT NULL")


# ----- the Python pass ----------------------------------------------------------------------

@dataclass(slots=True)
class Tally:
    """Running counters of one row; ``add`` is O(1) apart from keeping the latency."""

    runs: int = 0
    first_ts: float = math.inf
    last_ts: float = -math.inf
    validated: int = 0
    validation_passed: int = 0
    reasked: int = 0
    reask_passed: int = 0
    verified: int = 0
    verification_passed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    priced: int = 0
    costs: list[float] = field(default_factory=list)
    """Each priced step's cost, summed exactly (``math.fsum``) for the figures."""
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    messages: Counter[tuple[str, str]] = field(default_factory=Counter)
    examples: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)
    """Per message group, its most recent message and when it was recorded."""
    latencies: array[float] = field(default_factory=lambda: array("d"))

    def add(self, e: StepEvent) -> None:
        self.runs += 1
        self.first_ts = min(self.first_ts, e.ts)
        self.last_ts = max(self.last_ts, e.ts)
        if e.validation_passed is not None:
            self.validated += 1
            self.validation_passed += e.validation_passed
            if e.attempts > 1:
                self.reasked += 1
                self.reask_passed += e.validation_passed
        if e.verification_passed is not None:
            self.verified += 1
            self.verification_passed += e.verification_passed
        self.input_tokens += e.input_tokens
        self.output_tokens += e.output_tokens
        if e.cached_input_tokens:
            self.cached_input_tokens += e.cached_input_tokens
        if e.cost_usd is not None:
            self.priced += 1
            self.costs.append(e.cost_usd)
        self.latencies.append(e.latency_ms)
        self.outcomes[e.outcome] += 1
        if e.error_type:
            self.errors[e.error_type] += 1
        if e.error_message:
            self.message(e.error_type or "", e.error_message, 1, e.ts)

    def message(self, error_type: str, message: str, count: int, ts: float,
                group: str | None = None) -> None:
        """Count ``count`` steps of a message (its group computed unless given)."""
        key = (error_type, message_group(message) if group is None else group)
        if key not in self.messages and len(self.messages) >= MAX_GROUPS:
            key = (error_type, OTHER_MESSAGES)
        self.messages[key] += count
        if key not in self.examples or ts >= self.examples[key][0]:
            self.examples[key] = (ts, message)

    def merge(self, other: Tally) -> None:
        """Fold another row's counters into this one (the overall row is built this way)."""
        self.runs += other.runs
        self.first_ts = min(self.first_ts, other.first_ts)
        self.last_ts = max(self.last_ts, other.last_ts)
        self.validated += other.validated
        self.validation_passed += other.validation_passed
        self.reasked += other.reasked
        self.reask_passed += other.reask_passed
        self.verified += other.verified
        self.verification_passed += other.verification_passed
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.priced += other.priced
        self.costs.extend(other.costs)
        self.outcomes.update(other.outcomes)
        self.errors.update(other.errors)
        for key, count in other.messages.items():
            ts, message = other.examples[key]
            self.message(key[0], message, count, ts, group=key[1])
        self.latencies.extend(other.latencies)

    def figures(self, task_type: str | None, top_messages: int) -> TaskFigures:
        """The row's figures, with its ``top_messages`` most frequent message groups."""
        runs = self.runs
        ordered = sorted(self.latencies)
        return TaskFigures(
            task_type=task_type, runs=runs,
            first_ts=self.first_ts if runs else None, last_ts=self.last_ts if runs else None,
            validated=self.validated, validation_passed=self.validation_passed,
            reasked=self.reasked, reask_passed=self.reask_passed, verified=self.verified,
            verification_passed=self.verification_passed, input_tokens=self.input_tokens,
            output_tokens=self.output_tokens, outcomes=dict(self.outcomes),
            errors=dict(self.errors),
            latency_p50_ms=percentile(ordered, 50), latency_p95_ms=percentile(ordered, 95),
            latency_mean_ms=math.fsum(ordered) / runs if runs else None,
            latency_max_ms=ordered[-1] if ordered else None,
            cached_input_tokens=self.cached_input_tokens,
            cost_usd=math.fsum(self.costs) if self.priced else None, priced=self.priced,
            messages=tuple(
                MessageGroup(error_type=k[0], group=k[1], count=n, example=self.examples[k][1],
                             example_ts=self.examples[k][0])
                for k, n in top_counts(self.messages, top_messages)))


def top_counts(counts: Mapping[tuple[str, str], int],
               top: int) -> list[tuple[tuple[str, str], int]]:
    """The ``top`` most frequent keys: by count, then key (code point order)."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def summarize_events(events: Iterable[StepEvent], *, top_messages: int) -> EventSummary:
    """The figures of ``events`` in one pass (any iterable, read once)."""
    per_task: dict[str, Tally] = {}
    for event in events:
        tally = per_task.get(event.task_type)
        if tally is None:
            tally = per_task[event.task_type] = Tally()
        tally.add(event)
    overall = Tally()
    for tally in per_task.values():
        overall.merge(tally)
    return EventSummary(
        rows=tuple(per_task[t].figures(t, top_messages) for t in sorted(per_task)),
        overall=overall.figures(None, top_messages))


# ----- pages --------------------------------------------------------------------------------

def check_limit(limit: int) -> int:
    """``limit`` if it is a page size this port serves, else a :class:`ConfigError`."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise ConfigError(f"page size must be an integer from 1 to {MAX_PAGE}, got {limit!r}")
    return limit



def rolled_dim(where: StepFilter) -> tuple[str, str] | None:
    """The roll-up dimension and value that narrow a step listing by ``where`` to some hours
    (model first); None when it filters by neither."""
    if where.model is not None:
        return "model", where.model
    if where.label is not None:
        return f"label:{where.label[0]}", where.label[1]
    return None


def exact_hour(ts: float) -> int:
    """The exact hour of ``ts`` (``hour * 3600 <= ts < hour * 3600 + 3600``), as the
    roll-ups count it."""
    h = math.floor(ts / 3600.0)
    while h * 3600.0 > ts:
        h -= 1
    while (h + 1) * 3600.0 <= ts:
        h += 1
    return h


def encode_cursor(ts: float, key: int | str) -> str:
    """An opaque cursor for the position after the step at ``(ts, key)`` (newest first)."""
    raw = json.dumps([ts, key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, key_type: type[int] | type[str], url: str,
                  valid: Callable[[Any], bool] = lambda _: True) -> tuple[float, Any]:
    """``(ts, key)`` of a cursor made by :func:`encode_cursor` for this kind of store; any
    other text is a :class:`ConfigError`."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, key = json.loads(text)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        ts = key = None
    if (not isinstance(ts, (int, float)) or isinstance(ts, bool)
            or not isinstance(key, key_type) or isinstance(key, bool) or not valid(key)):
        raise ConfigError(f"not a page cursor of store {url}: {cursor[:40]!r}")
    return float(ts), key


def page(rows: Sequence[tuple[float, Any, StepEvent]], limit: int) -> StepPage:
    """The page of ``rows`` (``(ts, key, event)``, newest first, up to ``limit + 1`` of them:
    one more than the page says there is a next)."""
    shown = rows[:limit]
    more = len(rows) > limit and shown
    return StepPage(steps=tuple(r[2] for r in shown),
                    next_cursor=encode_cursor(shown[-1][0], shown[-1][1]) if more else None,
                    head_cursor=encode_cursor(shown[0][0], shown[0][1]) if shown else None)


def page_of_events(events: Iterable[StepEvent], where: StepFilter, *, limit: int,
                   cursor: str | None, url: str, after: bool = False) -> StepPage:
    """The Python pass of :meth:`EventQueries.list_steps` (``after``: of
    :meth:`~EventQueries.list_steps_after`) over ``events`` in the order they were stored
    (a step's key is its index), keeping only the page in memory."""
    check_limit(limit)
    at = decode_cursor(cursor, int, url) if cursor is not None else None
    rows = ((e.ts, i, e) for i, e in enumerate(events) if where.matches(e)
            and (at is None or ((e.ts, i) > at if after else (e.ts, i) < at)))
    if after:
        return page_after(heapq.nsmallest(limit, rows, key=lambda r: (r[0], r[1])))
    return page(heapq.nlargest(limit + 1, rows, key=lambda r: (r[0], r[1])), limit)


def page_after(rows: Sequence[tuple[float, Any, StepEvent]]) -> StepPage:
    """The page of ``rows`` (``(ts, key, event)``, oldest first) for
    :meth:`EventQueries.list_steps_after`."""
    last = encode_cursor(rows[-1][0], rows[-1][1]) if rows else None
    return StepPage(steps=tuple(r[2] for r in rows), next_cursor=last)
