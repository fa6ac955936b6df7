"""The embedded store: batching, flush and close, migrations, overflow, failures, processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

import closedloop as cl
from closedloop.store import SCHEMA_VERSION, EventQuery, MemoryBackend, SQLiteBackend, Store


def make_event(i: int, task_type: str = "t", ts: float | None = None) -> cl.StepEvent:
    return cl.StepEvent(
        ts=float(i) if ts is None else ts, trace_id=f"{i:032x}", agent_id="a",
        task_type=task_type, autonomy="autonomous", outcome="succeeded", attempts=1,
        input_tokens=i, output_tokens=1, latency_ms=1.5, validation_passed=True,
        verification_passed=None, error_type=None, error_message=None, propose_ms=0.1,
        validate_ms=0.2, act_ms=0.3, verify_ms=0.4,
        detail={"attempts": [{"attempt": 1}]} if i % 2 else None,
    )


class CountingBackend(MemoryBackend):
    """A real in-memory backend that remembers the size of every batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def write_batch(self, events: Sequence[cl.StepEvent]) -> None:
        self.entered.set()
        self.gate.wait()
        self.batches.append(len(events))
        super().write_batch(events)


class FailingBackend(MemoryBackend):
    """Refuses the first ``failures`` writes, like a disk that is full for a moment."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def write_batch(self, events: Sequence[cl.StepEvent]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("No space left on device")
        super().write_batch(events)


def test_events_round_trip_through_sqlite(store: Store) -> None:
    for i in range(10):
        store.record(make_event(i))
    assert store.flush()
    back = list(store.events())
    assert back == [make_event(i) for i in range(10)]


def test_every_detail_round_trips_even_an_empty_one(store: Store) -> None:
    events = [make_event(0)._replace(detail={}), make_event(1)._replace(detail=None),
              make_event(2)._replace(detail={"issues": [{"code": "x", "path": "a.b"}]})]
    for e in events:
        store.record(e)
        assert store.flush()  # one batch each: a batch whose only detail is empty, too
    assert list(store.events()) == events


def test_a_batch_larger_than_one_insert_statement_is_written_whole(store: Store) -> None:
    events = [make_event(i) for i in range(2 * 1024 + 3)]  # two full statements and a rest
    store._writer._queue.batch_size = len(events)
    for e in events:
        store.record(e)
    assert store.flush()
    assert list(store.events()) == events


def test_writes_are_batched(tmp_path: Path) -> None:
    backend = CountingBackend()
    backend.gate.clear()  # hold the writer so that events pile up into full batches
    store = Store(backend, batch_size=100, flush_interval=60)
    for i in range(1000):
        assert store.record(make_event(i))
    backend.gate.set()
    assert store.flush()
    assert backend.count() == 1000
    assert max(backend.batches) == 100 and len(backend.batches) <= 11
    store.close()


def test_record_never_waits_for_the_backend() -> None:
    backend = CountingBackend()
    backend.gate.clear()  # the backend is stuck: recording must still return at once
    store = Store(backend, max_queue=50, batch_size=10, flush_interval=60)
    assert store.record(make_event(0))
    store.flush(0)  # wake the writer now
    assert backend.entered.wait(10)  # the writer is stuck inside the backend with event 0
    accepted = [store.record(make_event(i)) for i in range(1, 201)]
    # bounded queue: exactly 50 wait for the writer, the rest is refused and counted
    assert accepted == [True] * 50 + [False] * 150
    assert store.stats().dropped == 150 and store.stats().queued == 50
    backend.gate.set()
    final = store.close()
    assert final.written == 51 and final.dropped == 150 and final.not_written == 150
    assert backend.count() == 51


def test_close_flushes_everything_queued(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    store = cl.open_store(url, flush_interval=60)
    for i in range(5000):
        store.record(make_event(i))
    stats = store.close()
    assert stats.written == 5000 and stats.not_written == 0
    assert SQLiteBackend(tmp_path / "e.db").count() == 5000


def test_record_after_close_is_counted_not_lost_silently(memory_store: Store) -> None:
    memory_store.close()
    assert memory_store.record(make_event(1)) is False
    assert memory_store.stats().dropped == 1


def test_events_are_flushed_at_interpreter_exit(tmp_path: Path) -> None:
    db = tmp_path / "exit.db"
    code = textwrap.dedent(f"""
        import closedloop as cl
        store = cl.open_store({str(db)!r}, flush_interval=60)
        loop = cl.Loop(lambda t, a: t, task_type="exit", store=store)
        for i in range(300):
            loop.run(i)
        # no close(), no flush(): the atexit hook must write them
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert SQLiteBackend(db).count() == 300


