"""The summary of :class:`~closedloop.store.EventQueries` assembled from a SQL backend's answers.

A backend (:mod:`._sqlite_query`, :mod:`._postgres_query`) answers a few grouped queries over
one snapshot; this module turns them into :class:`~closedloop.store.EventSummary`, the same
figures the Python pass gives:

- counts and sums per ``(task_type, outcome, error_type, validation_passed,
  verification_passed, attempts)``, folded into the per-task rates, outcomes and errors;
- **exact nearest-rank percentiles without sorting every latency**: a histogram of latencies
  per task type over a non-decreasing bucket of the latency (the backend's
  ``LATENCY_BUCKET`` expression, indexed by ``events_latency``). The rank's bucket is found
  from the counts; when its smallest latency equals its largest that is the value, otherwise
  only that bucket's latencies are read and sorted. A distribution so narrow that the rank's
  bucket holds most steps reads most latencies (slower, still exact);
- failure-message groups counted per ``(task_type, error_type, error_group)``, the column the
  writer fills with :func:`~closedloop._figures.message_group`; rows stored before that column
  existed (``error_group`` NULL, a message present) are grouped here, in Python.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from closedloop._figures import message_group, nearest_rank
from closedloop.store._query import (
    EventSummary,
    MessageGroup,
    TaskFigures,
    top_counts,
)

Key = tuple[str, str]
"""A message group's key: ``(error_type or "", group)``."""


class SummarySource(Protocol):
    """What a SQL backend answers, all over the same snapshot and filter."""

    def groups(self) -> Iterable[Sequence[Any]]:
        """``(task_type, outcome, error_type, validation_passed, verification_passed,
        attempts, steps, input_tokens, output_tokens, latency_sum)`` per combination."""

    def histogram(self) -> Iterable[Sequence[Any]]:
        """``(task_type, bucket, steps, min latency, max latency, first ts, last ts)`` per
        latency bucket; the last four may be None, then they are asked for when needed."""

    def bucket_bounds(self, pairs: Sequence[tuple[str, Any]]
                      ) -> dict[tuple[str, Any], tuple[float, float]]:
        """The smallest and largest latency of each ``(task_type, bucket)``."""

    def bucket_latencies(self, pairs: Sequence[tuple[str, Any]]
                         ) -> dict[tuple[str, Any], list[float]]:
        """Every latency of each ``(task_type, bucket)``."""

    def time_spans(self, buckets: dict[str, list[Any]]) -> dict[str, tuple[float, float]]:
        """The first and last ts of each task type's steps (which fall in its buckets)."""

    def message_counts(self, top: int | None) -> Iterable[Sequence[Any]]:
        """``(task_type, error_type or "", error_group, steps, last ts)``: with ``top``, the
        ``top`` most frequent groups of each task type and, with task type None, of all;
        with ``top`` None every group of each task type (and no overall rows)."""

    def ungrouped_messages(self) -> Iterable[Sequence[Any]]:
        """``(task_type, error_type, error_message, ts)`` of steps with a message but no
        ``error_group`` (stored before the column existed)."""

    def examples(self, keys: Sequence[tuple[str, str, str]]
                 ) -> dict[tuple[str, str, str], tuple[float, str]]:
        """``(ts, error_message)`` of the most recent step of each ``(task_type, error_type
        or "", group)`` that has one."""

    def costs(self) -> Iterable[Sequence[Any]]:
        """``(task_type, priced steps, sum of cost_usd)`` per task type with a priced step
        (read through the partial index ``events_cost``: only priced steps are in it)."""


