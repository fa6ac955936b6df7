"""Halting a run from elsewhere: what the check costs each step, and how soon a halt is seen.

Run: ``PYTHONPATH=src python bench/run_halts.py [--rounds 7] [--steps 200000] [--trials 20]
[--pg URL]``.

1. The check on the agent's path: :meth:`closedloop.Run.admit` (what the loop calls once per
   step) timed with ``halt_poll=None`` (no remote halts) and with the default ``halt_poll``
   (the store's halts polled by a thread; each admission compares the time of its last
   good read with a monotonic clock), in alternating rounds; best and median per call.
2. How soon a halt is seen: a run on a SQLite store (and a PostgreSQL schema of its own, with
   ``--pg``) polls with the default ``halt_poll`` (0.25 s); a halt is recorded with
   :func:`closedloop.runs.halt_run` at a random moment, and the time until the run refuses
   steps is measured (``--trials`` runs). The bound: one poll interval plus one read.

The 1-minute load average is printed with the results.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import closedloop as cl
from closedloop.runs import halt_run


def admit_cost(store: cl.Store, poll: float | None, steps: int) -> float:
    """Seconds per Run.admit call, in a fresh run."""
    with cl.Run("bench", store=store, halt_poll=poll, halt_stale=3600.0) as run:
        admit = run.admit
        t = time.perf_counter()
        for _ in range(steps):
            admit("t")
        return (time.perf_counter() - t) / steps


def seen_after(store: cl.Store, rng: random.Random) -> float:
    """Seconds from a recorded halt to the run refusing steps."""
    with cl.Run("bench", store=store) as run:
        store.flush()
        time.sleep(rng.uniform(0.0, 0.3))
        halt_run(run.run_id, reason="bench", by="bench", store=store)
        t = time.perf_counter()
        while run.stopped is None:
            time.sleep(0.0005)
        return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200_000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--pg", help="a PostgreSQL URL (a schema of its own is made and "
                                     "dropped)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = cl.open_store(f"sqlite:///{Path(tmp) / 'events.db'}")
        off: list[float] = []
        on: list[float] = []
        for _ in range(args.rounds):
            off.append(admit_cost(store, None, args.steps))
            on.append(admit_cost(store, 0.25, args.steps))
        print(f"Run.admit per step, {args.rounds} alternating rounds of {args.steps:,}:")
        print(f"  no remote halts   best {min(off) * 1e9:.0f} ns, median "
              f"{statistics.median(off) * 1e9:.0f} ns")
        print(f"  halt_poll=0.25 s  best {min(on) * 1e9:.0f} ns, median "
              f"{statistics.median(on) * 1e9:.0f} ns")
        print(f"  the check: {(min(on) - min(off)) * 1e9:+.0f} ns (best), "
              f"{(statistics.median(on) - statistics.median(off)) * 1e9:+.0f} ns (median)")
        targets = [("SQLite", store)]
        pg = None
        if args.pg:
            schema = f"bench_halts_{uuid.uuid4().hex[:10]}"
            pg = cl.open_store(f"{args.pg}?schema={schema}")
            targets.append(("PostgreSQL", pg))
        rng = random.Random(1)
        for name, target in targets:
            delays = [seen_after(target, rng) for _ in range(args.trials)]
            print(f"{name}: a halt seen after median {statistics.median(delays) * 1e3:.0f} ms, "
                  f"max {max(delays) * 1e3:.0f} ms ({args.trials} trials; poll 250 ms)")
        store.close()
        if pg is not None:
            pg.close()
            import psycopg

            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
