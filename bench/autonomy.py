"""Demotion by change detection: how fast, and how rarely by mistake (issue 11, "Proof").

An autonomous agent's verification pass rate drifts from 98 % to 85 % mid-run. Measured, over
many seeded runs, on virtual time (no sleeping):

- **delay**: steps after the change until the detector alarms (target: ≤ 200);
- **false alarms** on a stable 98 % agent over 100,000 steps (target: ≤ 1),

for the Bernoulli CUSUM that demotes (closedloop.autonomy.AutonomyPolicy's defaults: in control
at 98 %, tuned for 90 %, in-control average run length 1,000,000 steps) and, in the same run,
for fixed-threshold alerts on a rolling window's pass rate. Then the same drift end to end:
real loops, an in-memory store, AutonomyLevels and its monitor, until the step runs at approve.

    PYTHONPATH=src python bench/autonomy.py [--runs 2000] [--stable-runs 30] [--loop-runs 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import closedloop as cl
from closedloop.autonomy import AutonomyLevels, AutonomyPolicy

BEFORE, AFTER = 0.98, 0.85
WARMUP = 2000
"""Stable steps before the change: the detector meets the drift in a realistic state, not
fresh from zero (and a false alarm during them restarts the run's warm-up)."""
CAP = 20_000
STABLE_STEPS = 100_000


class Cusum:
    """The demotion detector, as the monitor runs it."""

    name = "Bernoulli CUSUM (demotion)"

    def __init__(self) -> None:
        self.detector = AutonomyPolicy().detector()
        self.state = self.detector.initial()

    def step(self, passed: bool) -> bool:
        found = self.detector.update(self.state, not passed)
        self.state = found.state
        return bool(found.alarm)


class Window:
    """Alarm when the pass rate over the last ``size`` steps (a full window) is below
    ``threshold``; the window starts again after an alarm."""

    def __init__(self, size: int, threshold: float) -> None:
        self.size, self.threshold = size, threshold
        self.name = f"fixed threshold: pass rate over {size} steps < {threshold:.0%}"
        self.seen: deque[bool] = deque()
        self.failures = 0
        self.limit = size - threshold * size  # alarm when failures exceed this

    def step(self, passed: bool) -> bool:
        self.seen.append(passed)
        self.failures += not passed
        if len(self.seen) > self.size:
            self.failures -= not self.seen.popleft()
        if len(self.seen) == self.size and self.failures > self.limit + 1e-9:
            self.seen.clear()
            self.failures = 0
            return True
        return False


DETECTORS: list[Callable[[], Any]] = [Cusum, lambda: Window(100, 0.93),
                                      lambda: Window(200, 0.90)]


def delay(make: Callable[[], Any], seed: int) -> tuple[int, int]:
    """(steps after the change until the alarm, false alarms during the warm-up)."""
    rng = random.Random(seed)
    detector = make()
    false = 0
    for _ in range(WARMUP):
        if detector.step(rng.random() < BEFORE):
            false += 1
    for n in range(1, CAP + 1):
        if detector.step(rng.random() < AFTER):
            return n, false
    return CAP, false


def false_alarms(make: Callable[[], Any], seed: int) -> int:
    rng = random.Random(seed)
    detector = make()
    return sum(detector.step(rng.random() < BEFORE) for _ in range(STABLE_STEPS))


def quantile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def loop_delay(seed: int) -> int:
    """The same drift through real loops: steps after the change until a step is gated."""
    rng = random.Random(seed)
    seen = [0]

    def verifier(intent: object, result: object) -> bool:
        seen[0] += 1
        return rng.random() < (BEFORE if seen[0] <= WARMUP else AFTER)

    with cl.open_store("memory://", max_queue=1_000_000) as store:
        levels = AutonomyLevels(store, sinks=[], cache_s=1e9)
        loop = cl.Loop(lambda t, a: t, task_type="provision", executor=lambda p: p,
                       verifiers=[verifier], store=store, levels=levels,
                       guards=[levels.monitor()])
        for n in range(1, WARMUP + CAP + 1):
            if loop.run(n).outcome is cl.Outcome.AWAITING_APPROVAL:
                return n - 1 - WARMUP
    return CAP


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2000, help="seeded drift runs")
    parser.add_argument("--stable-runs", type=int, default=30,
                        help="seeded stable runs of 100,000 steps each")
    parser.add_argument("--loop-runs", type=int, default=20, help="drift runs through loops")
    args = parser.parse_args()
    started = time.process_time()
    cusum = Cusum().detector
    print(f"Demotion detector: {cusum.to_dict()}")
    print(f"  exact average run length from zero: {cusum.arl(1 - BEFORE):,.0f} steps at "
          f"{BEFORE:.0%} (between false alarms), {cusum.arl(1 - AFTER):.1f} steps at "
          f"{AFTER:.0%}")
    print()
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
              f"{sum(a <= 1 for a in alarms)}/{len(alarms)} |")
    print()
    if args.loop_runs:
        t = time.process_time()
        loops = [loop_delay(seed) for seed in range(args.loop_runs)]
        print(f"Through real loops (AutonomyLevels + its monitor, memory store), "
              f"{args.loop_runs} runs: delay median {statistics.median(loops):.0f}, p90 "
              f"{quantile(loops, 0.9):.0f}, max {max(loops)} steps "
              f"({time.process_time() - t:.1f} s CPU)")
    print(f"CPU time: {time.process_time() - started:.1f} s")


if __name__ == "__main__":
    main()
