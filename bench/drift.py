"""Drift detection through the guard: how fast, and how rarely by mistake (issue 12).

The same measurement as bench/autonomy.py (its seeded streams, warm-up, fixed-threshold
windows and counting are imported from there, not repeated), but through the drift layer's
real path: every step is a :class:`~closedloop.StepEvent` handed to
:class:`closedloop.learn.DriftGuard`'s ``observe`` with the default
:class:`~closedloop.learn.DriftPolicy` (every step signal on: verification, re-asks, latency
against its learned p95), and an alarm is a firing of any signal. The stable agent has
log-normal latency and 3 % re-asks, so the false alarms count every signal's. Then the same
drift end to end: real loops with fault control and the drift guard (action ``pause``, a
memory store), the delay being the steps until the first refused step.

    PYTHONPATH=src python bench/drift.py [--runs 2000] [--stable-runs 30] [--loop-runs 20]

It also times ``observe`` on the calling thread inline and in the background mode that
``configure(drift=...)`` builds (the detectors fed from the guard's own thread).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import closedloop as cl
from autonomy import (  # the demotion benchmark's streams and counting
    AFTER,
    BEFORE,
    CAP,
    STABLE_STEPS,
    WARMUP,
    Window,
    delay,
    false_alarms,
    quantile,
)
from closedloop.control import FaultControl, MemoryLedger
from closedloop.learn import DriftGuard, DriftPolicy


class Guarded:
    """A step's verification as an event through DriftGuard.observe; an alarm is a firing."""

    name = "DriftGuard (default DriftPolicy: every step signal)"

    def __init__(self) -> None:
        self.guard = DriftGuard(policy=DriftPolicy(), sinks=[], save_every=0)
        self.rng = random.Random(1)
        self.n = 0

    def step(self, passed: bool) -> bool:
        event = probe_event(self, passed)
        before = len(self.guard.fired)
        self.guard.observe(event)
        return len(self.guard.fired) > before


DETECTORS: list[Any] = [Guarded, lambda: Window(100, 0.93), lambda: Window(200, 0.90)]


def loop_delay(seed: int) -> int:
    """Through real loops: steps after the change until the drift guard pauses the type."""
    rng = random.Random(seed)
    seen = [0]

    def verifier(intent: object, result: object) -> bool:
        seen[0] += 1
        return rng.random() < (BEFORE if seen[0] <= WARMUP else AFTER)

    with cl.open_store("memory://", max_queue=1_000_000) as store:
        fault = FaultControl(ledger=MemoryLedger(), sinks=[], halt_after=10**9, halt_rate=1.0,
                             min_samples=10**9)
        guard = DriftGuard(policy=DriftPolicy(actions=("pause",)), fault_control=fault,
                           sinks=[], save_every=0)
        loop = cl.Loop(lambda t, a: t, task_type="provision", executor=lambda p: p,
                       verifiers=[verifier], store=store, guards=[fault, guard])
        for n in range(1, WARMUP + CAP + 1):
            if loop.run(n).outcome is cl.Outcome.PAUSED:
                return n - 1 - WARMUP
    return CAP


def observe_on_the_agents_thread(n: int = 200_000, rounds: int = 5) -> str:
    """What ``observe`` costs the calling thread, inline and in the background (what
    ``configure(drift=...)`` builds: a queue append, the detectors fed by a thread of the
    guard's own), on the same pre-built events; best of ``rounds``, wall time per call.

    The feeder is held back while the calls are timed (``feed_every`` of an hour; fed by
    ``flush`` after), so the figure is the agent's thread's own: in Python the feeder's CPU
    is still the process's, and in a CPU-bound agent it competes for the GIL (an agent
    waiting on model calls leaves it free). The feed is timed too, per step."""
    events = []
    probe = Guarded()
    for i in range(n):
        events.append(probe_event(probe, i % 50 != 0))
    out = []
    for background in (False, True):
        best = feed = float("inf")
        for _ in range(rounds):
            guard = DriftGuard(policy=DriftPolicy(), sinks=[], save_every=0,
                               background=background, max_queue=n, feed_every=3600.0)
            observe = guard.observe
            t = time.perf_counter()
            for event in events:
                observe(event)
            best = min(best, (time.perf_counter() - t) / n)
            t = time.perf_counter()
            guard.flush()
            feed = min(feed, (time.perf_counter() - t) / n)
            guard.close()
        out.append(f"{'background' if background else 'inline'} {best * 1e9:.0f} ns"
                   + (f" (+ {feed * 1e9:.0f} ns per step on the feeder)" if background else ""))
    return ("DriftGuard.observe on the agent's thread (best of "
            f"{rounds} x {n:,} pre-built events): " + ", ".join(out))


def probe_event(probe: Guarded, passed: bool) -> cl.StepEvent:
    """The event :meth:`Guarded.step` would hand the guard."""
    probe.n += 1
    rng = probe.rng
    return cl.StepEvent(
        ts=1_800_000_000.0 + probe.n * 0.01, trace_id="0" * 32, agent_id="a",
        task_type="provision", autonomy="autonomous",
        outcome="succeeded" if passed else "failed",
        attempts=2 if rng.random() < 0.03 else 1, input_tokens=0, output_tokens=0,
        latency_ms=rng.lognormvariate(6.0, 0.5), validation_passed=True,
        verification_passed=passed, error_type=None if passed else "verification",
        error_message=None, propose_ms=0.0, validate_ms=0.0, act_ms=0.0, verify_ms=0.0,
        detail=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="seeded drift runs")
    parser.add_argument("--stable-runs", type=int, default=30,
                        help="seeded stable runs of 100,000 steps each")
    parser.add_argument("--loop-runs", type=int, default=20, help="drift runs through loops")
    args = parser.parse_args()
    started = time.process_time()
    print(f"{args.runs} drift runs ({WARMUP} steps at {BEFORE:.0%}, then {AFTER:.0%}); "
          f"{args.stable_runs} stable runs of {STABLE_STEPS:,} steps at {BEFORE:.0%}:")
    print()
    print("| detector | delay median | p90 | max | false alarms per 100k steps: mean | "
          "max in a run | runs with ≤ 1 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for make in DETECTORS:
        name = make().name
        delays = [delay(make, seed)[0] for seed in range(args.runs)]
        alarms = [false_alarms(make, 10_000 + seed) for seed in range(args.stable_runs)]
        print(f"| {name} | {statistics.median(delays):.0f} | {quantile(delays, 0.9):.0f} | "
              f"{max(delays)} | {statistics.fmean(alarms):.2f} | {max(alarms)} | "
              f"{sum(a <= 1 for a in alarms)}/{len(alarms)} |", flush=True)
    print()
    t = time.process_time()
    probe = Guarded()
    n = 200_000
    for i in range(n):
        probe.step(i % 50 != 0)
    print(f"DriftGuard.observe: {(time.process_time() - t) / n * 1e6:.2f} µs CPU per step "
          f"(mean over {n:,} steps, event building included)")
    print(observe_on_the_agents_thread())
    if args.loop_runs:
        t = time.process_time()
        loops = [loop_delay(seed) for seed in range(args.loop_runs)]
        print(f"Through real loops (FaultControl + DriftGuard pausing, memory store), "
              f"{args.loop_runs} runs: delay median {statistics.median(loops):.0f}, p90 "
              f"{quantile(loops, 0.9):.0f}, max {max(loops)} steps "
              f"({time.process_time() - t:.1f} s CPU)")
    print(f"CPU time: {time.process_time() - started:.1f} s")


if __name__ == "__main__":
    main()
