"""Spans and scores in memory: the span/score port of ``memory://`` stores, and the test
double users need for their own tests (:class:`~closedloop.telemetry.MemoryExporter`)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Iterable, Sequence

from closedloop._events import StepEvent
from closedloop._spans import (
    SPANS_PAGE,
    Pruned,
    Rollup,
    Score,
    ScoreRow,
    StoredSpan,
    TaskScores,
    TracePage,
    TraceSummary,
    day_of,
    decode_cursor,
    fold_scores,
    page_of,
    relabels,
    rollup,
)


class MemorySpanStore:
    """Spans and scores in lists; thread-safe; nothing survives the process.

    ``events`` gives the events of the store it belongs to (for :meth:`score_summary`); a
    span store on its own has none.
    """

    def __init__(self, events: Callable[[], Iterable[StepEvent]] | None = None) -> None:
        self._events = events
        self._spans: list[tuple[int, StoredSpan]] = []  # (sequence number, span)
        self._seq = 0
        self._traces: dict[str, Rollup] = {}
        self._scores: list[Score] = []
        self._lock = threading.Lock()

    def write_spans(self, spans: Sequence[StoredSpan]) -> None:
        """Append the batch and merge it into its traces' summaries."""
        with self._lock:
            for s in spans:
                self._seq += 1
                self._spans.append((self._seq, s))
            for new in rollup(spans):
                old = self._traces.get(new.trace_id)
                self._traces[new.trace_id] = new if old is None else _merge(old, new)

    def all_spans(self) -> list[StoredSpan]:
        """Every span held, in write order."""
        with self._lock:
            return [s for _, s in self._spans]

    def trace(self, trace_id: str) -> list[StoredSpan]:
        """Every span of one trace, by start time."""
        wanted = trace_id.strip().lower()
        return sorted((s for s in self.all_spans() if s.trace_id == wanted),
                      key=lambda s: s.start_ns)

    def traces(self, *, limit: int = 20, task_type: str | None = None,
               since_ns: int | None = None, cursor: str | None = None) -> TracePage:
        """Traces newest first."""
        after = decode_cursor(cursor) if cursor is not None else None
        with self._lock:
            found = [r for r in self._traces.values()
                     if (task_type is None or r.task_type == task_type)
                     and (since_ns is None or r.start_ns >= since_ns)
                     and (after is None or (r.start_ns, r.trace_id) < after)]
        found.sort(key=lambda r: (r.start_ns, r.trace_id), reverse=True)
        limit = max(0, int(limit))
        return page_of([TraceSummary(trace_id=r.trace_id, start_ns=r.start_ns, end_ns=r.end_ns,
                                     spans=r.spans, task_type=r.task_type, outcome=r.outcome)
                        for r in found[:limit + 1]], limit)

    def add_score(self, score: Score) -> None:
        """Append one score."""
        with self._lock:
            self._scores.append(score)

    def scores(self, *, trace_id: str | None = None, name: str | None = None,
               since: float | None = None) -> list[Score]:
        """Scores, oldest first."""
        with self._lock:
            items = list(self._scores)
        return sorted((s for s in items
                       if (trace_id is None or s.trace_id == trace_id)
                       and (name is None or s.name == name)
                       and (since is None or s.ts >= since)), key=lambda s: s.ts)

    def score_summary(self, *, since: float | None = None,
                      until: float | None = None) -> list[TaskScores]:
        """Per task type with scores: what the database backends compute in SQL."""
        steps: dict[str, list[int]] = {}
        latest: dict[str, tuple[float, str]] = {}  # trace -> (ts, task type) of its last step
        for e in self._events() if self._events is not None else ():
            if (since is not None and e.ts < since) or (until is not None and e.ts >= until):
                continue
            counts = steps.setdefault(e.task_type, [0, 0])
            counts[0] += 1
            counts[1] += e.outcome == "succeeded"
            if e.trace_id not in latest or e.ts >= latest[e.trace_id][0]:
                latest[e.trace_id] = (e.ts, e.task_type)
        groups: dict[tuple[str, str, str, str | None], list[float]] = {}
        for s in self.scores(since=since):
            if (until is not None and s.ts >= until) or s.trace_id not in latest:
                continue
            key = (latest[s.trace_id][1], s.name, day_of(s.ts), s.label)
            group = groups.setdefault(key, [0, 0.0, 0])
            if s.value is not None:
                group[0] += 1
                group[1] += s.value
            group[2] += 1
        rows: list[ScoreRow] = [(*k, int(g[0]), g[1], int(g[2])) for k, g in groups.items()]
        tasks = {row[0] for row in rows}
        return fold_scores(((t, n, ok) for t, (n, ok) in steps.items() if t in tasks), rows)

    def spans_since(self, cursor: int, *, limit: int = SPANS_PAGE
                    ) -> tuple[list[StoredSpan], int]:
        """Spans written after position ``cursor``."""
        with self._lock:
            start = bisect.bisect_right(self._spans, cursor, key=lambda item: item[0])
            page = self._spans[start:start + max(1, int(limit))]
        return [s for _, s in page], page[-1][0] if page else cursor

    def span_cursor(self) -> int:
        """The sequence number of the latest span written."""
        with self._lock:
            return self._spans[-1][0] if self._spans else 0

    def prune(self, before: float) -> Pruned:
        """Forget spans, traces and scores older than ``before``."""
        cut_ns = int(before * 1e9)
        with self._lock:
            n_spans, n_traces, n_scores = (len(self._spans), len(self._traces),
                                           len(self._scores))
            self._spans = [item for item in self._spans if item[1].start_ns >= cut_ns]
            self._traces = {k: r for k, r in self._traces.items() if r.start_ns >= cut_ns}
            self._scores = [s for s in self._scores if s.ts >= before]
            return Pruned(spans=n_spans - len(self._spans), traces=n_traces - len(self._traces),
                          scores=n_scores - len(self._scores))


def _merge(old: Rollup, new: Rollup) -> Rollup:
    """``old`` with ``new`` added: as the database backends' upsert does."""
    labels = new if relabels(old.label_ns, old.outcome, new.label_ns, new.outcome) else old
    return Rollup(trace_id=old.trace_id, start_ns=min(old.start_ns, new.start_ns),
                  end_ns=max(old.end_ns, new.end_ns), spans=old.spans + new.spans,
                  label_ns=labels.label_ns, task_type=labels.task_type, outcome=labels.outcome)
