"""The report: per task type, how the feedback loops are doing over a window of stored events.

:func:`report_from_store` asks the store for the figures of a time window (and task type):
SQLite and PostgreSQL compute them in SQL, through their indexes, and hand over a few rows
(:meth:`~closedloop.store.Store.summary`). :func:`build_report` computes the same figures in
one pass over any iterable of :class:`~closedloop.StepEvent`; per task type it keeps counters
and the list of latencies (the only thing a percentile cannot do without). Both give equal
reports for equal events, with two documented differences in degree
(:mod:`closedloop.store._query`): a mean latency computed in SQL may differ in its last
digits, and past 1000 distinct failure-message groups in a row :func:`build_report` counts the
rest as one "(other messages)" group where SQL keeps counting each.

Definitions (the CLI's ``--help`` repeats them):

- *validation pass rate*: steps whose validation passed (on the last attempt) among steps where
  validation ran (``validation_passed`` is not ``None``);
- *re-ask rate*: steps with more than one attempt among steps where validation ran;
- *re-ask success*: re-asked steps whose validation then passed, among re-asked steps;
- *verification pass rate*: steps whose verifiers all passed among verified steps
  (``verification_passed`` is not ``None``);
- *latency percentiles*: nearest-rank — the p-th percentile is the smallest recorded latency
  with at least p % of the steps at or below it, so it is always a latency that happened;
- *cost*: the sum of the priced steps' ``cost_usd`` and how many were priced; *cost per
  success*: that sum over the steps that succeeded;
- *error share*: steps with that ``error_type`` among all steps of the row;
- *failure messages*: steps' ``error_message`` grouped by :func:`message_group` — the message
  with every token that holds a digit (ids, sizes, counts, versions) replaced by ``<*>`` — so
  "i-0a1b is a t3.large, requested t3.micro" and "i-9f8e is a m5.large, requested c5.xlarge"
  count as one group; each group keeps its most recent message as an example.

A rate with an empty denominator is ``None`` (shown as "—"), never 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError
from closedloop._events import Outcome, StepEvent
from closedloop.store import EventSummary, TaskFigures, summarize_events

if TYPE_CHECKING:
    from closedloop.store import Store

DEFAULT_TOP_ERRORS = 3
DEFAULT_TOP_MESSAGES = 3


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
    cached_input_total: int = 0
    """Of ``input_total``, the tokens served from a prompt cache."""

    def to_dict(self) -> dict[str, Any]:
        """``{"input_total", "output_total", "input_per_run", "output_per_run",
        "cached_input_total"}``."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """What the row's steps cost in US dollars (``cost_usd`` of :class:`~closedloop.StepEvent`).

    ``total_usd`` sums the priced steps (None: none was priced); ``priced`` counts them, so
    ``priced < runs`` says the total leaves some steps out. ``per_success_usd`` is the total
    over the steps that succeeded: what one success cost, failures and re-asks included.
    """

    total_usd: float | None
    priced: int
    per_success_usd: float | None

    def to_dict(self) -> dict[str, Any]:
        """``{"total_usd", "priced", "per_success_usd"}``."""
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
    cost: Cost = Cost(total_usd=None, priced=0, per_success_usd=None)

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
            "cost": self.cost.to_dict(),
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
        "reask_success", "verification", "outcomes", "latency", "tokens", "top_errors",
        "top_messages", "cost"}`` (keys added later come last);
        each rate is ``{"count", "total", "rate"}`` (``rate`` null when ``total`` is 0),
        ``outcomes`` maps every :class:`~closedloop.Outcome` value to a count, ``latency`` is
        ``{"p50_ms", "p95_ms", "mean_ms", "max_ms"}``, ``tokens`` is ``{"input_total",
        "output_total", "input_per_run", "output_per_run", "cached_input_total"}``, ``cost``
        is ``{"total_usd", "priced", "per_success_usd"}`` (:class:`Cost`),
        ``top_errors`` a list of ``{"error_type", "count", "share"}`` and ``top_messages`` a
        list of ``{"error_type", "message", "example", "count", "share"}``. Times are Unix
        seconds.
        """
        return {
            "since": self.since,
            "until": self.until,
            "task_type": self.task_type,
            "overall": self.overall.to_dict(),
            "task_types": [r.to_dict() for r in self.rows],
        }


def _stats(f: TaskFigures, top_errors: int) -> TaskStats:
    """A row of the report from the store's figures."""
    runs = f.runs
    outcomes = {o.value: f.outcomes.get(o.value, 0) for o in Outcome}
    # outcomes written by a newer closedloop still count, after the known ones
    outcomes.update(sorted((k, v) for k, v in f.outcomes.items() if k not in outcomes))
    errors = sorted(f.errors.items(), key=lambda kv: (-kv[1], kv[0]))[:top_errors]
    return TaskStats(
        task_type=f.task_type,
        runs=runs,
        first_ts=f.first_ts,
        last_ts=f.last_ts,
        validation=Rate(count=f.validation_passed, total=f.validated),
        reask=Rate(count=f.reasked, total=f.validated),
        reask_success=Rate(count=f.reask_passed, total=f.reasked),
        verification=Rate(count=f.verification_passed, total=f.verified),
        outcomes=outcomes,
        latency=Latency(p50_ms=f.latency_p50_ms, p95_ms=f.latency_p95_ms,
                        mean_ms=f.latency_mean_ms, max_ms=f.latency_max_ms),
        tokens=Tokens(
            input_total=f.input_tokens,
            output_total=f.output_tokens,
            input_per_run=f.input_tokens / runs if runs else None,
            output_per_run=f.output_tokens / runs if runs else None,
            cached_input_total=f.cached_input_tokens,
        ),
        top_errors=tuple(ErrorCount(error_type=k, count=v, share=v / runs) for k, v in errors),
        top_messages=tuple(MessageCount(error_type=m.error_type, message=m.group,
                                        example=m.example, count=m.count, share=m.count / runs)
                           for m in f.messages),
        cost=Cost(total_usd=f.cost_usd, priced=f.priced,
                  per_success_usd=(f.cost_usd / succeeded
                                   if f.cost_usd is not None and (succeeded := outcomes.get(
                                       Outcome.SUCCEEDED.value, 0)) else None)),
    )


def _check(top_errors: int, top_messages: int) -> None:
    if top_errors < 0:
        raise ConfigError(f"top_errors must be ≥ 0, got {top_errors!r}")
    if top_messages < 0:
        raise ConfigError(f"top_messages must be ≥ 0, got {top_messages!r}")


def _report(summary: EventSummary, top_errors: int, since: float | None, until: float | None,
            task_type: str | None) -> Report:
    return Report(since=since, until=until, task_type=task_type,
                  rows=tuple(_stats(r, top_errors) for r in summary.rows),
                  overall=_stats(summary.overall, top_errors))


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
    _check(top_errors, top_messages)
    return _report(summarize_events(events, top_messages=top_messages), top_errors, since,
                   until, task_type)


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

    The figures are computed where the events are: in SQL on SQLite and PostgreSQL (see
    :meth:`~closedloop.store.Store.summary`), equal to :func:`build_report` over the same
    events. Only events already written are seen: call ``store.flush()`` first to include
    your own.
    """
    _check(top_errors, top_messages)
    summary = store.summary(since=since, until=until, task_type=task_type,
                            top_messages=top_messages)
    return _report(summary, top_errors, since, until, task_type)
