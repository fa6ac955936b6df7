"""Storage capacity: bytes per event, ``store info`` and ``store prune`` on a large store, and
several writer processes on one PostgreSQL server.

Run: ``python bench/storage.py`` (options: ``--events``, ``--days``, ``--failed``,
``--writers``, ``--seconds``, ``--pg``, ``--only sizes|loop|writers``). Needs PostgreSQL (default
``postgresql://postgres@127.0.0.1:5432/test``); every run uses schemas of its own,
``closedloop_bench_<hex>``, dropped at the end.

1. **Sizes** (``--only sizes``): ``--events`` events spread evenly over ``--days`` UTC days,
   a mix like the demo's (``--failed`` of them failed, each with a ~150-character message and a
   detail dict of issues and attempts; the others succeeded, with neither), written with
   ``backend.write_batch`` in batches of 4,096 into a fresh SQLite file and a fresh PostgreSQL
   schema. Reported: bytes per event (SQLite: the file after a checkpoint; PostgreSQL: every
   relation of the schema, heap, TOAST and indexes, after ``VACUUM ANALYZE``), then the time
   of ``store info`` and of pruning the oldest half of the days (SQLite: batched deletes;
   PostgreSQL: partition drops), and how the SQLite file's free pages are reused.
2. **Loop** (``--only loop``): one process runs a trivial loop (one validator, an executor,
   one verifier, default fault control on the store's ledger) for ``--seconds``, recording
   into PostgreSQL, then into SQLite: steps (events) per second until every event is written.
3. **Writers** (``--only writers``): ``--writers`` processes, each recording distinct events
   through ``Store.record`` for ``--seconds`` as fast as its writer takes them (the producer
   waits whenever half the queue is full, so nothing is dropped), into one PostgreSQL schema
   at once, then the same into one SQLite file; the figure is all events over the time until
   the last process's ``flush()`` returned.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import closedloop as cl
from closedloop.store import open_backend, prune, store_info

PG = "postgresql://postgres@127.0.0.1:5432/test"
DAY = 86_400.0
START = 1_790_035_200.0  # 2026-09-22T00:00:00Z
TEMPLATE = cl.StepEvent(
    ts=START, trace_id="0" * 32, agent_id="provisioner-7", task_type="ec2.provision",
    autonomy="autonomous", outcome="succeeded", attempts=1, input_tokens=812,
    output_tokens=143, latency_ms=1843.25, validation_passed=True, verification_passed=True,
    error_type=None, error_message=None, propose_ms=1201.5, validate_ms=3.25, act_ms=512.0,
    verify_ms=126.5, detail=None)


def mix(n: int, ts: float, rng: random.Random, failed: float) -> cl.StepEvent:
    """Event ``n`` at ``ts``: succeeded, or failed with a message and a detail dict."""
    trace = f"{rng.getrandbits(128):032x}"
    if rng.random() >= failed:
        return TEMPLATE._replace(ts=ts, trace_id=trace, input_tokens=600 + n % 400)
    instance = f"i-{rng.getrandbits(68):017x}"
    message = (f"instance_matches_request: [error] instance_type at instance.instance_type: "
               f"{instance} is a m5.large, requested t3.xlarge (attempt {1 + n % 3})")
    detail = {"issues": [{"code": "instance_type", "path": ["instance", "instance_type"],
                          "message": message[:80], "severity": "error"}],
              "attempts": [{"attempt": 1, "ok": False}, {"attempt": 2, "ok": True}]}
    return TEMPLATE._replace(ts=ts, trace_id=trace, outcome="failed", attempts=2,
                             verification_passed=False, error_type="verification",
                             error_message=message, detail=detail)


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by process ``pid`` (0 if it cannot be read)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu() -> float:
    """CPU seconds used so far by the ``postgres`` processes on this machine, ended ones
    included (0 if none can be read): the server's share of the work, apart from the
    client's."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:]
        if name == "postgres":
            fields = rest.split()
            # utime, stime, and cutime, cstime: the postmaster collects what its ended
            # backends used (the writers' connections close before the second reading)
            total += sum(int(f) for f in fields[11:15]) / ticks
    return total


