"""``closedloop traces list`` on a store of 1M step events with their spans, SQLite and PostgreSQL.

Run: ``PYTHONPATH=src python bench/traces.py`` (options: ``--events``, ``--pg URL`` or
``--no-pg``, ``--no-sqlite``, ``--tag SUFFIX`` (the stores' names), ``--cache DIR``,
``--rounds``, ``--rebuild``, ``--before``, ``--no-migrate``:
read the stores read-only as they are, so that a branch with a newer schema does not migrate
shared stores that older code must still open).

Builds (once; reused while it holds the expected counts) a store of ``--events`` steps spread
over ten days, each with the six spans the loop records (step, attempt, agent, validate, act,
verify; attributes and captured content shaped like the loop's), written through the span
store's own ``write_spans`` (so the trace summaries are made as in production), plus 10k scores.
The SQLite file goes in ``--cache``; the PostgreSQL store in the schema
``closedloop_bench_traces_<events>`` of ``--pg``'s database.

Then times, median of ``--rounds``:

- ``traces(limit=20)`` in process (the page the command reads), filtered by task type, and
  a page deep into the listing (keyset cursor after 100 pages);
- ``closedloop traces list --store URL`` end to end, as a new process (what a user waits for);
- with ``--before``, on SQLite, the listing as it was before the ``traces`` summary (GROUP BY
  over every span), for comparison;
- ``score_summary()`` (aggregated in SQL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import closedloop as cl
from closedloop.store import SpanBackend, SpanStore
from closedloop.telemetry import Score, StoredSpan

TASK_TYPES = ("ec2.provision", "terraform.plan", "sql.migrate", "k8s.deploy", "dns.update")
SPANS_PER_STEP = 6
BATCH_STEPS = 1000
DAYS = 10
BASE_S = 1_780_000_000.0
OLD_SQL = (  # the listing before the summary table (telemetry/_spanstore.py on main)
    "SELECT trace_id, MIN(start_ns), MAX(end_ns), COUNT(*), "
    "(SELECT attributes FROM spans s2 WHERE s2.trace_id = spans.trace_id "
    "AND json_extract(s2.attributes, '$.\"closedloop.task_type\"') IS NOT NULL "
    "ORDER BY s2.start_ns LIMIT 1) FROM spans GROUP BY trace_id ORDER BY MIN(start_ns) DESC")


def step_spans(rng: random.Random, i: int, events: int) -> tuple[cl.StepEvent, list[StoredSpan]]:
    """Step ``i``: its event and its six spans."""
    start_s = BASE_S + i * (DAYS * 86_400.0 / events)
    t0 = int(start_s * 1e9)
    trace = f"{rng.getrandbits(128):032x}"
    task = TASK_TYPES[i % len(TASK_TYPES)]
    failed = rng.random() < 0.2
    outcome = "failed" if failed else "succeeded"
    ids = [f"{rng.getrandbits(64):016x}" for _ in range(SPANS_PER_STEP)]
    base = {"closedloop.task_type": task}

    def span(k: int, parent: int | None, name: str, times: tuple[int, int],
             attributes: dict[str, Any], *, content: dict[str, str] | None = None
             ) -> StoredSpan:
        return StoredSpan(trace_id=trace, span_id=ids[k],
                          parent_id=None if parent is None else ids[parent], name=name, kind=0,
                          start_ns=t0 + times[0], end_ns=t0 + times[1],
                          status=2 if failed and k == 0 else 0,
                          status_message="verification failed" if failed and k == 0 else None,
                          attributes=attributes, content=content or {})

    region = rng.choice(("eu-west-1", "us-east-1", "mars-1"))
    spans = [
        span(2, 1, "invoke_agent agent", (20_000, 900_000),
             {"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": "agent",
              "gen_ai.usage.input_tokens": 420, "gen_ai.usage.output_tokens": 64},
             content={"closedloop.input": json.dumps({"want": f"vm-{i}", "region": region}),
              "closedloop.proposal": json.dumps({"instance_type": "t3.large",
                                                 "region": region, "tags": {"env": "dev"}})}),
        span(3, 1, "closedloop.validate", (900_000, 950_000),
             {**base, "closedloop.check": "schema", "closedloop.verdict.passed": True}),
        span(1, 0, "closedloop.attempt", (10_000, 960_000), {**base, "closedloop.attempt": 1}),
        span(4, 0, "closedloop.act", (970_000, 8_000_000), base,
             content={"closedloop.result": json.dumps({"id": f"i-{i:017x}", "region": region})}),
        span(5, 0, "closedloop.verify", (8_010_000, 9_000_000),
             {**base, "closedloop.check": "landed", "closedloop.verdict.passed": not failed}),
        span(0, None, "closedloop.step", (0, 9_100_000),
             {**base, "closedloop.agent_id": "agent", "closedloop.autonomy": "autonomous",
              "closedloop.outcome": outcome, "closedloop.attempts": 1,
              "closedloop.usage.input_tokens": 420, "closedloop.usage.output_tokens": 64}),
    ]
    event = cl.StepEvent(
        ts=start_s, trace_id=trace, agent_id="agent", task_type=task, autonomy="autonomous",
        outcome=outcome, attempts=1, input_tokens=420, output_tokens=64, latency_ms=9.1,
        validation_passed=True, verification_passed=not failed,
        error_type="verification" if failed else None,
        error_message=f"instance i-{i:017x} landed in nowhere" if failed else None,
        propose_ms=0.9, validate_ms=0.05, act_ms=7.0, verify_ms=1.0, detail=None)
    return event, spans


def _spans(store: cl.Store) -> SpanStore:
    assert isinstance(store.backend, SpanBackend)
    return store.backend.span_store()


def build(url: str, events: int) -> None:
    """Write ``events`` steps with their spans, and 10k scores, into the store at ``url``."""
    rng = random.Random(7)
    store = cl.open_store(url)
    backend, spans = store.backend, _spans(store)
    started = time.perf_counter()
    span_s = 0.0
    traces: list[str] = []
    for first in range(0, events, BATCH_STEPS):
        batch = [step_spans(rng, i, events) for i in range(first, min(events, first + BATCH_STEPS))]
        backend.write_batch([e for e, _ in batch])
        t = time.perf_counter()
        spans.write_spans([s for _, ss in batch for s in ss])
        span_s += time.perf_counter() - t
        traces += [e.trace_id for e, _ in batch[:10]]
        if first % 100_000 == 0:
            print(f"  {first:,} steps written ({time.perf_counter() - started:.0f} s)",
                  flush=True)
    for k in range(10_000):
        spans.add_score(Score(trace_id=rng.choice(traces), name="quality", value=rng.random(),
                              label=rng.choice(("good", "bad", None)), ts=BASE_S + k * 60.0))
    total = time.perf_counter() - started
    print(f"  built in {total:.0f} s; span batches: {events * SPANS_PER_STEP / span_s:,.0f} "
          f"spans/s through write_spans", flush=True)
    store.close()


def cached(url: str, events: int, *, migrate: bool = True) -> bool:
    """True when the store at ``url`` already holds the bench's data (then migrated to this
    version's schema, as an upgraded store would be, unless ``migrate`` is false)."""
    try:
        store = cl.open_store(url, create=False, read_only=not migrate)
    except cl.StoreError:
        return False
    try:
        spans = _spans(store)
        return (store.count() == events
                and spans.span_cursor() >= events * SPANS_PER_STEP
                and len(spans.scores(name="quality", since=BASE_S + 9_999 * 60.0)) == 1)
    finally:
        store.close()


