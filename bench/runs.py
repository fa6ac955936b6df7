"""Run records or figures derived from the events: what ``closedloop runs`` reads, on SQLite.

Run: ``python bench/runs.py`` (options: ``--runs``, ``--steps``).

A store of ``--runs`` runs of ``--steps`` steps each (events carrying their ``run_id``, the
run records written by :class:`closedloop.Run`'s writer path), then, each best of 5, in CPU
time of this process and wall time:

1. a page of the 20 newest runs from the ``runs`` table (``runs_started``), against the same
   page derived from the events (``GROUP BY run_id`` over ``events_run``, every run
   grouped to find the newest);
2. the steps of one run through ``events_run``, against a scan of the events table
   (the index dropped in a copy of the file);
3. ingest: the same events recorded into a fresh store through ``Store.record`` until
   ``flush()``, with the partial index and with it dropped, interleaved, medians.

The 1-minute load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import closedloop as cl
from closedloop.runs import RunRecord
from closedloop.store import EventQuery


def events_of(runs: int, steps: int, t0: float) -> list[cl.StepEvent]:
    template = cl.StepEvent(
        ts=t0, trace_id="0" * 32, agent_id="bench", task_type="tool", autonomy="autonomous",
        outcome="succeeded", attempts=1, input_tokens=500, output_tokens=80, latency_ms=1.0,
        validation_passed=True, verification_passed=True, error_type=None, error_message=None,
        propose_ms=0.1, validate_ms=0.1, act_ms=0.5, verify_ms=0.2, detail=None)
    out = []
    for r in range(runs):
        run_id = f"{r:032x}"
        for s in range(steps):
            out.append(template._replace(ts=t0 + r + s * 1e-3, trace_id=f"{r:016x}{s:016x}",
                                         step_id=f"{r:020x}{s:012x}", run_id=run_id))
    return out


def best(fn: Callable[[], Any], n: int = 5) -> tuple[float, float]:
    """(wall ms, process CPU ms), best of ``n``."""
    walls, cpus = [], []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        fn()
        cpus.append(time.process_time() - c)
        walls.append(time.perf_counter() - w)
    return min(walls) * 1e3, min(cpus) * 1e3


DERIVED = ("SELECT run_id, min(ts) AS started, max(ts), count(*), sum(input_tokens), "
           "sum(output_tokens), sum(cost_usd) FROM events WHERE run_id IS NOT NULL "
           "GROUP BY run_id ORDER BY started DESC LIMIT 20")


def ingest(batch: list[cl.StepEvent], path: Path, index: bool) -> float:
    cl.open_store(path).close()
    if not index:
        conn = sqlite3.connect(path)
        conn.execute("DROP INDEX events_run")
        conn.close()
    store = cl.open_store(path, max_queue=len(batch) + 1)
    start = time.perf_counter()
    for e in batch:
        store.record(e)
    assert store.flush(timeout=600)
    elapsed = time.perf_counter() - start
    store.close()
    return len(batch) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    t0 = time.time() - args.runs - 10
    batch = events_of(args.runs, args.steps, t0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = folder / "runs.db"
        store = cl.open_store(path, max_queue=len(batch) + 1)
        for e in batch:
            store.record(e)
        store.runs().put_runs([RunRecord(run_id=f"{r:032x}", name="bench", started=t0 + r,
                                         ended=t0 + r + 1, outcome="succeeded",
                                         steps=args.steps, input_tokens=500 * args.steps,
                                         output_tokens=80 * args.steps)
                               for r in range(args.runs)])
        assert store.flush(timeout=600)
        page_record = best(lambda: store.runs().list_runs(limit=20))
        conn = sqlite3.connect(path)
        page_derived = best(lambda: conn.execute(DERIVED).fetchall())
        one = f"{args.runs // 2:032x}"
        steps_index = best(lambda: list(store.backend.iter_events(EventQuery(run_id=one))))
        conn.close()
        store.close()
        noindex = folder / "noindex.db"
        shutil.copy(path, noindex)
        c2 = sqlite3.connect(noindex)
        c2.execute("DROP INDEX events_run")
        c2.commit()
        steps_scan = best(lambda: c2.execute(
            "SELECT * FROM events WHERE run_id = ? ORDER BY ts", (one,)).fetchall())
        c2.close()
        with_index, without = [], []
        for i in range(args.rounds):
            with_index.append(ingest(batch, folder / f"in{i}.db", True))
            without.append(ingest(batch, folder / f"out{i}.db", False))
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}; {len(batch):,} events in "
          f"{args.runs:,} runs")
    print(f"runs list page (20 newest), runs table:        {page_record[0]:9.2f} ms wall "
          f"{page_record[1]:9.2f} ms CPU")
    print(f"runs list page (20 newest), derived from events:{page_derived[0]:8.2f} ms wall "
          f"{page_derived[1]:9.2f} ms CPU")
    print(f"one run's steps, events_run:             {steps_index[0]:9.2f} ms wall "
          f"{steps_index[1]:9.2f} ms CPU")
    print(f"one run's steps, table scan:                   {steps_scan[0]:9.2f} ms wall "
          f"{steps_scan[1]:9.2f} ms CPU")
    print(f"ingest with events_run: {statistics.median(with_index):,.0f} events/s; "
          f"without: {statistics.median(without):,.0f} events/s (medians of {args.rounds})")


if __name__ == "__main__":
    main()