def wal_position(backend: Any) -> int:
    """The server's write-ahead log position in bytes (0 for SQLite): the WAL written
    between two readings, by every session of the server."""
    pool = getattr(backend, "pool", None)
    if pool is None:
        return 0
    with pool().connection() as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(row[0])


def fill(url: str, events: int, days: int, failed: float) -> tuple[float, float, float]:
    """Write the events into ``url``; returns events per second (building them included)
    and the CPU microseconds and write-ahead log bytes per event of the PostgreSQL backend
    process that took them."""
    rng = random.Random(7)
    backend = open_backend(url)
    step = days * DAY / events
    pid = 0
    if url.startswith("postgresql"):  # the one connection the writes go through
        backend.write_batch([mix(0, START, rng, failed)])
        with backend.pool().connection() as conn:  # type: ignore[attr-defined]
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
    cpu, wal = process_cpu(pid), wal_position(backend)
    start = time.perf_counter()
    batch: list[cl.StepEvent] = []
    for n in range(events):
        batch.append(mix(n, START + n * step, rng, failed))
        if len(batch) == 4096:
            backend.write_batch(batch)
            batch = []
    if batch:
        backend.write_batch(batch)
    elapsed = time.perf_counter() - start
    used = process_cpu(pid) - cpu
    wal_bytes = wal_position(backend) - wal
    backend.close()
    return events / elapsed, used / events * 1e6, wal_bytes / events


