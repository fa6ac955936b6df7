"""The loop's own cost per step, and sustained ingest into the embedded store.

Run: ``python bench/overhead.py`` (options: ``--steps``, ``--rounds``, ``--events``,
``--parts``).

1. Loop overhead: a trivial agent, one validator, an executor and one verifier, recording on
   into a SQLite store (WAL, background writer), against the same four calls made bare. Both
   are timed in interleaved rounds in the same run; the figure is the median per-step time of
   the loop minus the median per-step time of the bare calls. Beside wall time, the CPU time
   of the stepping thread alone (``time.thread_time``) is reported: it leaves out the store's
   writer thread and other processes on a shared machine, so it is the steadier figure to
   compare two versions of the loop with (wall time includes what the writer takes of the GIL).
2. With ``--parts``: what the pieces of a step's path cost alone (``timeit``, best of 7), to
   see where the overhead goes.
3. Ingest: pre-built events recorded into a fresh SQLite store as fast as the producer can,
   timed until ``flush()`` returns (every event durable in the file), in events per second.
   The events leave the optional fields of schema v3 empty, as before; with
   ``--loop-events`` they are shaped as a loop records them (a step id, a proposal of ~40
   characters and its digest, each proposal distinct: the writer redacts every one).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import closedloop as cl


def agent(task: int, attempt: cl.Attempt) -> int:
    return task


def validator(proposal: int) -> None:
    return None


def executor(proposal: int) -> int:
    return proposal


def verifier(intent: int, result: int) -> bool:
    return result == intent


def bare(task: int) -> int:
    proposal = agent(task, None)  # type: ignore[arg-type]
    validator(proposal)
    result = executor(proposal)
    verifier(task, result)
    return result


def per_step(fn: object, steps: int, timer: object = time.perf_counter) -> float:
    call, now = fn, timer  # locals for speed
    start = now()  # type: ignore[operator]
    for i in range(steps):
        call(i)  # type: ignore[operator]
    return (now() - start) / steps  # type: ignore[operator]


def bench_overhead(steps: int, rounds: int, folder: Path) -> dict[str, float]:
    store = cl.open_store(folder / "overhead.db")
    loop = cl.Loop(agent, task_type="bench", validators=[validator], executor=executor,
                   verifiers=[verifier], store=store)
    per_step(loop.run, steps)  # warm up
    per_step(bare, steps)
    loop_times: list[float] = []
    bare_times: list[float] = []
    loop_cpu: list[float] = []
    bare_cpu: list[float] = []
    gc.collect()
    for _ in range(rounds):
        loop_times.append(per_step(loop.run, steps))
        bare_times.append(per_step(bare, steps))
        loop_cpu.append(per_step(loop.run, steps, time.thread_time))
        bare_cpu.append(per_step(bare, steps, time.thread_time))
    stats = store.close()
    assert stats.not_written == 0, stats
    loop_med = statistics.median(loop_times) * 1e6
    bare_med = statistics.median(bare_times) * 1e6
    return {
        "loop_step_us_p50": loop_med,
        "bare_step_us_p50": bare_med,
        "overhead_us_p50": loop_med - bare_med,
        "loop_step_us_p90": statistics.quantiles(loop_times, n=10)[-1] * 1e6,
        "overhead_cpu_us_p50": (statistics.median(loop_cpu) - statistics.median(bare_cpu)) * 1e6,
        "events_written": float(stats.written),
    }


def bench_parts(folder: Path) -> list[tuple[str, float]]:
    """Nanoseconds per call of each piece of the step path, timed alone."""
    import timeit

    from closedloop._events import proposal_fields
    from closedloop.loop import new_step_id
    from closedloop.loop._machine import Validate
    from closedloop.loop._result import StepResult

    store = cl.open_store(folder / "parts.db", max_queue=2_000_000)
    loop = cl.Loop(agent, task_type="bench", validators=[validator], executor=executor,
                   verifiers=[verifier], store=store)
    event = loop.run(1).event
    assert event is not None
    guard = loop._spec.guards[0]
    v = 1
    fields = cl.StepEvent._fields
    names = {"StepEvent": cl.StepEvent, "StepResult": StepResult, "Attempt": cl.Attempt,
             "Validate": Validate, "guard": guard, "event": event, "v": v, "store": store,
             "loop": loop, "validator": validator, "new_step_id": new_step_id,
             "proposal_fields": proposal_fields}
    pieces = [
        ("Loop.run, whole step", "loop.run(1)"),
        (f"StepEvent by keyword ({len(fields)} fields)",
         "StepEvent(" + ", ".join(f"{f}=v" for f in fields) + ")"),
        (f"StepEvent positional ({len(fields)} fields)",
         "StepEvent(" + ", ".join("v" for _ in fields) + ")"),
        ("new_step_id", "new_step_id()"),
        ("proposal text + sha256 (an int)", "proposal_fields(v)"),
        ("StepResult (frozen dataclass)",
         "StepResult(trace_id='x', outcome='succeeded', proposal=1, result=1, attempts=1, "
         "validation=(), verification=(), error_type=None, error_message=None, event=event)"),
        ("Attempt", "Attempt(number=1, trace_id='x', task_type='t', backpressure=None)"),
        ("one typed action (Validate)", "Validate(validator, (v,), 'validator')"),
        ("FaultControl.admit", "guard.admit('bench')"),
        ("FaultControl.observe", "guard.observe(event)"),
        ("Store.record", "store.record(event)"),
    ]
    out = []
    for name, stmt in pieces:
        n = 20_000
        best = min(timeit.repeat(stmt, globals=names, number=n, repeat=7)) / n
        out.append((name, best * 1e9))
    store.close()
    return out


def bench_ingest(events: int, folder: Path, loop_events: bool = False) -> dict[str, float]:
    from closedloop._events import proposal_fields

    store = cl.open_store(folder / "ingest.db", max_queue=events + 1)
    template = cl.StepEvent(
        ts=time.time(), trace_id="0" * 32, agent_id="bench", task_type="ingest",
        autonomy="autonomous", outcome="succeeded", attempts=1, input_tokens=812,
        output_tokens=143, latency_ms=1.25, validation_passed=True, verification_passed=True,
        error_type=None, error_message=None, propose_ms=0.5, validate_ms=0.25, act_ms=0.25,
        verify_ms=0.25, detail=None,
    )
    batch = [template._replace(trace_id=f"{i:032x}", ts=template.ts + i * 1e-6)
             for i in range(events)]
    if loop_events:
        batch = [e._replace(step_id=f"{i:032x}", cached_input_tokens=0,
                            **dict(zip(("proposal", "proposal_digest"), proposal_fields(
                                {"name": f"web-{i}", "size": "small"}), strict=True)))
                 for i, e in enumerate(batch)]
    record = store.record
    start = time.perf_counter()
    for e in batch:
        record(e)
    produced = time.perf_counter() - start
    assert store.flush(timeout=600)
    elapsed = time.perf_counter() - start
    stats = store.close()
    assert stats.written == events and stats.not_written == 0, stats
    return {
        "events": float(events),
        "ingest_events_per_s": events / elapsed,
        "record_call_us": produced / events * 1e6,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds")
    parser.add_argument("--events", type=int, default=500_000, help="events for ingest")
    parser.add_argument("--parts", action="store_true", help="time the step path's pieces")
    parser.add_argument("--loop-events", action="store_true",
                        help="ingest events shaped as a loop records them (schema v3)")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        o = bench_overhead(args.steps, args.rounds, folder)
        print(f"loop step p50   {o['loop_step_us_p50']:8.2f} µs   "
              f"(p90 {o['loop_step_us_p90']:.2f})")
        print(f"bare calls p50  {o['bare_step_us_p50']:8.2f} µs")
        print(f"overhead p50    {o['overhead_us_p50']:8.2f} µs per step  (target ≤ 10 µs)")
        print(f"  thread CPU    {o['overhead_cpu_us_p50']:8.2f} µs per step  (this thread only)")
        if args.parts:
            for name, ns in bench_parts(folder):
                print(f"  {name:34s} {ns:8.0f} ns")
        i = bench_ingest(args.events, folder, args.loop_events)
        print(f"ingest          {i['ingest_events_per_s']:10,.0f} events/s  "
              f"({int(i['events']):,} events, record() {i['record_call_us']:.2f} µs; "
              "target ≥ 100,000/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
