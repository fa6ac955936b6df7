"""Automatic retention: the store's writer thread removes what is older than the setting,
in bounded steps, and never an event newer than the cutoff."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

import closedloop as cl
from closedloop.store import (
    DEFAULT_RETENTION,
    EventQuery,
    EventsPruned,
    MemoryBackend,
    Retention,
    open_backend,
    parse_duration,
    prune,
)

from .test_contract import event

DAY = 86_400.0
NOW = time.time()


def settle(store: cl.Store) -> None:
    """Wait until the writer has run its maintenance after everything recorded so far: the
    writer runs it after each wake-up, and the second flush is served by the wake-up after
    the one that served the first."""
    assert store.flush()
    assert store.flush()


def kept(store: cl.Store) -> float | None:
    """Seconds the store's automatic retention keeps; None: everything."""
    return None if store.retention is None else store.retention.keep


def test_the_writer_removes_old_events_when_it_starts(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        for i, ts in enumerate((NOW - 40 * DAY, NOW - 31 * DAY, NOW - 29 * DAY)):
            store.record(event(i, ts=ts))
        assert store.flush()
        assert kept(store) is None  # open_store keeps everything unless told
        store.set_retention("30d")
        store.record(event(9, ts=NOW))
        settle(store)
        assert [e.ts for e in store.events()] == [NOW - 29 * DAY, NOW]
        assert kept(store) == 30 * DAY and store.retention.removed == 2  # type: ignore[union-attr]


def test_open_store_takes_a_retention(tmp_path: Path) -> None:
    with cl.open_store(f"sqlite:///{tmp_path / 'e.db'}", retention="2w") as store:
        assert store.retention is not None and store.retention.keep == 14 * DAY
        store.set_retention("off")
        assert store.retention is None


def test_the_runtime_keeps_90_days_unless_configured(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.delenv("CLOSEDLOOP_RETENTION", raising=False)
    cl.reset()
    assert DEFAULT_RETENTION == "90d"
    assert cl.current_runtime().retention == 90 * DAY
    store = cl.current_runtime().store
    assert store.retention is not None and store.retention.keep == 90 * DAY
    runtime = cl.configure(store=f"sqlite:///{tmp_path / 'a.db'}", retention="12h")
    assert runtime.store.retention is not None and runtime.store.retention.keep == 12 * 3600
    runtime = cl.configure(store=f"sqlite:///{tmp_path / 'b.db'}", retention=None)
    assert runtime.store.retention is None


def test_the_environment_sets_the_runtimes_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOSEDLOOP_RETENTION", "2w")
    assert cl.reset().store.retention is not None
    assert cl.current_runtime().retention == 14 * DAY
    monkeypatch.setenv("CLOSEDLOOP_RETENTION", "off")
    assert cl.reset().store.retention is None


def test_a_misread_retention_setting_keeps_everything_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CLOSEDLOOP_RETENTION", "6m")
    with caplog.at_level(logging.ERROR, logger="closedloop"):
        assert cl.reset().retention is None
    assert "CLOSEDLOOP_RETENTION='6m' ignored, nothing is pruned" in caplog.text


def test_configure_refuses_a_bad_retention_at_once(tmp_path: Path) -> None:
    with pytest.raises(cl.ConfigError, match="not a duration like 12h, 30d or 2w"):
        cl.configure(store=f"sqlite:///{tmp_path / 'e.db'}", retention="thirty days")
    with pytest.raises(cl.ConfigError, match="more than 0"):
        cl.configure(retention=-5)


def test_a_store_handed_to_configure_gets_the_retention_given_with_it(tmp_path: Path) -> None:
    with cl.open_store(f"sqlite:///{tmp_path / 'e.db'}") as mine:
        cl.configure(store=mine)
        assert kept(mine) is None  # not given: the owner's store is left as it is
        cl.configure(store=mine, retention="30d")
        assert kept(mine) == 30 * DAY


@pytest.mark.parametrize(("text", "seconds"), [("12h", 43_200.0), ("30d", 2_592_000.0),
                                               ("2w", 1_209_600.0), ("1.5d", 129_600.0),
                                               (" 7 D ", 604_800.0)])
def test_durations_are_hours_days_or_weeks(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_each_run_removes_at_most_its_limit_and_continues_later(tmp_path: Path) -> None:
    backend = open_backend(f"sqlite:///{tmp_path / 'e.db'}")
    backend.write_batch([event(i, ts=NOW - 40 * DAY + i) for i in range(250)])
    now = [1000.0]
    policy = Retention(30 * DAY, limit=100, pause=1.0, every=3600.0, monotonic=lambda: now[0])
    try:
        policy(backend)
        assert (policy.removed, backend.count()) == (100, 150)
        policy(backend)  # a second later at the earliest: the writer writes in between
        assert policy.removed == 100
        now[0] += 1.0
        policy(backend)
        now[0] += 1.0
        policy(backend)
        assert (policy.removed, backend.count()) == (250, 0)
        backend.write_batch([event(300, ts=NOW - 40 * DAY)])
        now[0] += 3599.0
        policy(backend)  # done: the next run is an hour after the last
        assert backend.count() == 1
        now[0] += 1.0
        policy(backend)
        assert backend.count() == 0
    finally:
        backend.close()


class _Plain:
    """A backend without the maintenance port (a third party's, say)."""

    url = "plain://"

    def __init__(self) -> None:
        self.written: list[cl.StepEvent] = []

    def write_batch(self, events: Sequence[cl.StepEvent]) -> None:
        self.written.extend(events)

    def iter_events(self, query: EventQuery) -> Iterator[cl.StepEvent]:
        return iter(self.written)

    def count(self) -> int:
        return len(self.written)

    def close(self) -> None:
        pass


def test_a_store_that_cannot_prune_keeps_writing_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    backend = _Plain()
    store = cl.Store(backend, retention="30d", flush_interval=0.01)
    with caplog.at_level(logging.DEBUG, logger="closedloop.store"):
        for i in range(3):
            store.record(event(i, ts=NOW - 40 * DAY))
            settle(store)
        store.close()
    assert len(backend.written) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "retention could not prune" in warnings[0].getMessage()


def test_events_recorded_while_retention_runs_are_all_kept(shared_url: str) -> None:
    old, new = 12_000, 6_000
    backend = open_backend(shared_url)
    # old events over ten days: ten PostgreSQL partitions, many SQLite batches
    backend.write_batch([event(i, ts=NOW - 45 * DAY + i * 72.0) for i in range(old)])
    backend.close()
    policy = Retention(30 * DAY, limit=1_500, pause=0.0)
    with cl.open_store(shared_url, batch_size=500, flush_interval=0.01,
                       retention=policy) as store:
        def produce() -> None:
            for i in range(new):
                store.record(event(old + i, ts=NOW - 29 * DAY + i))

        producer = threading.Thread(target=produce)
        producer.start()
        for _ in range(1_000):  # each flush wakes the writer: one bounded retention step
            settle(store)
            if policy.removed == old and not producer.is_alive():
                break
        producer.join()
        settle(store)
        assert store.stats().not_written == 0
        assert policy.removed == old
        kept = [e.input_tokens - 100 for e in store.events()]
    assert sorted(kept) == list(range(old, old + new))


def test_spans_and_scores_are_pruned_through_the_backends_span_port(any_url: str) -> None:
    from closedloop.telemetry import Score, StoredSpan, span_store_for

    def span(trace: int, start_s: float) -> StoredSpan:
        ns = int(start_s * 1e9)
        return StoredSpan(trace_id=f"{trace:032x}", span_id=f"{trace:016x}", parent_id=None,
                          name="step", kind=0, start_ns=ns, end_ns=ns + 1000, status=0,
                          status_message=None, attributes={"closedloop.task_type": "deploy"})

    with cl.open_store(any_url) as store:
        spans = span_store_for(store)
        spans.write_spans([span(1, NOW - 3 * DAY), span(2, NOW - 2 * DAY), span(3, NOW)])
        for trace, ts in ((1, NOW - 3 * DAY), (3, NOW)):
            spans.add_score(Score(trace_id=f"{trace:032x}", name="q", value=1.0, ts=ts))
        assert prune(store, NOW - DAY, dry_run=True).spans is None  # a dry run prunes nothing
        assert len(spans.traces(limit=10).traces) == 3
        report = prune(store, NOW - DAY)
        assert report.spans == {"spans": 2, "traces": 2, "scores": 1}
        assert [t.trace_id for t in spans.traces(limit=10).traces] == [f"{3:032x}"]
        assert [s.trace_id for s in spans.scores()] == [f"{3:032x}"]
        Retention(30 * DAY, clock=lambda: NOW + 40 * DAY)(store.backend)
        assert spans.traces(limit=10).traces == []


def test_a_store_opened_late_is_pruned_once_it_opens(tmp_path: Path) -> None:
    from closedloop.store._registry import DeferredBackend, backend_factory

    url = f"sqlite:///{tmp_path / 'late' / 'e.db'}"
    (tmp_path / "late").write_text("a file where the folder should be")
    deferred = open_backend(url, defer=True)
    assert isinstance(deferred, DeferredBackend)
    now = [0.0]
    policy = Retention(30 * DAY, retry=300.0, monotonic=lambda: now[0])
    policy(deferred)  # cannot open yet: logged, tried again later
    assert policy.runs == 0
    (tmp_path / "late").unlink()
    backend_factory(url)(url, create=True).write_batch([event(0, ts=NOW - 40 * DAY)])
    now[0] += 300.0
    policy(deferred)
    assert (policy.runs, policy.removed, deferred.count()) == (1, 1, 0)


class _SlowPrune(MemoryBackend):
    """Its prune waits until told to finish, and says when it did."""

    def __init__(self, order: list[str]) -> None:
        super().__init__()
        self.order = order
        self.inside = threading.Event()
        self.finish = threading.Event()

    def prune_events(self, before: float, *, limit: int | None = None,
                     dry_run: bool = False) -> EventsPruned:
        self.inside.set()
        assert self.finish.wait(60)
        self.order.append("step ended")
        return EventsPruned(events=0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_fork_waits_for_a_retention_step_to_end() -> None:
    # a child forked while the writer thread is inside SQLite or psycopg could hang on
    # their locks; the step holds a lock that os.fork() takes first
    order: list[str] = []
    backend = _SlowPrune(order)
    step = threading.Thread(target=Retention(30 * DAY), args=(backend,))
    step.start()
    assert backend.inside.wait(60)

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        order.append("forked")
        os.waitpid(pid, 0)

    forker = threading.Thread(target=fork)
    forker.start()
    forker.join(0.5)  # time enough to fork, were it not held back
    backend.finish.set()
    step.join(60)
    forker.join(60)
    assert order == ["step ended", "forked"]
