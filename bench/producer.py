"""A busy producer, and SIGTERM: does every recorded event reach the store?

Run: ``python bench/producer.py`` (options: ``--rate``, ``--seconds``, ``--work-us``,
``--policies``, ``--sigterm-runs``, ``--only producer|sigterm``).

1. Busy producer: the agent runs in the main thread of the same process and never sleeps: per
   step it does ``--work-us`` microseconds of pure-Python CPU work, builds a step event and
   records it into a fresh SQLite store; between steps it keeps computing until the next
   step is due, so it holds the GIL for as long as the interpreter lets it. Paced at
   ``--rate`` steps per second for ``--seconds``. Reported per overflow policy: the steps
   the producer achieved, events dropped (counted by the store), written, the writer's
   rate, and for ``block`` how long ``record()`` waited in total and at most.
2. SIGTERM: a child process records events at ``--sigterm-rate`` per second into a store;
   after a random 0.5-1.5 s the parent sends SIGTERM. The child publishes how many events it
   recorded in a shared memory page after each ``record()``; the parent compares that with
   what reached the file. Run with closedloop's SIGTERM flush on (the default) and off
   (``CLOSEDLOOP_SIGTERM=off``, the behaviour before it existed).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import closedloop as cl


def _event(i: int, trace: str) -> cl.StepEvent:
    now = time.time()
    return cl.StepEvent(now, trace, "bench", "busy", "autonomous", "succeeded", 1, 420, 64,
                        0.05, True, True, None, None, 0.01, 0.01, 0.01, 0.01, None)


def _work(iterations: int) -> int:
    acc = 0
    for k in range(iterations):
        acc = (acc + k * k) % 1_000_003
    return acc


def _calibrate(work_us: float) -> int:
    n = 10_000
    start = time.perf_counter()
    _work(n)
    per = (time.perf_counter() - start) / n
    return max(1, round(work_us * 1e-6 / per))


def busy_producer(policy: str, rate: float, seconds: float, work_us: float,
                  folder: Path) -> dict[str, Any]:
    iterations = _calibrate(work_us)
    db = folder / f"busy-{policy}.db"
    store = cl.open_store(db, overflow=policy) if policy != "drop" else cl.open_store(db)
    record = store.record
    interval = 1.0 / rate
    steps = 0
    waited = 0.0
    longest = 0.0
    start = time.perf_counter()
    end = start + seconds
    due = start
    trace_base = random.getrandbits(64) << 64
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if now < due:
            _work(8)  # ahead of schedule: keep the CPU (and the GIL) busy, never sleep
            continue
        _work(iterations)
        event = _event(steps, f"{trace_base | steps:032x}")
        t0 = time.perf_counter()
        record(event)
        took = time.perf_counter() - t0
        if took > 0.001:
            waited += took
            longest = max(longest, took)
        steps += 1
        due += interval
    elapsed = time.perf_counter() - start
    during = store.stats()
    store.flush(60)
    stats = store.close()
    return {"policy": policy, "steps": steps, "steps_per_s": steps / elapsed,
            "written": stats.written, "dropped": stats.dropped,
            "written_during_run_per_s": during.written / elapsed,
            "record_waited_s": waited, "longest_wait_s": longest,
            "stored": sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone()[0]}


CHILD = """
import mmap, struct, sys, time, random
import closedloop as cl
path, shm, rate = sys.argv[1], sys.argv[2], float(sys.argv[3])
with open(shm, "r+b") as fh:
    page = mmap.mmap(fh.fileno(), 8)
store = cl.open_store(path)
interval, n, base = 1.0 / rate, 0, random.getrandbits(64) << 64
due = time.perf_counter()
print("ready", flush=True)
while True:
    store.record(cl.StepEvent(time.time(), f"{base | n:032x}", "child", "sigterm", "autonomous",
                              "succeeded", 1, 1, 1, 0.1, True, None, None, None,
                              0.0, 0.0, 0.0, 0.0, None))
    n += 1
    struct.pack_into("q", page, 0, n)
    due += interval
    delay = due - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
"""


def sigterm_run(flush: bool, rate: float, folder: Path, run: int) -> tuple[int, int]:
    db = folder / f"sigterm-{flush}-{run}.db"
    shm = folder / f"count-{flush}-{run}"
    shm.write_bytes(b"\0" * 8)
    env = dict(os.environ, CLOSEDLOOP_SIGTERM="on" if flush else "off")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(shm), str(rate)],
                             env=env, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    child.stdout.readline()  # "ready"
    time.sleep(random.uniform(0.5, 1.5))
    child.send_signal(signal.SIGTERM)
    child.wait(60)
    with shm.open("rb") as fh:
        recorded = struct.unpack("q", mmap.mmap(fh.fileno(), 8, access=mmap.ACCESS_READ)[:8])[0]
    stored = 0
    if db.exists():
        stored = sqlite3.connect(db).execute("SELECT count(*) FROM events").fetchone()[0]
    return recorded, stored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=40_000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--work-us", type=float, default=5.0)
    parser.add_argument("--policies", default="drop,block")
    parser.add_argument("--sigterm-runs", type=int, default=10)
    parser.add_argument("--sigterm-rate", type=float, default=2000)
    parser.add_argument("--only", choices=["producer", "sigterm"])
    args = parser.parse_args()
    print(f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}, "
          f"load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only in (None, "producer"):
            for policy in args.policies.split(","):
                r = busy_producer(policy, args.rate, args.seconds, args.work_us, folder)
                print(f"busy producer, overflow={r['policy']}: {r['steps']} steps "
                      f"({r['steps_per_s']:,.0f}/s), written {r['written']}, dropped "
                      f"{r['dropped']} ({r['dropped'] / max(1, r['steps']):.1%}), in the file "
                      f"{r['stored']}; writer {r['written_during_run_per_s']:,.0f} events/s "
                      f"during the run; record() waited {r['record_waited_s']:.2f} s in all, "
                      f"{r['longest_wait_s'] * 1000:.0f} ms at most")
        if args.only in (None, "sigterm"):
            for flush in (False, True):
                lost = []
                for run in range(args.sigterm_runs):
                    recorded, stored = sigterm_run(flush, args.sigterm_rate, folder, run)
                    lost.append(recorded - stored)
                label = "on" if flush else "off (before)"
                print(f"SIGTERM, flush {label}: events lost per stop over {args.sigterm_runs} "
                      f"runs at {args.sigterm_rate:,.0f}/s: median {statistics.median(lost)}, "
                      f"max {max(lost)}, total {sum(lost)}")


if __name__ == "__main__":
    main()