def sizes(args: argparse.Namespace, pg_url: str, tmp: Path) -> None:
    sqlite_url = f"sqlite:///{tmp / 'sizes.db'}"
    for kind, url in (("sqlite", sqlite_url), ("postgresql", pg_url)):
        rate, server_us, wal = fill(url, args.events, args.days, args.failed)
        if kind == "postgresql":
            import psycopg

            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f'VACUUM ANALYZE "{url.rsplit("=", 1)[1]}".events')
        with cl.open_store(url, read_only=True) as store:
            clock = time.perf_counter()
            found = store_info(store)
            info_s = time.perf_counter() - clock
            assert found.size_bytes is not None
            cpu = (f"; its server process used {server_us:.1f} µs CPU and {wal:,.0f} bytes of "
                   "WAL per event") if kind == "postgresql" else ""
            print(f"{kind:10} {found.events:,} events over {args.days} days built and written "
                  f"at {rate:,.0f} events/s (write_batch): {found.size_bytes / 1e6:,.1f} MB, "
                  f"{found.size_bytes / found.events:,.0f} bytes per event; store info "
                  f"{info_s * 1000:,.0f} ms{cpu}")
            clock = time.perf_counter()
            report = prune(store, START + (args.days // 2) * DAY)
            prune_s = time.perf_counter() - clock
            dropped = report.events.partitions
            print(f"{kind:10} prune of the oldest {args.days // 2} days: "
                  f"{report.events.events:,} events in {prune_s:,.2f} s "
                  f"({report.events.events / prune_s:,.0f} events/s"
                  f"{f', {len(dropped)} partitions dropped' if dropped else ''})")
            after = store_info(store)
            assert after.size_bytes is not None
            free = f", {after.free_bytes / 1e6:,.1f} MB of it free pages" if after.free_bytes \
                else ""
            print(f"{kind:10} after: {after.events:,} events, {after.size_bytes / 1e6:,.1f} MB"
                  f"{free}")
        if kind == "sqlite":  # the freed pages take the next days' events
            refill, _, _ = fill(url, args.events // 2, args.days // 2, args.failed)
            with cl.open_store(url, read_only=True) as store:
                again = store_info(store)
            print(f"{kind:10} {args.events // 2:,} events more (at {refill:,.0f}/s): "
                  f"{again.size_bytes / 1e6:,.1f} MB, "
                  f"{(again.free_bytes or 0) / 1e6:,.1f} MB free pages left")


def loop(args: argparse.Namespace, pg_url: str, tmp: Path) -> None:
    """Steps per second of one process running a trivial loop (one validator, an executor,
    one verifier, default fault control) that records into each store."""
    for kind, url in (("postgresql", pg_url), ("sqlite", f"sqlite:///{tmp / 'loop.db'}")):
        store = cl.open_store(url)
        step = cl.Loop(lambda task, attempt: task, task_type="bench", validators=[lambda p: None],
                       executor=lambda p: p, verifiers=[lambda task, result: None], store=store,
                       backpressure=None)
        run = step.run
        n = 0
        start = time.perf_counter()
        deadline = start + args.seconds
        while time.perf_counter() < deadline:
            for _ in range(500):
                run(n)
                n += 1
        assert store.flush(timeout=600)
        elapsed = time.perf_counter() - start
        final = store.close()
        assert final.written == n and final.not_written == 0, final
        print(f"{kind:10} one process, one loop: {n / elapsed:,.0f} steps (events) per second, "
              f"every event written ({n:,} in {elapsed:.1f} s)")


def one_writer(url: str, seconds: float, worker: int) -> dict[str, Any]:
    max_queue = 100_000
    store = cl.open_store(url, max_queue=max_queue)
    record, stats = store.record, store.stats
    n = 0
    began = time.time()
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            record(TEMPLATE._replace(ts=time.time(), trace_id=f"{worker:04x}{n:028x}"))
            n += 1
        while stats().queued > max_queue // 2:
            time.sleep(0.001)
    assert store.flush(timeout=600)
    end = time.time()
    final = store.close()
    assert final.written == n and final.not_written == 0, final
    return {"events": n, "start": began, "end": end}


def writers(args: argparse.Namespace, pg_url: str, tmp: Path) -> None:
    for kind, url in (("postgresql", pg_url), ("sqlite", f"sqlite:///{tmp / 'writers.db'}")):
        cl.open_store(url).close()  # created before the writers start
        cpu, children = server_cpu(), resource.getrusage(resource.RUSAGE_CHILDREN)
        procs = [subprocess.Popen([sys.executable, __file__, "--one", url, "--seconds",
                                   str(args.seconds), "--worker", str(w)],
                                  stdout=subprocess.PIPE, text=True)
                 for w in range(args.writers)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        total = sum(r["events"] for r in results)
        elapsed = max(r["end"] for r in results) - min(r["start"] for r in results)
        server_us = (server_cpu() - cpu) / total * 1e6
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_us = (after.ru_utime + after.ru_stime - children.ru_utime
                     - children.ru_stime) / total * 1e6
        with cl.open_store(url, read_only=True) as store:
            assert store.count() == total
        server = f", server {server_us:.1f} µs" if kind == "postgresql" else ""
        print(f"{kind:10} {args.writers} writer processes: {total:,} events in {elapsed:.1f} s "
              f"= {total / elapsed:,.0f} events/s together "
              f"({total / elapsed / args.writers:,.0f} per process); CPU per event: clients "
              f"{client_us:.1f} µs (producing included){server}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=10)
    parser.add_argument("--failed", type=float, default=0.1, help="share of failed steps")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--pg", default=PG, help="PostgreSQL URL (schemas of its own are used)")
    parser.add_argument("--only", choices=("sizes", "loop", "writers"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_writer(args.one, args.seconds, args.worker)))
        return 0
    import psycopg

    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}, psycopg "
          f"{psycopg.__version__}, load {os.getloadavg()[0]:.1f}")
    schemas = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for part, run in (("sizes", sizes), ("loop", loop), ("writers", writers)):
                if args.only in (None, part):
                    schema = f"closedloop_bench_{uuid.uuid4().hex[:10]}"
                    schemas.append(schema)
                    sep = "&" if "?" in args.pg else "?"
                    run(args, f"{args.pg}{sep}schema={schema}", Path(tmp))
                    print(f"load {os.getloadavg()[0]:.1f}")
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            for schema in schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