def test_refused_events_are_held_and_written_when_the_backend_recovers() -> None:
    backend = FailingBackend(failures=3)
    store = Store(backend, flush_interval=60)
    store._writer.retry_delays = (60.0,)  # only flushes retry, so the count is exact
    for i in range(10):
        store.record(make_event(i))
    assert store.flush() is False  # refused: held in memory, not written, not dropped
    assert store.stats().held == 10 and store.stats().not_written == 0
    store.record(make_event(10))
    assert store.flush() is False  # still refused: the new event joins the held ones
    assert store.flush() is True  # accepted: everything is written, oldest first
    stats = store.close()
    assert [e.input_tokens for e in backend.iter_events(EventQuery())] == list(range(11))
    assert stats.written == 11 and stats.write_errors == 3 and stats.held == 0
    assert stats.not_written == 0


def test_held_events_go_to_the_dead_letter_file_at_the_end(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    store = Store(FailingBackend(failures=100), dead_letter=dead, flush_interval=60)
    for i in range(7):
        store.record(make_event(i))
    stats = store.close()
    assert stats.dead_lettered == 7 and stats.written == 0 and stats.lost == 0
    assert stats.held == 0
    lines = [json.loads(line) for line in dead.read_text().splitlines()]
    assert [line["input_tokens"] for line in lines] == list(range(7))


def test_held_events_are_bounded_and_the_oldest_are_dead_lettered(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    store = Store(FailingBackend(failures=100), dead_letter=dead, flush_interval=60,
                  max_held=4, batch_size=3)
    for i in range(10):
        store.record(make_event(i))
    store.flush()
    stats = store.stats()
    assert stats.held == 4 and stats.dead_lettered == 6 and stats.not_written == 6
    assert [json.loads(line)["input_tokens"] for line in dead.read_text().splitlines()] == \
        list(range(6))
    store.close()


def test_without_a_dead_letter_file_what_cannot_be_held_is_counted_lost() -> None:
    store = Store(FailingBackend(failures=100), flush_interval=60, max_held=2)
    for i in range(5):
        store.record(make_event(i))
    store.flush()
    assert store.stats().lost == 3
    assert store.close().lost == 5


class RefusingBackend(MemoryBackend):
    """Refuses any batch holding an event of task type ``bad``, like a constraint would."""

    def write_batch(self, events: Sequence[cl.StepEvent]) -> None:
        if any(e.task_type == "bad" for e in events):
            raise sqlite3.IntegrityError("NOT NULL constraint failed: events.agent_id")
        super().write_batch(events)


def test_a_batch_refused_for_its_content_is_dead_lettered_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = tmp_path / "dead.jsonl"
    backend = RefusingBackend()
    store = Store(backend, dead_letter=dead, flush_interval=60)
    store.record(make_event(1, task_type="bad"))
    store.flush()
    # not an outage of the store: no holding, no "cannot write" alarm, just this batch
    assert "was refused: NOT NULL constraint failed" in caplog.text
    assert "cannot write events" not in caplog.text
    store.record(make_event(2))
    assert store.flush()  # no outage: the next batch is written at once
    stats = store.close()
    assert stats.dead_lettered == 1 and stats.written == 1 and stats.held == 0
    assert backend.count() == 1


def test_migrates_an_empty_file(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    db.touch()  # an existing, empty file is a valid, empty SQLite database
    SQLiteBackend(db)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
    assert tuple(columns) == (*cl.StepEvent._fields, "error_group")  # derived by the writer


def test_reopening_keeps_events_and_does_not_migrate_again(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'again.db'}"
    with cl.open_store(url) as first:
        first.record(make_event(1))
    with cl.open_store(url) as second:
        second.record(make_event(2))
        assert second.flush()
        assert [e.trace_id for e in second.events()] == [f"{1:032x}", f"{2:032x}"]


def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "future.db"
    sqlite3.connect(db).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(cl.StoreError, match="newer than this closedloop"):
        SQLiteBackend(db)


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    bad = tmp_path / "notes.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(cl.StoreError, match=r"notes\.db"):
        cl.open_store(bad)


def test_an_unwritable_path_is_a_store_error() -> None:
    # /proc refuses new files even to root, so this holds wherever the suite runs
    with pytest.raises(cl.StoreError, match=r"cannot open store sqlite:////proc/self/e\.db"):
        cl.open_store("/proc/self/e.db")


def test_a_path_under_a_file_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(cl.StoreError, match="cannot open store"):
        cl.open_store(f"sqlite:///{tmp_path / 'file' / 'e.db'}")


@pytest.mark.parametrize(
    ("url", "message"),
    [("", "empty"),
     ("mysql://localhost/x", "unsupported .* schemes: memory, postgres, postgresql, sqlite"),
     ("sqlite:///", "no path"), ("sqlite://relative.db", "unsupported")],
)
def test_bad_store_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(cl.ConfigError, match=message):
        cl.open_store(url)


def test_url_forms_resolve_to_the_same_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with cl.open_store("sqlite:///rel.db") as s:
        assert s.url == "sqlite:///rel.db"
    with cl.open_store(f"sqlite:///{tmp_path}/abs.db") as s:
        assert s.url == f"sqlite:///{tmp_path}/abs.db"
    assert (tmp_path / "rel.db").exists() and (tmp_path / "abs.db").exists()


def test_query_filters_by_time_and_task_type(store: Store) -> None:
    for i in range(10):
        store.record(make_event(i, task_type="a" if i % 2 else "b", ts=1000.0 + i))
    assert store.flush()
    assert [e.ts for e in store.events(since=1005.0)] == [1005.0, 1006.0, 1007.0, 1008.0, 1009.0]
    assert [e.ts for e in store.events(task_type="a", until=1005.0)] == [1001.0, 1003.0]
    assert len(list(store.events(limit=3))) == 3
    memory = MemoryBackend()
    memory.write_batch([make_event(i, ts=1000.0 + i) for i in range(10)])
    assert [e.ts for e in memory.iter_events(EventQuery(since=1008.0))] == [1008.0, 1009.0]


def _write_from_process(url: str, worker: int, n: int) -> None:
    store = cl.open_store(url, batch_size=50, flush_interval=0.01)
    loop = cl.Loop(lambda t, a: t, task_type=f"worker-{worker}", store=store)
    for i in range(n):
        loop.run(i)
    store.close()


def test_two_processes_write_the_same_file_without_losing_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_write_from_process, args=(url, w, 2000)) for w in range(2)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
        assert p.exitcode == 0
    with cl.open_store(url) as s:
        per_worker: dict[str, int] = {}
        for e in s.events():
            per_worker[e.task_type] = per_worker.get(e.task_type, 0) + 1
    assert per_worker == {"worker-0": 2000, "worker-1": 2000}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_writes_its_own_events_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fork.db'}"
    store = cl.open_store(url, flush_interval=60)
    store.record(make_event(1))  # queued in the parent; the child must not write it again
    ctx = multiprocessing.get_context("fork")
    child = ctx.Process(target=_child_records, args=(store,))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    store.close()
    with cl.open_store(url) as s:
        assert sorted(e.input_tokens for e in s.events()) == [1, 2]


def _child_records(store: Store) -> None:
    store.record(make_event(2))
    store.close()


@pytest.fixture
def many_events() -> list[cl.StepEvent]:
    return [make_event(i) for i in range(20_000)]


def test_sustained_ingest_keeps_every_event(store: Store, many_events: list[cl.StepEvent]) -> None:
    for e in many_events:
        store.record(e)
    stats = store.close()
    assert stats.written == len(many_events) and stats.not_written == 0


def test_held_events_are_exposed_as_a_metric() -> None:
    from prometheus_client import CollectorRegistry

    from closedloop.telemetry import Metrics

    registry = CollectorRegistry()
    store = Store(FailingBackend(failures=100), flush_interval=60)
    Metrics(registry).watch(store=store)
    for i in range(3):
        store.record(make_event(i))
    store.flush()
    assert registry.get_sample_value("closedloop_store_events_held") == 3
    store.close()


def test_a_batch_of_any_size_is_written_with_the_same_few_statements() -> None:
    from closedloop.store.sqlite._backend import _ROWS, statement_sizes

    assert statement_sizes(300) == [256, 32, 8, 4]
    assert statement_sizes(0) == []
    seen: set[int] = set()
    for n in range(1, 3 * _ROWS + 2):
        sizes = statement_sizes(n)
        assert sum(sizes) == n and sizes == sorted(sizes, reverse=True)
        seen.update(sizes)
    assert seen == {1 << k for k in range(_ROWS.bit_length())}  # powers of two up to _ROWS


def test_batches_of_odd_sizes_are_written_whole_and_in_order(store: Store) -> None:
    from closedloop.store.sqlite._backend import _INSERTS, _ROWS

    events = [make_event(i) for i in range(600)]
    at = 0
    for size in (1, 255, 257, 3, 84):  # each one batch: every statement size, and a rest
        for e in events[at:at + size]:
            store.record(e)
        assert store.flush()
        at += size
    assert list(store.events()) == events
    # only statements of the few fixed sizes were made (each prepared once per connection)
    used = {rows for insert in _INSERTS.values() for rows in insert.texts}
    assert used <= {1 << k for k in range(_ROWS.bit_length())}
    assert {1, 2, 4, 16, 64, 128, 256} <= used  # 255, 257, 84 and 3 made of them
