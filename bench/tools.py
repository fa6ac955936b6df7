"""What a guarded tool call costs over calling the function bare.

Run: ``python bench/tools.py`` (options: ``--calls``, ``--rounds``).

A tool with three annotated arguments (``str``, ``int``, ``Literal``), one user validator and
one verifier, recording into a SQLite store (WAL, background writer), default fault control
on, no telemetry: ``@closedloop.tool`` against the same function plus the same validator and
verifier called bare (the baseline), timed in interleaved rounds in the same run. Two guarded
cases: outside any run, and inside a :class:`closedloop.Run` (budgets checked, the step
counted). Beside them, the same validator, function and verifier run as a plain
:class:`closedloop.Loop` step with the call's arguments as its proposal (``loop``), to show
what the tool adds to the loop's own cost. The figure is the median per-call time of the
guarded tool minus the bare one, in wall time and in the calling thread's CPU time
(``time.thread_time``: it leaves out the store's writer thread and other processes on a
shared machine, so it is the steadier of the two). The 1-minute load average is printed with
the results.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import closedloop as cl


def put(name: str, size: int = 1, kind: Literal["a", "b"] = "a") -> str:
    """Put an item in the bucket."""
    return name


def validator(call: dict[str, Any]) -> None:
    return None


def verifier(call: dict[str, Any], result: str) -> bool:
    return result == call["name"]


def bare(name: str, size: int = 1, kind: Literal["a", "b"] = "a") -> str:
    validator({"name": name, "size": size, "kind": kind})
    result = put(name, size, kind)
    verifier({"name": name}, result)
    return result


def per_call(fn: Any, calls: int, timer: Any = time.perf_counter) -> float:
    call, now = fn, timer
    start = now()
    for _ in range(calls):
        call(name="x", size=2, kind="a")
    return float(now() - start) / calls


def bench(calls: int, rounds: int, folder: Path) -> dict[str, float]:
    store = cl.open_store(folder / "tools.db", max_queue=calls * rounds * 8 + 10)
    guarded = cl.tool(validators=[validator], verifiers=[verifier], store=store)(put)
    assert guarded(name="x") == "x"
    run = cl.Run("bench", store=store)
    loop = cl.Loop(lambda call, attempt: call, task_type="loop", validators=[validator],
                   executor=lambda call: put(**call), verifiers=[verifier], store=store)

    def as_loop(**kw: Any) -> Any:
        return loop.run(kw).result

    def in_run(**kw: Any) -> Any:
        return guarded(**kw)

    kinds = ("tool", "run", "loop", "bare")
    times: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    per_call(guarded, calls)
    per_call(bare, calls)
    gc.collect()
    with run:
        for _ in range(rounds):
            times["run"].append(per_call(in_run, calls))
            times["bare"].append(per_call(bare, calls))
            cpu["run"].append(per_call(in_run, calls, time.thread_time))
            cpu["bare"].append(per_call(bare, calls, time.thread_time))
    for _ in range(rounds):
        times["tool"].append(per_call(guarded, calls))
        times["loop"].append(per_call(as_loop, calls))
        cpu["tool"].append(per_call(guarded, calls, time.thread_time))
        cpu["loop"].append(per_call(as_loop, calls, time.thread_time))
    stats = store.close()
    assert stats.not_written == 0, stats
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    cmed = {k: statistics.median(v) * 1e6 for k, v in cpu.items()}
    return {
        "bare_us_p50": med["bare"],
        "tool_us_p50": med["tool"],
        "overhead_us_p50": med["tool"] - med["bare"],
        "overhead_cpu_us_p50": cmed["tool"] - cmed["bare"],
        "in_run_overhead_us_p50": med["run"] - med["bare"],
        "in_run_overhead_cpu_us_p50": cmed["run"] - cmed["bare"],
        "loop_overhead_us_p50": med["loop"] - med["bare"],
        "loop_overhead_cpu_us_p50": cmed["loop"] - cmed["bare"],
        "tool_over_loop_cpu_us_p50": cmed["tool"] - cmed["loop"],
        "events_written": float(stats.written),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=31)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = bench(args.calls, args.rounds, Path(folder))
    print(f"load average (1 min): {os.getloadavg()[0]:.2f}")
    for key, value in result.items():
        print(f"{key:28s} {value:10.2f}")
    print(f"target ≤ 15 µs per guarded call over the bare call: "
          f"{'met' if result['overhead_us_p50'] <= 15 else 'NOT met'} in wall time, "
          f"{'met' if result['overhead_cpu_us_p50'] <= 15 else 'NOT met'} in thread CPU")


if __name__ == "__main__":
    main()
