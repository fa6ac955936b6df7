"""What each index of PostgreSQL's ``events`` costs the server at ingest.

Run: ``PYTHONPATH=src python bench/pg_indexes.py`` (options: ``--events``, ``--rounds``,
``--pg``, ``--only NAME,...``, ``--shape loop|bench``, ``--trace-ids random|time``). Needs
PostgreSQL on this machine (the server's CPU is read from ``/proc``).

For each variant (the heap alone, the heap with one index, the whole index set of this
version, the index set of the schema before it), a fresh schema ``h_pgingest_idx`` gets the
``events`` table as this version's migrations make it, every index of ``events`` dropped,
then the variant's indexes created; ``--events`` loop-shaped events (random 128-bit trace ids,
step ids ordered within the process, one step in ten in a run, 30 % failed with a message
and its group, as the writer stores them; 3 UTC days) are ``COPY``ed in batches of 4,096 on
one connection, as the store's writer does (``--shape bench``: the events of
``bench/ingest_pg.py`` instead: one task type, sequential trace ids, no step id, no run, no
failure, a ``detail`` on one in ten). ``--trace-ids time``: the loop-shaped events' trace ids
begin with the step's time in milliseconds (12 hex digits, then 80 random bits), as a
time-ordered id would, instead of 128 random bits. Reported: the server backend's CPU time per
event (``/proc/PID/stat`` of the connection's backend) and the wall time, median of
``--rounds`` (variants alternate within each round). An index's cost is its variant's figure
less the heap's; ``-NAME`` is this version's whole set without ``NAME`` (what dropping it
alone would save, the others competing for the same buffers).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from closedloop._figures import message_group
from closedloop.store.postgres._backend import (
    _COLUMNS,
    _COPY_TYPES,
    LATENCY_BUCKET,
    ensure_partitions,
    migrate,
)

PG = "postgresql://postgres@127.0.0.1:5432/test"
SCHEMA = "h_pgingest_idx"
T0 = 1_790_000_000.0
# every index ``events`` had before this branch's migrations, by name
BEFORE = {
    "events_ts": "(ts)",
    "events_task_type_ts": "(task_type, ts)",
    "events_trace_ts": "(trace_id, ts)",
    "events_latency": f"(task_type, {LATENCY_BUCKET}) INCLUDE (ts, latency_ms)",
    "events_groups": "(task_type, error_type, error_group, ts) WHERE error_group IS NOT NULL",
    "events_ungrouped": "(ts) WHERE error_group IS NULL AND error_message <> ''",
    "events_report": "(task_type, outcome, error_type, validation_passed, verification_passed, "
                     "attempts) INCLUDE (ts, input_tokens, output_tokens, latency_ms, "
                     "cached_input_tokens, cost_usd)",
    "events_step": "(step_id) WHERE step_id IS NOT NULL",
    "events_run": "(run_id, ts) WHERE run_id IS NOT NULL",
}
CANDIDATES = {
    "events_ts_brin": "USING brin (ts)",
    "events_trace_ts_c": '(trace_id COLLATE "C", ts)',
    "events_trace_hash": "USING hash (trace_id)",
    "events_task_type_ts_c": '(task_type COLLATE "C", ts)',
    "events_task_ts_wide": "(task_type, ts) INCLUDE (outcome, error_type, validation_passed, "
                           "verification_passed, attempts, input_tokens, output_tokens, "
                           "latency_ms, cached_input_tokens, cost_usd)",
    "events_report_k1": "(task_type) INCLUDE (outcome, error_type, validation_passed, "
                        "verification_passed, attempts, ts, input_tokens, output_tokens, "
                        "latency_ms, cached_input_tokens, cost_usd)",
    "events_summary": f"(task_type, {LATENCY_BUCKET}, outcome, error_type, validation_passed, "
                      "verification_passed, attempts) INCLUDE (ts, input_tokens, output_tokens, "
                      "latency_ms, cached_input_tokens, cost_usd)",
    "events_summary_c": f'(task_type COLLATE "C", {LATENCY_BUCKET}, outcome COLLATE "C", '
                        'error_type COLLATE "C", validation_passed, verification_passed, '
                        "attempts) INCLUDE (ts, input_tokens, output_tokens, latency_ms, "
                        "cached_input_tokens, cost_usd)",
}


def rows(count: int) -> list[tuple[Any, ...]]:
    """``count`` rows of ``events`` as the writer COPYs them (the error group last)."""
    rng = random.Random(3)
    prefix = f"{rng.getrandbits(80):020x}"
    out = []
    run = None
    for i in range(count):
        if i % 10 == 0:
            run = f"{rng.getrandbits(128):032x}" if rng.random() < 0.1 else None
        r = rng.random()
        outcome, error, message = "succeeded", None, None
        if r >= 0.7:
            outcome, error = "failed", "verification"
            message = (f"instance_matches_request: [error] instance_type at "
                       f"instance.instance_type: i-{rng.getrandbits(68):017x} is a t3.large, "
                       f"requested m5.xlarge")
        latency = rng.lognormvariate(3.0, 1.0)
        row = (T0 + i * (3 * 86_400 / count), f"{rng.getrandbits(128):032x}", "agent",
               f"task{i % 5}", "autonomous", outcome, 1 + (rng.random() < 0.2),
               300 + rng.randrange(400), 40 + rng.randrange(80), latency, True,
               outcome == "succeeded", error, message, latency * 0.6, 0.5, latency * 0.3, 0.5,
               None, f"{prefix}{i:012x}", None, run, "gpt-x", "openai", "1", "1", None, None,
               None, None, None, None if message is None else message_group(message))
        out.append(row)
    assert len(out[0]) == len(_COLUMNS)
    return out


def bench_rows(count: int) -> list[tuple[Any, ...]]:
    """``count`` rows shaped as ``bench/ingest_pg.py`` records them (no error group)."""
    out = []
    for n in range(count):
        row = (T0 + n * 0.25, f"{n:032x}", "bench", "ingest", "autonomous", "succeeded", 1, 812,
               143, 1.25, True, True, None, None, 0.5, 0.25, 0.25, 0.25,
               {"n": n} if n % 10 == 0 else None, None, None, None, None, None, None, None,
               None, None, None, None, None, None)
        out.append(row)
    assert len(out[0]) == len(_COLUMNS)
    return out


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prepare(conn: psycopg.Connection[Any], indexes: dict[str, str]) -> None:
    conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    migrate(conn, SCHEMA)
    names = [r[0] for r in conn.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = %s AND tablename = 'events'",
        (SCHEMA,))]
    for name in names:
        conn.execute(f'DROP INDEX "{SCHEMA}".{name}')
    for name, ddl in indexes.items():
        conn.execute(f'CREATE INDEX {name} ON "{SCHEMA}".events {ddl}')
    days = {int(T0 // 86_400) + d for d in range(4)}
    ensure_partitions(conn, SCHEMA, days)


def one(url: str, data: list[tuple[Any, ...]], indexes: dict[str, str]) -> tuple[float, float]:
    """Server CPU µs per event and wall µs per event of COPYing ``data``."""
    with psycopg.connect(url, autocommit=True) as conn:
        prepare(conn, indexes)
        pid = conn.info.backend_pid
        copy_sql = f'COPY "{SCHEMA}".events ({", ".join(_COLUMNS)}) FROM STDIN (FORMAT BINARY)'
        cpu, start = backend_cpu(pid), time.perf_counter()
        for i in range(0, len(data), 4096):
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copy.set_types(_COPY_TYPES)
                for row in data[i:i + 4096]:
                    copy.write_row(row)
        wall = time.perf_counter() - start
        cpu = backend_cpu(pid) - cpu
        conn.execute(f'DROP SCHEMA "{SCHEMA}" CASCADE')
    return cpu / len(data) * 1e6, wall / len(data) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", default=PG)
    parser.add_argument("--shape", choices=("loop", "bench"), default="loop",
                        help="loop-shaped events, or those of bench/ingest_pg.py")
    parser.add_argument("--trace-ids", choices=("random", "time"), default="random",
                        help="loop-shaped events' trace ids: random, or time-prefixed")
    parser.add_argument("--only", default="", help="variants to run, comma-separated")
    parser.add_argument("--after", default="", help="this version's index set as NAME=DDL;... "
                        "(default: read from a fresh schema)")
    args = parser.parse_args()
    with psycopg.connect(args.pg, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
        migrate(conn, SCHEMA)
        now = {r[0]: r[1].split(" ON ", 1)[1].split(" ", 2)[2].removeprefix("USING btree ")
               for r in conn.execute(
                   "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x JOIN pg_class i "
                   "ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid JOIN "
                   "pg_namespace n ON n.oid = t.relnamespace WHERE n.nspname = %s AND "
                   "t.relname = 'events'", (SCHEMA,))}
        conn.execute(f'DROP SCHEMA "{SCHEMA}" CASCADE')
    variants: dict[str, dict[str, str]] = {"heap": {}}
    for name, ddl in {**BEFORE, **CANDIDATES, **now}.items():
        variants.setdefault(f"+{name}" if name in BEFORE or name in CANDIDATES
                            else f"+{name} (new)", {name: ddl})
    variants["all-before"] = BEFORE
    variants["all-now"] = now
    for name in now:
        variants[f"-{name}"] = {k: v for k, v in now.items() if k != name}
    if args.only:
        variants = {k: v for k, v in variants.items() if k in args.only.split(",")}
    data = rows(args.events) if args.shape == "loop" else bench_rows(args.events)
    if args.trace_ids == "time":
        rng = random.Random(9)
        data = [(r[0], f"{int(r[0] * 1000):012x}{rng.getrandbits(80):020x}", *r[2:])
                for r in data]
    print(f"{args.events:,} {args.shape}-shaped events per run ({args.trace_ids} trace ids), "
          f"load {os.getloadavg()[0]:.2f}; this version's indexes: {', '.join(sorted(now))}")
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    wall: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, indexes in variants.items():
            c, w = one(args.pg, data, indexes)
            cpu[name].append(c)
            wall[name].append(w)
    heap = statistics.median(cpu["heap"]) if "heap" in cpu else 0.0
    print("| variant | server CPU µs/event (median; runs) | over the heap | wall µs/event |")
    print("| --- | --- | --- | --- |")
    for name in variants:
        c = statistics.median(cpu[name])
        print(f"| {name} | **{c:.2f}** ({', '.join(f'{x:.2f}' for x in cpu[name])}) | "
              f"{c - heap:+.2f} | {statistics.median(wall[name]):.2f} |")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
