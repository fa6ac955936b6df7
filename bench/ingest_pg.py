"""Sustained ingest from one process through the store's writer: PostgreSQL and SQLite.

Run: ``python bench/ingest_pg.py`` (options: ``--seconds``, ``--batch-size``, ``--pg``,
``--rounds``, ``--backends``, ``--lanes``). Needs PostgreSQL (default
``postgresql://postgres@127.0.0.1:5432/test``); the run uses a schema of its own,
``closedloop_bench_<hex>``, dropped at the end.

Each backend runs in a fresh child process (so that its peak RSS is its own): one producer
thread records distinct events through ``Store.record`` for ``--seconds``, as fast as the
writer takes them. Memory stays bounded: the queue holds at most ``max_queue`` (100,000)
events, and the producer yields (sleeps 1 ms) whenever more than half of that is waiting, so
nothing is dropped and the figure is what the writer sustains. The clock stops when
``flush()`` returns (every event committed). Events span several UTC days of timestamps, so
PostgreSQL creates partitions during the run. Rounds alternate between the backends.

Each run also reports the CPU time it cost per event: the process's own (producer, writer
and psycopg threads: ``os.times``), the producer thread's (building each event, recording it),
the writer thread's and the second ``COPY`` lane's (their thread CPU clocks), and, for
PostgreSQL on this machine, the server's (the backends serving the run's connections,
found by ``application_name``, read from ``/proc/PID/stat`` before they close). On a shared
machine these move less with the load than the rates do.

Then, for reference, ``backend.write_batch`` alone (``--direct`` events, pre-built, batches of
``--batch-size``, no producer thread competing for the GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import closedloop as cl

PG = "postgresql://postgres@127.0.0.1:5432/test"


def server_cpu(url: str, name: str) -> float | None:
    """CPU seconds used so far by the PostgreSQL backends of connections named ``name``;
    None when the server is not a process of this machine."""
    import psycopg

    with psycopg.connect(url.split("?", maxsplit=1)[0], autocommit=True) as conn:
        pids = [r[0] for r in conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,))]
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def writer_cpu(name: str = "closedloop-store-writer") -> float | None:
    """CPU seconds used so far by the store's writer thread (redaction, rows, ``COPY`` on
    the client side), or by another thread named ``name`` (``closedloop-store-lane``: the
    second ``COPY`` lane), read from its thread CPU clock; None where there is none."""
    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            try:
                return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (AttributeError, OSError):
                return None
    return None


def one(url: str, seconds: float, batch_size: int) -> dict[str, Any]:
    """Ingest into ``url`` for ``seconds``; the figures as a dict."""
    max_queue = 100_000
    name = ""
    if url.startswith("postgresql"):
        name = f"closedloop-bench-{os.getpid()}"
        url = f"{url}&application_name={name}"
    store = cl.open_store(url, batch_size=batch_size, max_queue=max_queue)
    template = cl.StepEvent(
        ts=1_790_000_000.0, trace_id="0" * 32, agent_id="bench", task_type="ingest",
        autonomy="autonomous", outcome="succeeded", attempts=1, input_tokens=812,
        output_tokens=143, latency_ms=1.25, validation_passed=True, verification_passed=True,
        error_type=None, error_message=None, propose_ms=0.5, validate_ms=0.25, act_ms=0.25,
        verify_ms=0.25, detail=None,
    )
    replace, record, stats = template._replace, store.record, store.stats
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cpu_before = os.times()
    producer_before = time.thread_time()
    n = waits = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            # 0.25 s apart in ts: about three UTC days (partitions) per million events
            record(replace(ts=1_790_000_000.0 + n * 0.25, trace_id=f"{n:032x}",
                           detail={"n": n} if n % 10 == 0 else None))
            n += 1
        while stats().queued > max_queue // 2:
            waits += 1
            time.sleep(0.001)
    produced = time.perf_counter() - start
    assert store.flush(timeout=600)
    elapsed = time.perf_counter() - start
    producer = time.thread_time() - producer_before
    cpu = os.times()
    server = server_cpu(url, name) if name else None
    writer = writer_cpu()
    lane = writer_cpu("closedloop-store-lane")
    final = store.close()
    assert final.written == n and final.not_written == 0, final
    return {"url": url.split("?", maxsplit=1)[0].split(":", maxsplit=1)[0], "events": n,
            "events_per_s": n / elapsed, "produce_s": produced, "elapsed_s": elapsed,
            "producer_waits": waits,
            "cpu_us_per_event": (cpu.user - cpu_before.user + cpu.system - cpu_before.system)
            / n * 1e6,
            "server_cpu_us_per_event": None if server is None else server / n * 1e6,
            "writer_cpu_us_per_event": None if writer is None else writer / n * 1e6,
            "lane_cpu_us_per_event": None if lane is None else lane / n * 1e6,
            "producer_cpu_us_per_event": producer / n * 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss_before / 1024}


def direct(url: str, events: int, batch_size: int) -> float:
    """Events per second through ``write_batch`` alone, pre-built events, no producer."""
    from closedloop.store import open_backend

    backend = open_backend(url)
    template = cl.StepEvent(
        ts=1_790_000_000.0, trace_id="0" * 32, agent_id="bench", task_type="ingest",
        autonomy="autonomous", outcome="succeeded", attempts=1, input_tokens=812,
        output_tokens=143, latency_ms=1.25, validation_passed=True, verification_passed=True,
        error_type=None, error_message=None, propose_ms=0.5, validate_ms=0.25, act_ms=0.25,
        verify_ms=0.25, detail=None,
    )
    batch = [template._replace(ts=1_900_000_000.0 + n * 0.25, trace_id=f"{n:032x}",
                               detail={"n": n} if n % 10 == 0 else None)
             for n in range(events)]
    backend.write_batch(batch[:1])  # the first day's partition exists
    start = time.perf_counter()
    for i in range(1, events, batch_size):
        backend.write_batch(batch[i:i + batch_size])
    elapsed = time.perf_counter() - start
    backend.close()
    return (events - 1) / elapsed


def child(url: str, seconds: float, batch_size: int, lanes: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--one", url, "--seconds", str(seconds),
         "--batch-size", str(batch_size), "--lanes", str(lanes)],
        capture_output=True, text=True, check=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="producing time per run")
    parser.add_argument("--batch-size", type=int, default=4096, help="the writer's batch size")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per backend")
    parser.add_argument("--direct", type=int, default=400_000,
                        help="events for the write_batch-alone reference (0: skip)")
    parser.add_argument("--pg", default=PG, help="PostgreSQL URL (a schema of its own is used)")
    parser.add_argument("--backends", default="postgresql,sqlite",
                        help="which backends to run, comma-separated")
    parser.add_argument("--lanes", type=int, default=0,
                        help="batches the writer may have in flight on PostgreSQL (the "
                        "backend's concurrent_batches; 0: the backend's own)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        if args.lanes:
            from closedloop.store.postgres import PostgresBackend

            PostgresBackend.concurrent_batches = args.lanes  # a code without it: ignored
        print(json.dumps(one(args.one, args.seconds, args.batch_size)))
        return 0
    import psycopg

    schema = f"closedloop_bench_{uuid.uuid4().hex[:10]}"
    sep = "&" if "?" in args.pg else "?"
    pg_url = f"{args.pg}{sep}schema={schema}"
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}, psycopg "
          f"{psycopg.__version__}, load {os.getloadavg()[0]:.1f}, batch {args.batch_size}, "
          f"{args.seconds:g} s per run")
    results: dict[str, list[dict[str, Any]]] = {"postgresql": [], "sqlite": []}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                for kind in [k for k in ("postgresql", "sqlite") if k in args.backends]:
                    url = pg_url if kind == "postgresql" else f"sqlite:///{Path(tmp)}/r{r}.db"
                    res = child(url, args.seconds, args.batch_size, args.lanes)
                    results[kind].append(res)
                    server = res["server_cpu_us_per_event"]
                    print(f"  {kind:10} {res['events_per_s']:10,.0f} events/s  "
                          f"({res['events']:,} events in {res['elapsed_s']:.1f} s, peak RSS "
                          f"{res['peak_rss_mb']:.0f} MB, producer waited {res['producer_waits']}"
                          f" times; CPU per event {res['cpu_us_per_event']:.2f} µs in the "
                          f"process, of them {res['producer_cpu_us_per_event']:.2f} µs in the "
                          f"producer, {res['writer_cpu_us_per_event'] or 0:.2f} in the writer, "
                          f"{res['lane_cpu_us_per_event'] or 0:.2f} in the lane"
                          f"{'' if server is None else f'; {server:.2f} µs server'}; "
                          f"load {os.getloadavg()[0]:.1f})")
            if args.direct:
                for kind, url in (("postgresql", pg_url),
                                  ("sqlite", f"sqlite:///{Path(tmp)}/direct.db")):
                    if kind not in args.backends:
                        continue
                    rate = direct(url, args.direct, args.batch_size)
                    print(f"  {kind:10} {rate:10,.0f} events/s  write_batch alone "
                          f"({args.direct:,} pre-built events, no producer)")
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    for kind, runs in results.items():
        if not runs:
            continue
        rates = [r["events_per_s"] for r in runs]
        cpu = statistics.median(r["cpu_us_per_event"] for r in runs)
        print(f"{kind:10} median {statistics.median(rates):10,.0f} events/s  "
              f"(min {min(rates):,.0f}, max {max(rates):,.0f}; peak RSS "
              f"{max(r['peak_rss_mb'] for r in runs):.0f} MB; process CPU {cpu:.2f} µs/event; "
              "target PostgreSQL ≥ 100,000/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
