"""The report: per task type, how the feedback loops are doing over a window of stored events.

:func:`build_report` makes one pass over any iterable of :class:`~closedloop.StepEvent`, so it
reads straight from a store cursor; per task type it keeps counters and the list of latencies
(the only thing a percentile cannot do without). :func:`report_from_store` is the same over a
:class:`~closedloop.Store` with a time window and a task-type filter.

Definitions (the CLI's ``--help`` repeats them):

- *validation pass rate*: steps whose validation passed (on the last attempt) among steps where
  validation ran (``validation_passed`` is not ``None``);
- *re-ask rate*: steps with more than one attempt among steps where validation ran;
- *re-ask success*: re-asked steps whose validation then passed, among re-asked steps;
- *verification pass rate*: steps whose verifiers all passed among verified steps
  (``verification_passed`` is not ``None``);
- *latency percentiles*: nearest-rank — the p-th percentile is the smallest recorded latency
  with at least p % of the steps at or below it, so it is always a latency that happened;
- *error share*: steps with that ``error_type`` among all steps of the row;
- *failure messages*: steps' ``error_message`` grouped by :func:`message_group` — the message
  with every token that holds a digit (ids, sizes, counts, versions) replaced by ``<*>`` — so
  "i-0a1b is a t3.large, requested t3.micro" and "i-9f8e is a m5.large, requested c5.xlarge"
  count as one group; each group keeps its most recent message as an example.

A rate with an empty denominator is ``None`` (shown as "—"), never 0.
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError
from closedloop._events import Outcome, StepEvent

if TYPE_CHECKING:
    from closedloop.store import Store

DEFAULT_TOP_ERRORS = 3
DEFAULT_TOP_MESSAGES = 3
_MAX_GROUPS = 1000  # distinct message groups kept per row; more are counted as one "other"
_OTHER = "(other messages)"
_MAX_GROUP_CHARS = 500
# A token (between spaces and punctuation) holding a digit: an id, a size, a count, a version.
# Matched only from a token's start, possessively, so each token is scanned once.
_VARIABLE = re.compile(r"""(?<![^\s,;:()\[\]{}'"=<>])[^\s,;:()\[\]{}'"=<>\d]*+\d"""
                       r"""[^\s,;:()\[\]{}'"=<>]*+""")


def message_group(message: str) -> str:
    """The group of a failure message: tokens holding a digit become ``<*>``.

    Whitespace is collapsed and the result capped, so messages that differ only in ids,
    instance types, sizes or line numbers fall in one group.
    """
    grouped = " ".join(_VARIABLE.sub("<*>", message).split())
    return grouped if len(grouped) <= _MAX_GROUP_CHARS else grouped[:_MAX_GROUP_CHARS] + "…"


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p ≤ 100) of already sorted values.

    The smallest value with at least ``p`` % of the values at or below it: the value at
    1-based rank ``ceil(p / 100 * n)``. ``None`` for no values.
    """
    if not 0 < p <= 100:
        raise ConfigError(f"percentile must be in (0, 100], got {p!r}")
    if not sorted_values:
        return None
    rank = math.ceil(p / 100.0 * len(sorted_values))
    return float(sorted_values[max(rank, 1) - 1])


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """``count`` of ``total``; ``value`` is their ratio, ``None`` when ``total`` is 0."""

    count: int
    total: int

    @property
    def value(self) -> float | None:
        """The ratio in [0, 1], or ``None`` when nothing was counted."""
        return self.count / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        """``{"count", "total", "rate"}``."""
        return {"count": self.count, "total": self.total, "rate": self.value}


@dataclass(frozen=True, slots=True, kw_only=True)
class Latency:
    """Step latency in milliseconds: nearest-rank p50 and p95, the mean and the maximum."""

    p50_ms: float | None
    p95_ms: float | None
    mean_ms: float | None
    max_ms: float | None

    def to_dict(self) -> dict[str, Any]:
        """``{"p50_ms", "p95_ms", "mean_ms", "max_ms"}``."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Tokens:
    """Model tokens used, totals and means per run (every attempt of a step counts)."""

    input_total: int
    output_total: int
    input_per_run: float | None
    output_per_run: float | None

    def to_dict(self) -> dict[str, Any]:
        """``{"input_total", "output_total", "input_per_run", "output_per_run"}``."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorCount:
    """How many steps ended with one ``error_type``, and their share of the row's runs."""

    error_type: str
    count: int
    share: float

    def to_dict(self) -> dict[str, Any]:
        """``{"error_type", "count", "share"}``."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageCount:
    """Steps whose failure message fell in one group (see :func:`message_group`).

    ``message`` is the group, ``example`` the most recent message in it, ``share`` the
    group's steps among the row's runs.
    """

    error_type: str
    message: str
    example: str
    count: int
    share: float

    def to_dict(self) -> dict[str, Any]:
        """``{"error_type", "message", "example", "count", "share"}``."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStats:
    """The figures of one task type, or of every task type together (``task_type`` None)."""

    task_type: str | None
    runs: int
    first_ts: float | None
    last_ts: float | None
    validation: Rate
    reask: Rate
    reask_success: Rate
    verification: Rate
    outcomes: Mapping[str, int]
    latency: Latency
    tokens: Tokens
    top_errors: tuple[ErrorCount, ...]
    top_messages: tuple[MessageCount, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form; keys are stable (see :meth:`Report.to_dict`)."""
        return {
            "task_type": self.task_type,
            "runs": self.runs,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "validation": self.validation.to_dict(),
            "reask": self.reask.to_dict(),
            "reask_success": self.reask_success.to_dict(),
            "verification": self.verification.to_dict(),
            "outcomes": dict(self.outcomes),
            "latency": self.latency.to_dict(),
            "tokens": self.tokens.to_dict(),
            "top_errors": [e.to_dict() for e in self.top_errors],
            "top_messages": [m.to_dict() for m in self.top_messages],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Per task type figures (sorted by name) and an ``overall`` row over all of them.

    ``since``/``until``/``task_type`` record the filters the events were read with.
    """

    since: float | None
    until: float | None
    task_type: str | None
    rows: tuple[TaskStats, ...]
    overall: TaskStats

    @property
    def empty(self) -> bool:
        """True when no event matched."""
        return self.overall.runs == 0

    def row(self, task_type: str) -> TaskStats:
        """The figures of one task type; :class:`KeyError` if it had no events."""
        for r in self.rows:
            if r.task_type == task_type:
                return r
        raise KeyError(task_type)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready report.

        ``{"since", "until", "task_type", "overall": ROW, "task_types": [ROW, ...]}`` where a
        ROW is ``{"task_type", "runs", "first_ts", "last_ts", "validation", "reask",
        "reask_success", "verification", "outcomes", "latency", "tokens", "top_errors"}``;
        each rate is ``{"count", "total", "rate"}`` (``rate`` null when ``total`` is 0),
        ``outcomes`` maps every :class:`~closedloop.Outcome` value to a count, ``latency`` is
        ``{"p50_ms", "p95_ms", "mean_ms", "max_ms"}``, ``tokens`` is ``{"input_total",
        "output_total", "input_per_run", "output_per_run"}``, ``top_errors`` a list of
        ``{"error_type", "count", "share"}`` and ``top_messages`` a list of ``{"error_type",
        "message", "example", "count", "share"}``. Times are Unix seconds.
        """
        return {
            "since": self.since,
            "until": self.until,
            "task_type": self.task_type,
            "overall": self.overall.to_dict(),
            "task_types": [r.to_dict() for r in self.rows],
        }


@dataclass(slots=True)
class _Tally:
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
        self.latencies.append(e.latency_ms)
        self.outcomes[e.outcome] += 1
        if e.error_type:
            self.errors[e.error_type] += 1
        if e.error_message:
            self._message(e.error_type or "", e.error_message, 1, e.ts)

    def _message(self, error_type: str, message: str, count: int, ts: float,
                 group: str | None = None) -> None:
        key = (error_type, message_group(message) if group is None else group)
        if key not in self.messages and len(self.messages) >= _MAX_GROUPS:
            key = (error_type, _OTHER)
        self.messages[key] += count
        if key not in self.examples or ts >= self.examples[key][0]:
            self.examples[key] = (ts, message)

    def merge(self, other: _Tally) -> None:
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
        self.outcomes.update(other.outcomes)
        self.errors.update(other.errors)
        for key, count in other.messages.items():
            ts, message = other.examples[key]
            self._message(key[0], message, count, ts, group=key[1])
        self.latencies.extend(other.latencies)

    def freeze(self, task_type: str | None, top_errors: int,
               top_messages: int = DEFAULT_TOP_MESSAGES) -> TaskStats:
        runs = self.runs
        ordered = sorted(self.latencies)
        outcomes = {o.value: self.outcomes.get(o.value, 0) for o in Outcome}
        # outcomes written by a newer closedloop still count, after the known ones
        outcomes.update(sorted((k, v) for k, v in self.outcomes.items() if k not in outcomes))
        errors = sorted(self.errors.items(), key=lambda kv: (-kv[1], kv[0]))[:top_errors]
        messages = sorted(self.messages.items(), key=lambda kv: (-kv[1], kv[0]))[:top_messages]
        return TaskStats(
            task_type=task_type,
            runs=runs,
            first_ts=self.first_ts if runs else None,
            last_ts=self.last_ts if runs else None,
            validation=Rate(count=self.validation_passed, total=self.validated),
            reask=Rate(count=self.reasked, total=self.validated),
            reask_success=Rate(count=self.reask_passed, total=self.reasked),
            verification=Rate(count=self.verification_passed, total=self.verified),
            outcomes=outcomes,
            latency=Latency(
                p50_ms=percentile(ordered, 50),
                p95_ms=percentile(ordered, 95),
                mean_ms=math.fsum(ordered) / runs if runs else None,
                max_ms=ordered[-1] if ordered else None,
            ),
            tokens=Tokens(
                input_total=self.input_tokens,
                output_total=self.output_tokens,
                input_per_run=self.input_tokens / runs if runs else None,
                output_per_run=self.output_tokens / runs if runs else None,
            ),
            top_errors=tuple(ErrorCount(error_type=k, count=v, share=v / runs)
                             for k, v in errors),
            top_messages=tuple(MessageCount(error_type=k[0], message=k[1],
                                            example=self.examples[k][1], count=v, share=v / runs)
                               for k, v in messages),
        )


def build_report(
    events: Iterable[StepEvent],
    *,
    top_errors: int = DEFAULT_TOP_ERRORS,
    top_messages: int = DEFAULT_TOP_MESSAGES,
    since: float | None = None,
    until: float | None = None,
    task_type: str | None = None,
) -> Report:
    """Aggregate ``events`` in one pass into a :class:`Report`.

    ``since``/``until``/``task_type`` are not applied here (the events are taken as given);
    they are recorded in the report so that it says which window it covers.
    ``top_errors`` and ``top_messages`` bound how many error types and failure-message groups
    each row lists (most frequent first).
    """
    if top_errors < 0:
        raise ConfigError(f"top_errors must be ≥ 0, got {top_errors!r}")
    if top_messages < 0:
        raise ConfigError(f"top_messages must be ≥ 0, got {top_messages!r}")
    per_task: dict[str, _Tally] = {}
    for event in events:
        tally = per_task.get(event.task_type)
        if tally is None:
            tally = per_task[event.task_type] = _Tally()
        tally.add(event)
    overall = _Tally()
    for tally in per_task.values():
        overall.merge(tally)
    return Report(
        since=since,
        until=until,
        task_type=task_type,
        rows=tuple(per_task[t].freeze(t, top_errors, top_messages) for t in sorted(per_task)),
        overall=overall.freeze(None, top_errors, top_messages),
    )


def report_from_store(
    store: Store,
    *,
    since: float | None = None,
    until: float | None = None,
    task_type: str | None = None,
    top_errors: int = DEFAULT_TOP_ERRORS,
    top_messages: int = DEFAULT_TOP_MESSAGES,
) -> Report:
    """The report over ``store``'s events with ``since <= ts < until`` (Unix seconds).

    Only events already written are seen: call ``store.flush()`` first to include your own.
    """
    events = store.events(since=since, until=until, task_type=task_type)
    return build_report(events, top_errors=top_errors, top_messages=top_messages, since=since,
                        until=until, task_type=task_type)
