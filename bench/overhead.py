"""The loop's own cost per step, and sustained ingest into the embedded store.

Run: ``python bench/overhead.py`` (options: ``--steps``, ``--rounds``, ``--events``, ``--varied``,
``--parts``, ``--opcodes``, ``--pinned``, ``--only overhead|ingest``, ``--baseline-src DIR``,
``--runs``, ``--drift``).

1. Loop overhead: a trivial agent, one validator, an executor and one verifier, recording on
   into a SQLite store (WAL, background writer), default fault control on, against the same
   four calls made bare (the baseline, timed in the same run). Both are timed in interleaved
   rounds; the figure is the median per-step time of the loop minus the median per-step time
   of the bare calls. Beside wall time, the CPU time of the stepping thread alone
   (``time.thread_time``) is reported: it leaves out the store's writer thread and other
   processes on a shared machine, so it is the steadier figure to compare two versions of
   the loop with (wall time includes what the writer takes of the GIL).
   With ``--baseline-src DIR`` (another checkout's ``src``, e.g. main's) the overhead is
   measured in child processes alternating between that tree and this one, ``--runs`` of
   each, so that a before/after comparison sees the same load; the 1-minute load average is
   printed with every run. With ``--drift`` this tree's loop also runs drift detection
   (``closedloop.configure(drift=DriftPolicy())``: the DriftGuard among the default guards);
   ``--baseline-src`` set to this tree's own ``src`` then measures what drift detection adds.
   With ``--opcodes``: the Python bytecodes and calls of one step instead (a count that
   load does not change; run it with each tree's ``PYTHONPATH`` to compare them).
   With ``--callgrind``: the machine instructions of one step, counted by valgrind's
   callgrind (this tree, and ``--baseline-src`` if given): the loop (default and pinned) and
   the guarded tool of ``bench/tools.py``, each as the difference of two child processes
   running ``--count`` steps (2,500 and 500, after a warm-up), so that start-up cancels out;
   split into the stepping thread and the store's writer thread. Repeatable to ~0.5 %
   whatever the load; the control state's time-based re-reads (fault control's ledger
   every second, the stored levels every 5 s, the detector's save every 30 s) are pushed out
   of the counted steps, since under callgrind's 50-fold slowdown they would land every few
   hundred steps instead of every ~50,000.
2. With ``--parts``: what the pieces of a step's path cost alone (``timeit``, best of 7), to
   see where the overhead goes.
3. Ingest: pre-built events recorded into a fresh SQLite store as fast as the producer can,
   timed until ``flush()`` returns (every event committed in the file), in events per
   second; against the baseline of the same rows (plain tuples, no redaction) inserted by
   ``executemany`` in transactions of the writer's batch size on a connection with the
   store's PRAGMAs, into a fresh store file (same table and index). Two kinds of event:
   ``v2`` (the schema-v2 fields only, as before schema v3) and ``loop`` (what a step of
   the loop records: a step id, a ~60-character JSON proposal and its digest). Rounds
   interleave the four measures; medians are reported, with the process's CPU time per
   event through the writer (producer and writer threads: steadier than the rate on a
   shared machine). With ``--baseline-src DIR`` the writer's ingest of loop events is
   measured in child processes alternating between that tree and this one instead.
4. With ``--varied N``: the same loop events written in batches of 1 to ``2 * N`` events
   (random sizes, one ``flush()`` each), as a background writer meets them when an agent
   steps at a few hundred to a few thousand steps per second; the process's CPU time per
   event (both threads). Run it with each tree's ``PYTHONPATH`` (or under callgrind) to
   compare two versions of the store's write path.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


PINNED: dict[str, str] = {}
"""``--pinned``: the loop's autonomy given (``autonomy="autonomous"``), so it never looks up a
stored level nor runs the demotion monitor (what an unpinned loop pays since issue 11)."""


def bench_overhead(steps: int, rounds: int, folder: Path) -> dict[str, float]:
    store = cl.open_store(folder / "overhead.db")
    loop = cl.Loop(agent, task_type="bench", validators=[validator], executor=executor,
                   verifiers=[verifier], store=store, **PINNED)
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

    from closedloop.loop._machine import Validate
    from closedloop.loop._result import StepResult

    store = cl.open_store(folder / "parts.db", max_queue=2_000_000)
    loop = cl.Loop(agent, task_type="bench", validators=[validator], executor=executor,
                   verifiers=[verifier], store=store)
    event = loop.run(1).event
    assert event is not None
    guard = loop._spec.guards[0]
    v = 1
    from closedloop import _events

    fields = cl.StepEvent._fields
    names = {"StepEvent": cl.StepEvent, "StepResult": StepResult, "Attempt": cl.Attempt,
             "Validate": Validate, "guard": guard, "event": event, "v": v, "store": store,
             "loop": loop, "validator": validator, "new": tuple.__new__,
             "template": loop._spec.event_template,
             **{f.upper(): getattr(_events, f.upper()) for f in fields}}
    per_step = [f for f in fields if f not in ("agent_id", "task_type", "agent_version",
                                               "prompt_version")]
    pieces = [
        ("Loop.run, whole step", "loop.run(1)"),
        (f"StepEvent by keyword ({len(fields)} fields)",
         "StepEvent(" + ", ".join(f"{f}=v" for f in fields) + ")"),
        (f"StepEvent positional ({len(fields)} fields)",
         "new(StepEvent, (" + ", ".join("v" for _ in fields) + "))"),
        (f"StepEvent by field name ({len(per_step)} set)",
         "row = template.copy()\n" + "\n".join(f"row[{f.upper()}] = v" for f in per_step)
         + "\nnew(StepEvent, row)"),
        ("StepResult (frozen dataclass)",
         "StepResult(trace_id='x', outcome='succeeded', proposal=1, result=1, attempts=1, "
         "validation=(), verification=(), error_type=None, error_message=None, event=event)"),
        ("Attempt", "Attempt(number=1, trace_id='x', task_type='t', backpressure=None)"),
        ("one typed action (Validate)", "new(Validate, (validator, (v,), 'validator'))"),
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


def bench_opcodes(steps: int = 200) -> tuple[float, float]:
    """Python bytecodes executed and Python functions called per step (``sys.settrace``
    with opcode events): a count that load does not change, to compare two versions of the
    loop on a busy machine (it leaves out what C code costs: hashing, dict operations)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = cl.open_store(Path(tmp) / "opcodes.db")
        loop = cl.Loop(agent, task_type="bench", validators=[validator], executor=executor,
                       verifiers=[verifier], store=store, **PINNED)
        per_step(loop.run, 300)  # warm up: the stored level read, the detector made
        counts = [0, 0]

        def trace(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                counts[0] += 1
            elif event == "call":
                frame.f_trace_opcodes = True
                counts[1] += 1
            return trace

        run = loop.run
        sys.settrace(trace)
        try:
            for i in range(steps):
                run(i)
        finally:
            sys.settrace(None)
        store.close()
    return counts[0] / steps, counts[1] / steps


def count_steps(kind: str, steps: int) -> None:
    """Run ``steps`` steps of the ``kind`` loop (``default``, ``pinned``, ``tool``) after a
    warm-up, with the control state's time-based re-reads pushed out (for ``--callgrind``)."""
    from closedloop.autonomy import _levels

    _levels.SAVE_EVERY_S = 1e9  # the detector's state is saved every 30 s of wall time
    with tempfile.TemporaryDirectory() as tmp:
        store = cl.open_store(Path(tmp) / "count.db")
        if kind == "tool":
            sys.path.insert(0, str(Path(__file__).parent))
            import tools

            guarded = cl.tool(validators=[tools.validator], verifiers=[tools.verifier],
                              store=store)(tools.put)
            spec = guarded.closedloop_tool.loop._spec  # type: ignore[attr-defined]

            def step(i: int) -> object:
                return guarded(name="x", size=2, kind="a")
        else:
            loop = cl.Loop(agent, task_type="bench", validators=[validator],
                           executor=executor, verifiers=[verifier], store=store,
                           **({"autonomy": "autonomous"} if kind == "pinned" else {}))
            spec, step = loop._spec, loop.run
        for i in range(300):  # warm up: the stored level read, the detector made
            step(i)
        for guard in spec.guards:  # re-read every 1 s / 5 s of wall time: pushed out
            if hasattr(guard, "recheck"):
                guard.recheck = 1e9
            levels = getattr(guard, "levels", None)
            if hasattr(levels, "cache_s"):
                levels.cache_s = 1e9  # type: ignore[union-attr]
        for i in range(300):
            step(i)
        assert store.flush(timeout=60)
        for i in range(steps):
            step(i)
        store.close()


def callgrind(baseline_src: str | None, low: int = 500, high: int = 2500) -> None:
    """Instructions per step (stepping thread, writer thread), this tree against the
    baseline's, counted by callgrind as the difference of two runs."""
    python = os.path.realpath(sys.executable)  # not a shim script: valgrind runs the binary
    trees = [("this", os.environ.get("PYTHONPATH", ""))]
    if baseline_src:
        trees.insert(0, ("baseline", baseline_src))
    found: dict[tuple[str, str], tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("default", "pinned", "tool"):
            for name, src in trees:
                totals = []
                outs = [Path(tmp) / f"cg.{kind}.{name}.{steps}" for steps in (low, high)]
                children = [subprocess.Popen(  # both at once: the counts ignore the load
                    ["valgrind", "--tool=callgrind", "--separate-threads=yes",
                     f"--callgrind-out-file={out}", python, __file__, "--count",
                     str(steps), "--kind", kind],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": src, "PYTHONHASHSEED": "0"})
                    for out, steps in zip(outs, (low, high), strict=True)]
                for child in children:
                    if child.wait() != 0:
                        raise RuntimeError(f"callgrind child failed: {child.args}")
                for out in outs:
                    threads = sorted(Path(tmp).glob(f"{out.name}-*"))
                    counts = [next(int(line.split()[1]) for line in t.read_text().splitlines()
                                   if line.startswith("totals:")) for t in threads]
                    totals.append((counts[0], sum(counts[1:])))
                    for t in threads:
                        t.unlink()
                n = high - low
                found[kind, name] = ((totals[1][0] - totals[0][0]) / n,
                                     (totals[1][1] - totals[0][1]) / n)
                main, writer = found[kind, name]
                print(f"{kind:8s} {name:8s} {main:9,.0f} instructions per step on the "
                      f"stepping thread, {writer:8,.0f} on the writer's", flush=True)
            if baseline_src:
                print(f"{kind:8s} this/baseline: stepping thread "
                      f"{found[kind, 'this'][0] / found[kind, 'baseline'][0]:.3f}, writer "
                      f"{found[kind, 'this'][1] / found[kind, 'baseline'][1]:.3f}")


def ingest_events(events: int, kind: str) -> list[cl.StepEvent]:
    """``events`` distinct events: ``v2`` (schema-v2 fields only) or ``loop`` (as a loop step
    records them: step id, proposal and its digest)."""
    template = cl.StepEvent(
        ts=time.time(), trace_id="0" * 32, agent_id="bench", task_type="ingest",
        autonomy="autonomous", outcome="succeeded", attempts=1, input_tokens=812,
        output_tokens=143, latency_ms=1.25, validation_passed=True, verification_passed=True,
        error_type=None, error_message=None, propose_ms=0.5, validate_ms=0.25, act_ms=0.25,
        verify_ms=0.25, detail=None,
    )
    if kind == "v2":
        return [template._replace(trace_id=f"{i:032x}", ts=template.ts + i * 1e-6)
                for i in range(events)]
    out = []
    for i in range(events):
        proposal = f'{{"action":"scale","replicas":{i % 7 + 1},"service":"web-{i}"}}'
        out.append(template._replace(
            trace_id=f"{i:032x}", ts=template.ts + i * 1e-6, step_id=f"{i + 1 << 40:032x}",
            cached_input_tokens=0, proposal=proposal,
            proposal_digest=hashlib.sha256(proposal.encode()).hexdigest()))
    return out


CPU: dict[str, list[float]] = {}
"""The process's CPU time per event (µs) of each ``bench_ingest`` run, by kind of event."""


def bench_ingest(batch: list[cl.StepEvent], path: Path) -> float:
    """Events per second through ``Store.record`` until ``flush()`` returns; the process's
    CPU time per event (every thread: producer and writer) goes to :data:`CPU`."""
    store = cl.open_store(path, max_queue=len(batch) + 1)
    record = store.record
    cpu = time.process_time()
    start = time.perf_counter()
    for e in batch:
        record(e)
    assert store.flush(timeout=600)
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu
    stats = store.close()
    assert stats.written == len(batch) and stats.not_written == 0, stats
    kind = "loop" if batch[0].proposal is not None else "v2"
    CPU.setdefault(kind, []).append(cpu / len(batch) * 1e6)
    return len(batch) / elapsed


def bench_raw(batch: list[cl.StepEvent], path: Path, batch_size: int = 4096) -> float:
    """The baseline: the same rows inserted by ``executemany``, events per second."""
    cl.open_store(path).close()  # the store's schema (table, index)
    columns = [i for i, name in enumerate(cl.StepEvent._fields)
               if any(e[i] is not None for e in batch)]  # what the writer's INSERT names
    names = ", ".join(cl.StepEvent._fields[i] for i in columns)
    sql = f"INSERT INTO events ({names}) VALUES ({', '.join('?' * len(columns))})"
    rows = [tuple(e[i] for i in columns) for e in batch]  # plain tuples, nothing to convert
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    start = time.perf_counter()
    for at in range(0, len(rows), batch_size):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(sql, rows[at:at + batch_size])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return len(rows) / elapsed


def bench_varied(size: int, events: int, folder: Path) -> float:
    """The process's CPU time per event (µs) writing ``events`` loop events in batches of
    1 to ``2 * size`` (seeded random sizes, a ``flush()`` after each), after a warm-up."""
    import random

    batch = ingest_events(events + 10 * size, "loop")
    store = cl.open_store(folder / "varied.db")
    for e in batch[:10 * size]:  # warm up: the connection, the statements of a full batch
        store.record(e)
    assert store.flush(timeout=600)
    rng = random.Random(1)
    at, end = 10 * size, len(batch)
    cpu = time.process_time()
    while at < end:
        k = rng.randint(1, 2 * size)
        for e in batch[at:at + k]:
            store.record(e)
        assert store.flush(timeout=600)  # these events are one batch
        at += k
    cpu = time.process_time() - cpu
    stats = store.close()
    assert stats.not_written == 0, stats
    return cpu / events * 1e6


def run_ingest(events: int, rounds: int, folder: Path) -> dict[str, list[float]]:
    """Interleaved rounds of the writer and the raw baseline, for both kinds of event."""
    batches = {kind: ingest_events(events, kind) for kind in ("v2", "loop")}
    out: dict[str, list[float]] = {}
    n = 0
    for _ in range(rounds):
        for kind, batch in batches.items():
            for name, fn in (("writer", bench_ingest), ("raw", bench_raw)):
                n += 1
                path = folder / f"ingest-{n}.db"
                gc.collect()
                out.setdefault(f"{name} {kind}", []).append(fn(batch, path))
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
    return out


def load() -> str:
    """The 1-minute load average, for the record."""
    return f"{os.getloadavg()[0]:.2f}"


def print_overhead(o: dict[str, float]) -> None:
    print(f"loop step p50   {o['loop_step_us_p50']:8.2f} µs   (p90 {o['loop_step_us_p90']:.2f})")
    print(f"bare calls p50  {o['bare_step_us_p50']:8.2f} µs   (the baseline)")
    print(f"overhead p50    {o['overhead_us_p50']:8.2f} µs per step  (target ≤ 10 µs)")
    print(f"  thread CPU    {o['overhead_cpu_us_p50']:8.2f} µs per step  (this thread only)")


def compare_ingest(baseline_src: str, runs: int, events: int) -> None:
    """Ingest of loop events by ``baseline_src`` and by this tree, in alternating child
    processes (one round of the writer each): events/s and CPU per event."""
    this_src = os.environ.get("PYTHONPATH", "")
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
    for run in range(runs):
        for name, src in (("baseline", baseline_src), ("this", this_src)):
            before = load()
            out = subprocess.run(
                [sys.executable, __file__, "--child-ingest", "--events", str(events)],
                check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": src})
            o = json.loads(out.stdout)
            results[name].append(o)
            print(f"run {run + 1} {name:8s}  loop events {o['rate']:9,.0f}/s  CPU "
                  f"{o['cpu_us']:5.2f} µs per event  (load {before} → {load()})", flush=True)
    for key, label, unit in (("rate", "loop events/s", ""), ("cpu_us", "CPU per event", " µs")):
        base = statistics.median(r[key] for r in results["baseline"])
        this = statistics.median(r[key] for r in results["this"])
        print(f"median {label:14s} baseline {base:10,.2f}{unit}   this {this:10,.2f}{unit}   "
              f"this/baseline {this / base:5.2f}")


def compare(baseline_src: str, runs: int, steps: int, rounds: int,
            drift: bool = False) -> None:
    """The overhead of ``baseline_src`` and of this tree (with ``drift``: its loop also runs
    the drift guard), in alternating child processes."""
    this_src = os.environ.get("PYTHONPATH", "")
    results: dict[str, list[dict[str, float]]] = {"baseline": [], "this": []}
    for run in range(runs):
        for name, src in (("baseline", baseline_src), ("this", this_src)):
            before = load()
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--steps", str(steps),
                 "--rounds", str(rounds), *(["--drift"] if drift and name == "this" else []),
                 *(["--pinned"] if PINNED else [])],
                check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": src})
            o = json.loads(out.stdout)
            results[name].append(o)
            print(f"run {run + 1} {name:8s}  overhead {o['overhead_us_p50']:6.2f} µs  "
                  f"thread CPU {o['overhead_cpu_us_p50']:6.2f} µs  bare "
                  f"{o['bare_step_us_p50']:5.2f} µs  (load {before} → {load()})", flush=True)
    for key, label in (("overhead_us_p50", "overhead, wall"),
                       ("overhead_cpu_us_p50", "overhead, thread CPU")):
        base = statistics.median(r[key] for r in results["baseline"])
        this = statistics.median(r[key] for r in results["this"])
        print(f"median {label:22s} baseline {base:6.2f} µs   this {this:6.2f} µs   "
              f"this/baseline {this / base:5.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds")
    parser.add_argument("--events", type=int, default=500_000, help="events for ingest")
    parser.add_argument("--ingest-rounds", type=int, default=3, help="rounds of ingest")
    parser.add_argument("--parts", action="store_true", help="time the step path's pieces")
    parser.add_argument("--only", choices=("overhead", "ingest"), help="run one part")
    parser.add_argument("--baseline-src", help="another tree's src to compare the overhead of")
    parser.add_argument("--runs", type=int, default=5, help="alternations with --baseline-src")
    parser.add_argument("--pinned", action="store_true",
                        help="pin the loop's autonomy (no stored-level lookup, no monitor)")
    parser.add_argument("--drift", action="store_true",
                        help="this tree's loop also runs drift detection (configure(drift=))")
    parser.add_argument("--opcodes", action="store_true",
                        help="count the bytecodes and Python calls of a step (load-free)")
    parser.add_argument("--callgrind", action="store_true",
                        help="count a step's machine instructions with valgrind (load-free)")
    parser.add_argument("--varied", type=int, metavar="N",
                        help="write loop events in batches of 1 to 2*N (CPU per event)")
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-ingest", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_ingest:
        batch = ingest_events(args.events, "loop")
        with tempfile.TemporaryDirectory() as tmp:
            gc.collect()
            rate = bench_ingest(batch, Path(tmp) / "ingest.db")
        print(json.dumps({"rate": rate, "cpu_us": CPU["loop"][0]}))
        return 0
    if args.varied is not None:
        with tempfile.TemporaryDirectory() as tmp:
            cpu = bench_varied(args.varied, args.events, Path(tmp))
        print(f"batches of 1-{2 * args.varied} events: {cpu:.2f} µs CPU per event (process, "
              f"both threads; closedloop from {cl.__file__}, load {load()})")
        return 0
    if args.pinned:
        PINNED["autonomy"] = "autonomous"
    if args.drift and (args.child or not args.baseline_src):
        from closedloop.learn import DriftPolicy

        cl.configure(drift=DriftPolicy())  # every step signal, and the default guards
    if args.count is not None:
        count_steps(args.kind, args.count)
        return 0
    if args.callgrind:
        callgrind(args.baseline_src)
        return 0
    if args.opcodes:
        opcodes, calls = bench_opcodes()
        print(f"{'pinned' if PINNED else 'default'} loop: {opcodes:.0f} bytecodes, "
              f"{calls:.0f} Python calls per step (closedloop from {cl.__file__})")
        return 0
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(bench_overhead(args.steps, args.rounds, Path(tmp))))
        return 0
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}, sqlite "
          f"{sqlite3.sqlite_version}, load {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.only != "ingest":
            if args.baseline_src:
                compare(args.baseline_src, args.runs, args.steps, args.rounds, args.drift)
            else:
                print_overhead(bench_overhead(args.steps, args.rounds, folder))
            if args.parts:
                for name, ns in bench_parts(folder):
                    print(f"  {name:34s} {ns:8.0f} ns")
        if args.only != "overhead" and args.baseline_src:
            compare_ingest(args.baseline_src, args.runs, args.events)
        elif args.only != "overhead":
            rates = run_ingest(args.events, args.ingest_rounds, folder)
            print(f"ingest, {args.events:,} events, {args.ingest_rounds} rounds "
                  f"(load {load()}):")
            for kind in ("v2", "loop"):
                writer = statistics.median(rates[f"writer {kind}"])
                raw = statistics.median(rates[f"raw {kind}"])
                print(f"  {kind:4s} events: writer {writer:9,.0f}/s  raw executemany "
                      f"{raw:9,.0f}/s (the baseline)  writer/raw {writer / raw:4.2f}  "
                      f"(target ≥ 200,000/s)")
                for name in ("writer", "raw"):
                    print(f"    {name:6s} rounds: " + ", ".join(
                        f"{r:,.0f}" for r in rates[f"{name} {kind}"]))
                print(f"    writer CPU per event (producer and writer threads): "
                      f"{statistics.median(CPU[kind]):.2f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
