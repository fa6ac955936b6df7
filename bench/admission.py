"""What fault control's admission costs a step, in each of its fail-closed paths.

Run: ``python bench/admission.py`` (options: ``--number``, ``--repeat``).

1. ``FaultControl.admit`` for a running task type, its ledger read cached (the hot path of
   every step).
2. The same for a halted task type (the refusal is built).
3. The same while the ledger cannot be read and the halt is known (kept in force).
4. A whole refused step through ``Loop.run`` when the ledger cannot be read and no stop is
   known (``control_unavailable``), against a whole admitted step of the same loop.

Each figure is the median over ``--repeat`` rounds of the best of five timings of
``--number`` calls, in nanoseconds (µs for whole steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import timeit
from collections.abc import Callable

import closedloop as cl
from closedloop.control import FaultControl, MemoryLedger, Stop, StopKind


class Unreadable(MemoryLedger):
    """A ledger whose reads fail once ``down`` is set."""

    down = False

    def get(self, task_type: str) -> Stop | None:
        if self.down:
            raise cl.ControlUnavailable("control state unreadable")
        return super().get(task_type)


def per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    rounds = [min(timeit.repeat(fn, number=number, repeat=5)) / number for _ in range(repeat)]
    return statistics.median(rounds)


def loop(fc: FaultControl) -> cl.Loop:
    return cl.Loop(lambda t, a: t, task_type="bench", validators=[lambda p: None],
                   executor=lambda p: p, verifiers=[lambda t, r: True], guards=[fc],
                   store=None, telemetry=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    n, r = args.number, args.repeat
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}")

    def show(label: str, fn: Callable[[], object], number: int, scale: float,
             unit: str) -> None:
        print(f"{label:34} {per_call(fn, number, r) * scale:8.2f} {unit}")

    running = FaultControl(ledger=MemoryLedger(), sinks=[], recheck=3600.0)
    running.admit("bench")
    show("admit, running (cached)", lambda: running.admit("bench"), n, 1e9, "ns")

    ledger = Unreadable()
    ledger.put(Stop(task_type="bench", kind=StopKind.HALTED, reason="bench", by="bench",
                    at=time.time()))
    halted = FaultControl(ledger=ledger, sinks=[], recheck=3600.0)
    show("admit, halted (cached)", lambda: halted.admit("bench"), n, 1e9, "ns")
    ledger.down = True
    halted.recheck = 0.0
    show("admit, halted, ledger unreadable", lambda: halted.admit("bench"), n, 1e9, "ns")

    admitted = loop(FaultControl(ledger=MemoryLedger(), sinks=[], recheck=3600.0))
    down = Unreadable()
    down.down = True
    refused = loop(FaultControl(ledger=down, sinks=[], recheck=3600.0))
    assert refused.run(0).outcome is cl.Outcome.CONTROL_UNAVAILABLE
    steps = max(1, n // 10)
    show("Loop.run, admitted step", lambda: admitted.run(1), steps, 1e6, "µs")
    show("Loop.run, refused (unavailable)", lambda: refused.run(1), steps, 1e6, "µs")

if __name__ == "__main__":
    main()