def median(rounds: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def process(rounds: int, command: list[str], env: dict[str, str]) -> str:
    """Median wall time and CPU time (user + system) of running ``command`` as a process.

    CPU time is what the command costs; on a loaded machine the wall time adds the wait for
    a core."""
    walls, cpus = [], []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, env=env, check=True)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return (f"{statistics.median(walls) * 1e3:8.2f} ms wall, "
            f"{statistics.median(cpus) * 1e3:6.1f} ms CPU")


def measure(name: str, url: str, rounds: int, *, before: bool, migrate: bool = True) -> None:
    store = cl.open_store(url, read_only=url.startswith("sqlite") or not migrate, create=False)
    spans = _spans(store)
    page = spans.traces(limit=20)
    assert len(page.traces) == 20 and page.next_cursor is not None
    cursor = page.next_cursor
    for _ in range(99):
        cursor = spans.traces(limit=20, cursor=cursor).next_cursor or cursor
    print(f"{name}:")
    print(f"  traces(limit=20):                    {median(rounds, spans.traces) * 1e3:8.2f} ms")
    print(f"  traces(limit=20, task_type=...):     "
          f"{median(rounds, lambda: spans.traces(task_type='sql.migrate')) * 1e3:8.2f} ms")
    print(f"  traces(limit=20, cursor=page 101):   "
          f"{median(rounds, lambda: spans.traces(cursor=cursor)) * 1e3:8.2f} ms")
    command = [sys.executable, "-m", "closedloop", "traces", "list", "--store", url]
    # as installed: modules load from cached bytecode (the warm-up run below writes it)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["COLUMNS"] = "150"
    out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert out.stdout.count("\n") > 20, out.stdout
    print(f"  `closedloop traces list` (process):  {process(rounds, command, env)}")
    print(f"  the same with --json:                "
          f"{process(rounds, [*command, '--json'], env)}")
    version = [sys.executable, "-m", "closedloop", "--version"]
    print(f"     of which `closedloop --version`:  {process(rounds, version, env)}")
    summary = median(max(1, rounds // 3), spans.score_summary)
    print(f"  score_summary() (all 1M events):     {summary * 1e3:8.2f} ms")
    if before and url.startswith("sqlite"):
        import sqlite3

        db = sqlite3.connect(f"file:{url[len('sqlite:///'):]}?mode=ro", uri=True)
        old = median(1, lambda: db.execute(OLD_SQL).fetchmany(20))
        db.close()
        print(f"  before: GROUP BY over every span:    {old * 1e3:8.2f} ms")
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the stores' names: a branch with "
                        "a newer schema keeps stores of its own instead of migrating shared ones")
    parser.add_argument("--cache", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser()
                        / "closedloop-bench")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rebuild", action="store_true", help="Build the stores again.")
    parser.add_argument("--no-migrate", action="store_true",
                        help="Read the stores as they are (read-only): a branch with a newer "
                             "schema leaves shared stores openable by older code.")
    parser.add_argument("--before", action="store_true",
                        help="Also time the listing as it was before (minutes on 1M steps).")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    db = args.cache / f"traces-{args.events}{args.tag}.db"
    schema = f"closedloop_bench_traces_{args.events}{args.tag}"
    stores = [] if args.no_sqlite else [("SQLite", f"sqlite:///{db}")]
    if not args.no_pg:
        stores.append(("PostgreSQL", f"{args.pg}?schema={schema}"))
    print(f"{args.events:,} steps, {args.events * SPANS_PER_STEP:,} spans; load "
          f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    for name, url in stores:
        if args.rebuild and name == "SQLite":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        if args.rebuild and name == "PostgreSQL":
            import psycopg

            with psycopg.connect(args.pg, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if not cached(url, args.events, migrate=not args.no_migrate):
            print(f"building the {name} store (once) ...", flush=True)
            build(url, args.events)
    for name, url in stores:
        measure(name, url, args.rounds, before=args.before, migrate=not args.no_migrate)
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
