"""``closedloop trends``, ``failures`` and ``factors`` on a million events; cluster purity on
the demo's seeded faults.

``python bench/learn.py stores`` (options: ``--events``, ``--rounds``, ``--cache``, ``--pg``,
``--rebuild``, ``--drop``, ``--tag``, ``--backends``): builds ``--events`` (1,000,000)
synthetic events of schema v3 once
in a SQLite file (``--cache``, default ``~/.cache/closedloop-bench/learn-<events>.db``) and in
a PostgreSQL schema of their own (``closedloop_bench_learn_<events>``), through the store's
own write path, and reuses them while they hold exactly that many events (``--tag=_x``
names them ``learn_x-…``: a branch whose schema is newer keeps its own). It times the first
query through a writable handle (it folds the events into the hourly roll-up that trends,
failure clusters and factors read, once per store and dimension; see
``closedloop.store.sqlite._rollup`` and ``closedloop.store.postgres._rollup``), then, on
each backend (median of ``--rounds``, wall and this process's CPU, the store opened read-only
as the commands open it), over every event of the store:

- ``trends`` by task type, by model and by a label (``label:tier``), daily;
- ``failure_clusters`` (what ``closedloop failures`` calls), daily trend;
- ``factors`` of one task type (a fifth of the events) and of every task type.

The events: five task types over 30 days (one every 2.6 s), three models (one fails half again
as often), two agent versions, two prompt versions (the newer one, from day 20 on, fails
verification more), labels ``tier`` and ``region``, a cost per step; 70 % succeed, the rest
fail verification, validation or raise, with demo-shaped messages and exception messages of
six kinds (ids, hosts and durations varying), log-normal latencies.

``python bench/learn.py purity`` (options: ``--requests``, ``--seed``): runs the demo (real
boto3 against moto) and measures the failure clusters against the simulated model's ledger:
purity (share of failed steps whose cluster's most common fault kind is their own) and
inverse purity (share whose kind's most common cluster is their own).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import closedloop as cl
from closedloop import StepEvent
from closedloop.learn import cluster_purity, factors, failure_clusters, trends

sys.path.insert(0, str(Path(__file__).parent))
from report import PG, TEMPLATES, ensure, reset

T0 = 1_790_000_000.0
TASKS = tuple(f"task{i}" for i in range(5))
MODELS = ("model-a", "model-b", "model-c")
EXCEPTIONS = (
    "TimeoutError: model call timed out after {n} s",
    "ConnectionError: upstream 10.0.{a}.{b}:443 refused the connection",
    "RateLimitError: 429 Too Many Requests, retry after {n} ms",
    "KeyError: 'instance_type'",
    "botocore.exceptions.ClientError: An error occurred (InsufficientInstanceCapacity) when "
    "calling the RunInstances operation: no capacity for {t}.large in us-east-1{z}",
    "ValueError: could not parse plan of {n} bytes",
)


def learn_events(count: int, seed: int = 13) -> Iterator[StepEvent]:
    """The stores' events (see the module's docstring), oldest first."""
    rng = random.Random(seed)
    for i in range(count):
        ts = T0 + i * 2.6
        day = i * 2.6 / 86400
        model = MODELS[rng.randrange(3)]
        prompt = "p2" if day >= 20 else "p1"
        fail_more = (1.5 if model == "model-c" else 1.0) * (1.3 if prompt == "p2" else 1.0)
        r = rng.random()
        latency = rng.lognormvariate(3.0, 1.0)
        attempts = 1 + (rng.random() < 0.2)
        message: str | None = None
        validation: bool | None = True
        verification: bool | None = True
        error: str | None = None
        outcome = "succeeded"
        if r < 0.15 * fail_more:
            outcome, verification, error = "failed", False, "verification"
            message = rng.choice(TEMPLATES).format(
                id=f"{rng.getrandbits(68):017x}", a=rng.choice(("t3", "m5", "c5")),
                b=rng.choice(("t3", "m5", "c5")), n=rng.randrange(1000))
        elif r < 0.25 * fail_more:
            outcome, validation, verification, error = "failed", False, None, "validation"
            message = (f"plan_schema: [error] missing at plan.{rng.choice(('tags', 'count'))}: "
                       "Field required")
        elif r < 0.30 * fail_more:
            outcome, validation, verification, error = "error", None, None, "agent"
            message = rng.choice(EXCEPTIONS).format(
                n=rng.randrange(1, 5000), a=rng.randrange(256), b=rng.randrange(256),
                t=rng.choice(("t3", "m5", "c5")), z=rng.choice("abcdef"))
        tokens_in, tokens_out = 300 + rng.randrange(400), 40 + rng.randrange(80)
        yield StepEvent(
            ts, f"{i:032x}", "bench-agent", TASKS[i % len(TASKS)], "autonomous", outcome,
            attempts, tokens_in, tokens_out, latency, validation, verification, error, message,
            latency * 0.6, 0.5, latency * 0.3, 0.5,
            None if message is None else {"issues": [{"message": message}]},
            model=model, provider="bench", agent_version=rng.choice(("1.4", "1.5")),
            prompt_version=prompt,
            labels={"tier": rng.choice(("free", "pro", "enterprise")),
                    "region": rng.choice(("eu", "us"))},
            cost_usd=(tokens_in * 3 + tokens_out * 15) / 1e6)


def timed(rounds: int, work: Callable[[], Any]) -> tuple[float, float, Any]:
    times, cpu, result = [], [], None
    for _ in range(rounds):
        start, used = time.perf_counter(), time.process_time()
        result = work()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - used)
    return statistics.median(times), statistics.median(cpu), result


def stores(args: argparse.Namespace) -> None:
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    sep = "&" if "?" in args.pg else "?"
    urls = {"sqlite": f"sqlite:///{cache / f'learn{args.tag}-{args.events}.db'}",
            "postgresql": f"{args.pg}{sep}schema=closedloop_bench_learn{args.tag}_{args.events}"}
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}, "
          f"{args.events:,} events, load {os.getloadavg()[0]:.2f}")
    try:
        for kind, url in urls.items():
            if kind not in args.backends.split(","):
                continue
            rate = ensure(url, args.events, args.rebuild, learn_events)
            built = "reused" if rate is None else f"built at {rate:,.0f} events/s"
            print(f"{kind:10} store {built}")
            with cl.open_store(url, create=False) as writable:
                # a writable query folds what its roll-up lacks in (SQLite; once per store
                # and dimension, then the rows written since)
                for what, query in (
                        ("steps per period", lambda s=writable: s.period_steps()),
                        ("failures", lambda s=writable: s.failure_counts()),
                        ("series by model", lambda s=writable: s.series(by="model")),
                        ("series by label:tier",
                         lambda s=writable: s.series(by="label:tier")),
                        ("factor margins", lambda s=writable: s.factor_margins())):
                    wall, cpu, _ = timed(1, query)
                    print(f"{kind:10} first writable query: {what:22} {wall:.3f} s (CPU of "
                          f"this process {cpu:.3f} s; load {os.getloadavg()[0]:.2f})")
            store = cl.open_store(url, read_only=kind == "sqlite", create=False)
            jobs: dict[str, Callable[[], Any]] = {
                "trends by task_type": lambda s=store: trends(s, since=0.0),
                "trends by model": lambda s=store: trends(s, by="model", since=0.0),
                "trends by label:tier": lambda s=store: trends(s, by="label:tier", since=0.0),
                "failure clusters": lambda s=store: failure_clusters(s),
                "factors of task1": lambda s=store: factors(s, task_type="task1"),
                "factors of every task": lambda s=store: factors(s),
            }
            try:
                for name, job in jobs.items():
                    wall, cpu, result = timed(args.rounds, job)
                    print(f"{kind:10} {name:22} median {wall:.3f} s (CPU of this process "
                          f"{cpu:.3f} s; {args.rounds} rounds; load "
                          f"{os.getloadavg()[0]:.2f}) {describe(result)}")
            finally:
                store.close()
    finally:
        if args.drop and "postgresql" in args.backends:
            reset(urls["postgresql"])


def describe(result: Any) -> str:
    if hasattr(result, "series"):
        return f"[{len(result.series)} series, {sum(s.steps for s in result.series):,} steps]"
    if hasattr(result, "clusters"):
        return f"[{len(result.clusters)} clusters of {result.failures:,} failures]"
    top = result.factors[0] if result.factors else None
    return (f"[{result.steps:,} steps; first: {top.dimension} explains "
            f"{top.explained:.1%}]" if top else f"[{result.steps:,} steps]")


def purity(args: argparse.Namespace) -> None:
    from closedloop.demo import run_demo

    store = cl.open_store("memory://")
    start = time.perf_counter()
    summary = run_demo(args.requests, seed=args.seed, store=store, traces=False)
    took = time.perf_counter() - start
    result = failure_clusters(store, top=1000)
    kind = {t: e[-1].kind for t, e in summary.ledger.by_trace().items()}
    failed = [(e.error_type, e.error_message,
               kind[e.trace_id].value if kind[e.trace_id] is not None else None)
              for e in store.events() if e.outcome in ("failed", "error", "blocked")]
    got = cluster_purity(result, failed)
    print(f"demo: {args.requests} requests, seed {args.seed} ({took:.0f} s); {got.failures} "
          f"failed steps in {got.clusters} clusters, {got.kinds} fault kinds")
    print(f"purity {got.purity:.3f}, inverse purity {got.inverse_purity:.3f}")
    for c in result.clusters:
        print(f"  {c.count:5}  {dict(got.table.get(c.id, {}))}  {c.title[:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    scale = modes.add_parser("stores", help="trends, clusters, factors on 1M events")
    scale.add_argument("--events", type=int, default=1_000_000)
    scale.add_argument("--rounds", type=int, default=5)
    scale.add_argument("--cache", default="~/.cache/closedloop-bench")
    scale.add_argument("--pg", default=PG, help="PostgreSQL URL (a schema of its own is used)")
    scale.add_argument("--rebuild", action="store_true", help="build the stores afresh")
    scale.add_argument("--drop", action="store_true", help="drop the PostgreSQL schema after")
    scale.add_argument("--backends", default="sqlite,postgresql", help="which to time")
    scale.add_argument("--tag", default="", help="names the stores apart (a branch's schema)")
    demo = modes.add_parser("purity", help="cluster purity on the demo's seeded faults")
    demo.add_argument("--requests", type=int, default=1000)
    demo.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if args.mode == "stores":
        stores(args)
    else:
        purity(args)


if __name__ == "__main__":
    main()
