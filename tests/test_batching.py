"""The shared batch queue: overflow policies, drop counts, and flushing on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from closedloop._batching import BatchQueue, install_sigterm_flush


class StuckWriter:
    """A real write function that holds its first batch until ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.written: list[int] = []

    def __call__(self, batch: list[int]) -> None:
        self.entered.set()
        self.gate.wait()
        self.written.extend(batch)


def stuck_queue(max_queue: int, **kwargs: object) -> tuple[BatchQueue[int], StuckWriter]:
    """A queue whose writer is inside ``write`` with item 0, so the queue itself is empty."""
    writer = StuckWriter()
    queue: BatchQueue[int] = BatchQueue(writer, name="test", max_queue=max_queue,
                                        batch_size=1000, flush_interval=60.0,
                                        **kwargs)  # type: ignore[arg-type]
    assert queue.submit(0)
    queue.flush(0)  # wakes the writer at once
    assert writer.entered.wait(10)
    return queue, writer


def test_a_refused_batch_counts_every_item_it_held() -> None:
    queue, writer = stuck_queue(max_queue=5)
    assert queue.submit_many([1, 2, 3, 4])
    assert queue.submit_many([5, 6, 7]) is False  # only one more would fit
    assert queue.dropped == 3
    assert queue.submit(5)
    assert queue.submit_many([6, 7]) is False
    assert queue.dropped == 5
    writer.gate.set()
    assert queue.close()
    assert sorted(writer.written) == [0, 1, 2, 3, 4, 5]


def test_the_drop_policy_refuses_at_once_when_full() -> None:
    queue, writer = stuck_queue(max_queue=3)
    assert [queue.submit(i) for i in range(1, 6)] == [True, True, True, False, False]
    assert queue.dropped == 2
    writer.gate.set()
    queue.close()


def test_the_block_policy_waits_for_room_instead_of_dropping() -> None:
    queue, writer = stuck_queue(max_queue=10, overflow="block", block_timeout=60.0)
    done = threading.Event()
    results: list[bool] = []

    def produce() -> None:
        results.extend(queue.submit(i) for i in range(1, 31))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    # 30 items cannot fit in 10 places while the writer is stuck: the producer must wait
    assert not done.wait(0.2)
    assert queue.dropped == 0
    writer.gate.set()
    producer.join(60)
    assert results == [True] * 30 and queue.dropped == 0
    assert queue.close()
    assert sorted(writer.written) == list(range(31))


def test_the_block_policy_drops_after_its_timeout() -> None:
    queue, writer = stuck_queue(max_queue=2, overflow="block", block_timeout=0.01)
    assert [queue.submit(i) for i in (1, 2, 3)] == [True, True, False]
    assert queue.submit_many([4, 5]) is False
    assert queue.dropped == 3
    writer.gate.set()
    queue.close()


def test_an_unknown_overflow_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="overflow"):
        BatchQueue(lambda b: None, name="x", max_queue=1, batch_size=1, flush_interval=1,
                   overflow="wait")  # type: ignore[arg-type]


def test_sigterm_handling_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOSEDLOOP_SIGTERM", "off")
    assert install_sigterm_flush() is False


# -- SIGTERM in a real process ------------------------------------------------------------

RECORDER = """
import os, signal, sys, time
import closedloop as cl
from closedloop.telemetry import StoreExporter, Telemetry, set_default_telemetry
{before}
store = cl.open_store(sys.argv[1], flush_interval=60)  # nothing is written by the timer
set_default_telemetry(Telemetry([StoreExporter(store)], flush_interval=60))
loop = cl.Loop(lambda t, a: t, task_type="sigterm", store=store, guards=())
for i in range(500):
    loop.run(i)
print("ready", flush=True)
time.sleep(60)
print("not stopped", flush=True)
"""


def run_until_sigterm(db: Path, before: str = "") -> subprocess.CompletedProcess[str]:
    code = RECORDER.format(before=textwrap.dedent(before))
    child = subprocess.Popen([sys.executable, "-c", code, str(db)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=60)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def stored(db: Path, table: str) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def test_sigterm_writes_pending_events_and_spans_then_ends_the_process(tmp_path: Path) -> None:
    db = tmp_path / "term.db"
    done = run_until_sigterm(db)
    assert done.returncode == -signal.SIGTERM  # ended by the signal, as it would have been
    assert "not stopped" not in done.stdout
    assert stored(db, "events") == 500
    assert stored(db, "spans") >= 500  # at least one span per step


def test_sigterm_calls_the_users_own_handler_after_the_flush(tmp_path: Path) -> None:
    db = tmp_path / "chained.db"
    done = run_until_sigterm(db, before="""
        import sqlite3
        def on_term(signum, frame):
            rows = sqlite3.connect(sys.argv[1]).execute("SELECT count(*) FROM events")
            print(f"user handler saw {rows.fetchone()[0]} events", flush=True)
            sys.exit(3)
        signal.signal(signal.SIGTERM, on_term)
    """)
    assert "user handler saw 500 events" in done.stdout
    assert done.returncode == 3
    assert stored(db, "events") == 500


def test_a_process_that_ignores_sigterm_keeps_ignoring_it(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import signal, sys
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        import closedloop as cl
        store = cl.open_store(sys.argv[1])
        store.record  # a queue exists: closedloop had its chance to install a handler
        print(signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "i.db")], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "True"


def test_sigterm_gives_up_on_a_stuck_writer_after_its_deadline(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys, threading, time
        import closedloop as cl
        from closedloop.store import MemoryBackend, Store

        class Stuck(MemoryBackend):
            def write_batch(self, events):
                threading.Event().wait()  # a backend that never returns

        store = Store(Stuck(), flush_interval=60)
        store.record(cl.StepEvent(1.0, "0" * 32, "a", "t", "autonomous", "succeeded", 1, 1, 1,
                                  1.0, True, None, None, None, 0.0, 0.0, 0.0, 0.0, None))
        print("ready", flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "CLOSEDLOOP_SIGTERM_TIMEOUT": "0.5"})
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)  # a handler without a deadline would hang here
    assert child.returncode == -signal.SIGTERM
    assert "not all written within 0.5s" in err