@dataclass(slots=True)
class _Row:
    runs: int = 0
    validated: int = 0
    validation_passed: int = 0
    reasked: int = 0
    reask_passed: int = 0
    verified: int = 0
    verification_passed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    latency_sums: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def add(self, row: Sequence[Any]) -> None:
        _, outcome, error_type, validation, verification, attempts, n, tin, tout, lat = row
        n = int(n)
        self.runs += n
        if validation is not None:
            self.validated += n
            self.validation_passed += n * bool(validation)
            if attempts > 1:
                self.reasked += n
                self.reask_passed += n * bool(validation)
        if verification is not None:
            self.verified += n
            self.verification_passed += n * bool(verification)
        self.input_tokens += int(tin)
        self.output_tokens += int(tout)
        self.latency_sums.append(float(lat))
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + n
        if error_type:
            self.errors[error_type] = self.errors.get(error_type, 0) + n

    def merge(self, other: _Row) -> None:
        for name in ("runs", "validated", "validation_passed", "reasked", "reask_passed",
                     "verified", "verification_passed", "input_tokens", "output_tokens"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.latency_sums.extend(other.latency_sums)
        for mine, theirs in ((self.outcomes, other.outcomes), (self.errors, other.errors)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v


Figures = tuple[float | None, float | None, float | None]
"""``(p50, p95, max)``."""


class _Latencies:
    """Exact percentiles from the histograms, reading the bounds and latencies of the few
    buckets that hold a percentile (all of them in one request); each task type's first and
    last step."""

    def __init__(self, source: SummarySource) -> None:
        self.source = source
        self.per_task: dict[str, dict[Any, int]] = defaultdict(dict)
        self.bounds: dict[tuple[str, Any], tuple[float, float]] = {}
        self.spans: dict[str, tuple[float, float]] = {}
        for task, bucket, n, low, high, first, last in source.histogram():
            self.per_task[task][bucket] = int(n)
            if low is not None:
                self.bounds[task, bucket] = (float(low), float(high))
            if first is not None:
                known = self.spans.get(task)
                self.spans[task] = ((first, last) if known is None
                                    else (min(known[0], first), max(known[1], last)))
        missing = {t: sorted(b) for t, b in self.per_task.items() if t not in self.spans}
        if missing:
            self.spans.update(source.time_spans(missing))

    def figures(self, rows: dict[str | None, Sequence[str]]) -> dict[str | None, Figures]:
        """``(p50, p95, max)`` of each row (a key and the task types it covers)."""
        # which bucket holds each percentile, and its rank there
        plans: dict[str | None, tuple[list[tuple[Any, int]], Any]] = {}
        for key, tasks in rows.items():
            counts: dict[Any, int] = {}
            for task in tasks:
                for bucket, n in self.per_task.get(task, {}).items():
                    counts[bucket] = counts.get(bucket, 0) + n
            if not counts:
                continue
            order = sorted(counts)
            total = sum(counts.values())
            picks = []
            for p in (50, 95):
                rank, seen = nearest_rank(p, total), 0
                for bucket in order:
                    if seen + counts[bucket] >= rank:
                        picks.append((bucket, rank - seen))
                        break
                    seen += counts[bucket]
            plans[key] = (picks, order[-1])

        def members(key: str | None, bucket: Any) -> list[str]:
            return [t for t in rows[key] if bucket in self.per_task[t]]

        wanted = {(t, b) for key, (picks, top) in plans.items()
                  for b in (*(b for b, _ in picks), top) for t in members(key, b)}
        unknown = sorted(wanted - self.bounds.keys())
        if unknown:
            self.bounds.update(self.source.bucket_bounds(unknown))

        def merged(key: str | None, bucket: Any) -> tuple[float, float]:
            found = [self.bounds[t, bucket] for t in members(key, bucket)]
            return min(b[0] for b in found), max(b[1] for b in found)

        spread = {(t, b) for key, (picks, _) in plans.items() for b, _ in picks
                  if merged(key, b)[0] != merged(key, b)[1] for t in members(key, b)}
        read = self.source.bucket_latencies(sorted(spread)) if spread else {}
        out: dict[str | None, Figures] = dict.fromkeys(rows, (None, None, None))
        for key, (picks, top) in plans.items():
            values: list[float | None] = []
            for bucket, rank in picks:
                low, high = merged(key, bucket)
                if low == high:
                    values.append(low)
                    continue
                ordered = sorted(v for t in members(key, bucket) for v in read[t, bucket])
                values.append(ordered[min(rank, len(ordered)) - 1])
            out[key] = (values[0], values[1], merged(key, top)[1])
        return out


@dataclass(frozen=True, slots=True)
class _LatencyFigures:
    """``(p50, p95, max)`` per task type and overall (key None), first/last step per task
    type, steps counted per task type."""

    figures: dict[str | None, Figures]
    spans: dict[str, tuple[float, float]]
    counts: dict[str, int]


def _latency_figures(source: SummarySource) -> _LatencyFigures:
    latencies = _Latencies(source)
    tasks = sorted(latencies.per_task)
    rows: dict[str | None, Sequence[str]] = {t: (t,) for t in tasks}
    rows[None] = tasks
    return _LatencyFigures(figures=latencies.figures(rows), spans=latencies.spans,
                           counts={t: sum(latencies.per_task[t].values()) for t in tasks})


def summarize(source: SummarySource, *, top_messages: int,
              alongside: SummarySource | None = None) -> EventSummary:
    """The summary from ``source``'s answers (see the module's docstring).

    With ``alongside`` (the same queries on a second connection), the latency figures are
    computed there in a thread while ``source`` counts, which halves the time on two cores.
    Should the two have seen different steps (steps written between their snapshots), the
    latency figures are computed again from ``source``, so that every figure counts the same
    steps.
    """
    with ThreadPoolExecutor(1) if alongside is not None else nullcontext() as pool:
        pending = (pool.submit(_latency_figures, alongside)
                   if pool is not None and alongside is not None else None)
        rows: dict[str, _Row] = {}
        for group in source.groups():
            rows.setdefault(group[0], _Row()).add(group)
        costs = {task: (int(n), float(total)) for task, n, total in source.costs()}
        tasks = sorted(rows)
        messages = _messages(source, tasks, top_messages) if tasks and top_messages else {}
        latency = pending.result() if pending is not None else None
    if latency is None or latency.counts != {t: rows[t].runs for t in tasks}:
        latency = _latency_figures(source)
    overall = _Row()
    for task in tasks:
        overall.merge(rows[task])

    def cost(members: Sequence[str]) -> tuple[float | None, int]:
        found = [costs[t] for t in members if t in costs]
        priced = sum(n for n, _ in found)
        return (math.fsum(c for _, c in found) if priced else None), priced

    def figures(task: str | None, row: _Row, members: Sequence[str]) -> TaskFigures:
        assert latency is not None
        times = [latency.spans[t] for t in members if t in latency.spans]
        p50, p95, high = latency.figures.get(task, (None, None, None))
        return TaskFigures(
            task_type=task, runs=row.runs,
            first_ts=min(t[0] for t in times) if times else None,
            last_ts=max(t[1] for t in times) if times else None,
            validated=row.validated, validation_passed=row.validation_passed,
            reasked=row.reasked, reask_passed=row.reask_passed, verified=row.verified,
            verification_passed=row.verification_passed, input_tokens=row.input_tokens,
            output_tokens=row.output_tokens, outcomes=row.outcomes, errors=row.errors,
            latency_p50_ms=p50, latency_p95_ms=p95,
            latency_mean_ms=math.fsum(row.latency_sums) / row.runs if row.runs else None,
            latency_max_ms=high, messages=messages.get(task, ()),
            cost_usd=cost(members)[0], priced=cost(members)[1])

    return EventSummary(rows=tuple(figures(t, rows[t], (t,)) for t in tasks),
                        overall=figures(None, overall, tasks))


def _messages(source: SummarySource, tasks: Sequence[str],
              top: int) -> dict[str | None, tuple[MessageGroup, ...]]:
    """The top message groups per task type and overall (key None), with their examples."""
    legacy = list(source.ungrouped_messages())
    counts: dict[str | None, dict[Key, int]] = defaultdict(dict)
    # Without legacy rows SQL ranks the groups; with them every group is counted here. Then
    # ``in_sql`` says which (task type, key) SQL holds, so examples are looked up only there.
    in_sql: set[tuple[str, Key]] | None = None
    old_examples: dict[tuple[str, Key], tuple[float, str]] = {}
    for task, error_type, group, n, _ in source.message_counts(None if legacy else top):
        counts[task][error_type, group] = int(n)
    if legacy:
        in_sql = {(t, k) for t in tasks for k in counts[t]}
        for task, error_type, message, ts in legacy:
            key = (error_type or "", message_group(message))
            counts[task][key] = counts[task].get(key, 0) + 1
            known = old_examples.get((task, key))
            if known is None or ts >= known[0]:
                old_examples[task, key] = (float(ts), message)
        for task in tasks:
            for key, n in counts[task].items():
                counts[None][key] = counts[None].get(key, 0) + n

    chosen = {task: top_counts(counts.get(task, {}), top) for task in (*tasks, None)}
    # the examples: the most recent message of each listed group, of each task type in it
    wanted = {(t, *key) for task, groups in chosen.items() for key, _ in groups
              for t in ((task,) if task is not None else tasks)
              if in_sql is None or (t, key) in in_sql}
    found = source.examples(sorted(wanted)) if wanted else {}

    def example(task: str, key: Key) -> tuple[float, str] | None:
        new, old = found.get((task, *key)), old_examples.get((task, key))
        return old if old is not None and (new is None or old[0] > new[0]) else new

    out: dict[str | None, tuple[MessageGroup, ...]] = {}
    for task, groups in chosen.items():
        listed = []
        for key, n in groups:
            members = (task,) if task is not None else tasks
            # the most recent of the task types' examples (the last task type on a tie)
            seen = [e for t in members if (e := example(t, key)) is not None]
            ts, message = max(reversed(seen), key=lambda e: e[0]) if seen else (math.nan, "")
            listed.append(MessageGroup(error_type=key[0], group=key[1], count=n,
                                       example=message, example_ts=ts))
        out[task] = tuple(listed)
    return out
