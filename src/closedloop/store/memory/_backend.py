"""An in-memory backend: the test double users need for their own tests."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from closedloop._control_state import MemoryLedger, StopKind
from closedloop._events import StepEvent
from closedloop.store._base import EventQuery
from closedloop.store._learn import (
    Dimension,
    ExampleKey,
    FactorCell,
    FailureCell,
    SeriesCell,
    factor_events,
    failure_events,
    failure_example_events,
    period_steps_events,
    series_events,
)
from closedloop.store._query import (
    EventSummary,
    StepFilter,
    StepPage,
    page_of_events,
    summarize_events,
)
from closedloop.store._retention import EventsPruned, StoreInfo
from closedloop.store.memory._approvals import MemoryApprovals
from closedloop.store.memory._autonomy import MemoryLevelStore
from closedloop.store.memory._runs import MemoryRunStore
from closedloop.store.memory._spans import MemorySpanStore


class MemoryBackend:
    """Keeps events in a list; thread-safe; nothing survives the process."""

    url = "memory://"

    def __init__(self) -> None:
        self._events: list[StepEvent] = []
        self._lock = threading.Lock()
        self._ledger = MemoryLedger()
        self._spans = MemorySpanStore(events=lambda: self.iter_events(EventQuery()))
        self._runs = MemoryRunStore()
        self._levels = MemoryLevelStore(events=lambda task_type, since: self.iter_events(
            EventQuery(task_type=task_type, since=since)))
        self._approvals = MemoryApprovals()

    def run_store(self) -> MemoryRunStore:
        """This store's run records: held by the backend for its whole life."""
        return self._runs

    def approval_store(self) -> MemoryApprovals:
        """This store's approval requests: held by the backend for its whole life."""
        return self._approvals

    def control_ledger(self) -> MemoryLedger:
        """This store's pauses and halts: one in-process ledger for the backend's whole life,
        so every loop, guard and runtime on the store sees the same stops."""
        return self._ledger

    def level_store(self) -> MemoryLevelStore:
        """This store's autonomy levels, audit trail, feedback and detector states: held by
        the backend for its whole life."""
        return self._levels

    def span_store(self) -> MemorySpanStore:
        """This store's spans and scores: held by the backend for its whole life."""
        return self._spans

    def write_batch(self, events: Sequence[StepEvent]) -> None:
        """Append the batch."""
        with self._lock:
            self._events.extend(events)

    def iter_events(self, query: EventQuery) -> Iterator[StepEvent]:
        """Events matching ``query``, oldest first."""
        with self._lock:
            events = sorted(self._events, key=lambda e: e.ts)
        n = 0
        for e in events:
            if query.since is not None and e.ts < query.since:
                continue
            if query.until is not None and e.ts >= query.until:
                continue
            if query.task_type is not None and e.task_type != query.task_type:
                continue
            if query.trace_id is not None and e.trace_id != query.trace_id:
                continue
            if query.run_id is not None and e.run_id != query.run_id:
                continue
            if query.limit is not None and n >= query.limit:
                return
            n += 1
            yield e

    def summarize(self, where: StepFilter, *, top_messages: int) -> EventSummary:
        """The figures of the steps matching ``where`` (the query port, in Python)."""
        with self._lock:
            events = list(self._events)
        return summarize_events((e for e in events if where.matches(e)),
                                top_messages=top_messages)

    def _matching(self, where: StepFilter) -> list[StepEvent]:
        with self._lock:
            events = list(self._events)
        return [e for e in events if where.matches(e)]

    # ----- the learning layer's aggregations, in Python (closedloop.store._learn) ----------
    def series(self, where: StepFilter, *, by: Dimension, window: str) -> list[SeriesCell]:
        """Per value of ``by`` and period, the series' figures."""
        return series_events(self._matching(where), by, window)

    def factor_counts(self, where: StepFilter) -> list[FactorCell]:
        """Steps and failures per combination of factor values."""
        return factor_events(self._matching(where))

    def failure_counts(self, where: StepFilter, *, window: str) -> list[FailureCell]:
        """Failed steps per group, task type, model and period."""
        return failure_events(self._matching(where), window)

    def failure_examples(self, where: StepFilter, keys: Sequence[ExampleKey], *,
                         per_key: int) -> dict[ExampleKey, list[tuple[float, str]]]:
        """The newest trace ids of each key's failed steps."""
        return failure_example_events(self._matching(where), keys, per_key)

    def period_steps(self, where: StepFilter, *, window: str) -> dict[int, int]:
        """Steps per period."""
        return period_steps_events(self._matching(where), window)

    def list_steps(self, where: StepFilter, *, limit: int,
                   cursor: str | None = None) -> StepPage:
        """A page of steps matching ``where``, newest first (ties: latest recorded first)."""
        with self._lock:
            events = list(self._events)
        return page_of_events(events, where, limit=limit, cursor=cursor, url=self.url)

    def list_steps_after(self, where: StepFilter, *, limit: int,
                         cursor: str | None = None) -> StepPage:
        """The steps matching ``where`` past ``cursor``, oldest first."""
        with self._lock:
            events = list(self._events)
        return page_of_events(events, where, limit=limit, cursor=cursor, url=self.url,
                              after=True)

    def task_types(self) -> list[str]:
        """Every task type with a held step, sorted."""
        with self._lock:
            return sorted({e.task_type for e in self._events})

    def count(self) -> int:
        """How many events are held."""
        with self._lock:
            return len(self._events)

    def close(self) -> None:
        """Nothing to release."""

    # ----- maintenance: the port of closedloop.store._retention ----------------------------
    def info(self) -> StoreInfo:
        """How many events are held, oldest and newest; the ledger's stops and history."""
        with self._lock:
            stamps = [e.ts for e in self._events]
        stops = self._ledger.stops()
        return StoreInfo(
            backend="memory", url=self.url, schema_version=0, latest_version=0,
            events=len(stamps), oldest_event=min(stamps, default=None),
            newest_event=max(stamps, default=None), spans=None, scores=None,
            control_stops=len(stops), control_halts=sum(s.kind is StopKind.HALTED for s in stops),
            control_history=len(self._ledger.history(limit=1 << 62)), size_bytes=None,
            records={**self._approvals.counts(), **self._levels.counts(),
                     **self._runs.counts()})

    def prune_events(self, before: float, *, limit: int | None = None,
                     dry_run: bool = False) -> EventsPruned:
        """Forget events older than ``before`` (at most ``limit``, oldest first)."""
        with self._lock:
            old = sorted((e.ts, i) for i, e in enumerate(self._events) if e.ts < before)
            gone = old if limit is None else old[:limit]
            if not dry_run:
                drop = {i for _, i in gone}
                self._events = [e for i, e in enumerate(self._events) if i not in drop]
        return EventsPruned(events=len(gone), more=len(gone) < len(old))

    def prune_control(self, before: float, *, now: float, dry_run: bool = False) -> int:
        """The in-process ledger keeps its history for the process's life: nothing to do."""
        return 0

    def prune_records(self, before: float, *, dry_run: bool = False) -> dict[str, int]:
        """Forget settled approval requests, autonomy audit and feedback, and runs older than
        ``before`` (the rules of :data:`~closedloop.store._retention.RECORD_PRUNE`)."""
        return {**self._approvals.prune(before, dry_run=dry_run),
                **self._levels.prune(before, dry_run=dry_run),
                **self._runs.prune(before, dry_run=dry_run)}
