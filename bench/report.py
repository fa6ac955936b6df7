"""``closedloop report`` at scale, and the cost of its failure-message groups.

``python bench/report.py stores`` (options: ``--events``, ``--rounds``, ``--cache``, ``--pg``,
``--baseline``, ``--tag``, ``--backends``: which stores, ``sqlite,postgresql`` by default):
builds ``--events`` (1,000,000) synthetic events once in a SQLite
file (``--cache``, default ``~/.cache/closedloop-bench``) and in a PostgreSQL schema of their
own (``closedloop_bench_report_<events>`` in ``--pg``), both through the store's own write
path, and reuses them on later runs while they hold exactly that many events (migrated to
this version's schema); ``--rebuild`` starts afresh, ``--drop`` drops the schema at the end,
``--tag SUFFIX`` names the stores apart (a branch with a newer schema would migrate shared
ones, which older code then cannot open). Then it times ``report_from_store`` (what
``closedloop report`` calls; median of ``--rounds``, the store opened as the command opens
it) and the whole command once (``python -m closedloop report --store URL``, a fresh
process), on each backend; ``--baseline`` also times the Python pass over the same events
(what the report did before it was computed in the database). The events: five task types
over 30 days (one every 2.6 s), 70 % succeeded, 15 % failed verification, 10 % failed
validation, 5 % agent errors, each failure with a demo-shaped message, log-normal latencies
(median 20 ms).

``python bench/report.py html`` (options: ``--events``, ``--rounds``, ``--cache``, ``--tag``):
times :func:`closedloop.learn.html_report` (what ``closedloop report --html FILE`` calls: the
report, trends per day, failure clusters and factors, rendered to one page) on the same SQLite
store (built as ``stores`` builds it, or reused), median of ``--rounds`` with this process's CPU
time, then the whole command once in a fresh process; prints the page's size.

``python bench/report.py ingest`` (options: ``--events``, ``--rounds``, ``--pg``): times the
backends' ``write_batch`` alone over 300,000 of the same events (batches of 4096, fresh
stores), events per second and the CPU time of this process per event; run it with
``PYTHONPATH`` pointing at the code before and after a change to see what indexes cost.

``python bench/report.py`` (or ``grouping``; options: ``--events``, ``--failed``,
``--rounds``): ``build_report`` is one pass over the events; grouping failure messages (every
word holding a digit replaced by ``<*>``) adds a regular expression per failed step. This times
the pass over the same synthetic events twice — once with each failed step's message, once
with its message removed — and reports both per event and the extra cost per failed step. The
messages are shaped like the demo's (instance ids, instance types, tag values, line numbers).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import closedloop as cl
from closedloop import StepEvent
from closedloop.learn import build_report, report_from_store

TEMPLATES = (
    "instance_matches_request: [error] instance_type at instance.instance_type: "
    "i-{id} is a {a}.large, requested {b}.xlarge",
    "instance_matches_request: [error] tag_missing at instance.tags.env: i-{id} has no tag "
    "'env' (wanted 'staging')",
    "plan_schema: [error] json_invalid at plan: Invalid JSON: trailing comma at line 1 "
    "column {n}",
    "instance_matches_request: [error] tag_wrong at instance.tags.cost-center: i-{id} has tag "
    "cost-center='cc-{n}-x', wanted 'cc-{n}'",
)


def events(count: int, failed: float, *, messages: bool, seed: int = 7) -> list[StepEvent]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        fails = rng.random() < failed
        message = None
        if fails and messages:
            message = rng.choice(TEMPLATES).format(
                id=f"{rng.getrandbits(68):017x}", a=rng.choice(("t3", "m5", "c5")),
                b=rng.choice(("t3", "m5", "c5")), n=rng.randrange(1000))
        out.append(StepEvent(
            float(i), f"{i:032x}", "agent", f"task{i % 5}", "autonomous",
            "failed" if fails else "succeeded", 1 + (i % 3 == 0), 420, 64, 12.5,
            True, not fails, "verification" if fails else None, message,
            1.0, 1.0, 1.0, 1.0, None))
    return out


def median_time(rounds: int, data: list[StepEvent]) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        build_report(data)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grouping(args: argparse.Namespace) -> None:
    with_messages = events(args.events, args.failed, messages=True)
    without = events(args.events, args.failed, messages=False)
    failed = sum(e.error_message is not None for e in with_messages)
    plain = median_time(args.rounds, without)
    grouped = median_time(args.rounds, with_messages)
    groups = len(build_report(with_messages, top_messages=10_000).overall.top_messages)
    print(f"{args.events:,} events, {failed:,} failed with a message, {groups} groups")
    print(f"report without messages: {plain * 1e6 / args.events:.2f} µs/event")
    print(f"report with messages:    {grouped * 1e6 / args.events:.2f} µs/event "
          f"(+{(grouped - plain) * 1e6 / failed:.2f} µs per failed step)")


# ----- stores -------------------------------------------------------------------------------

PG = "postgresql://postgres@127.0.0.1:5432/test"
T0 = 1_790_000_000.0
TASKS = tuple(f"task{i}" for i in range(5))


def store_events(count: int, seed: int = 11) -> Iterator[StepEvent]:
    """The stores' events (see the module's docstring), oldest first."""
    rng = random.Random(seed)
    for i in range(count):
        r = rng.random()
        latency = rng.lognormvariate(3.0, 1.0)
        attempts = 1 + (rng.random() < 0.2)
        message: str | None = None
        validation: bool | None = True
        verification: bool | None = True
        error: str | None = None
        outcome = "succeeded"
        if r >= 0.7:
            outcome = "failed"
            if r < 0.85:
                verification, error = False, "verification"
                message = rng.choice(TEMPLATES).format(
                    id=f"{rng.getrandbits(68):017x}", a=rng.choice(("t3", "m5", "c5")),
                    b=rng.choice(("t3", "m5", "c5")), n=rng.randrange(1000))
            elif r < 0.95:
                validation, verification, error = False, None, "validation"
                message = (f"plan_schema: [error] required at plan.tags: 'owner' is required "
                           f"(attempt {attempts})")
            else:
                outcome, validation, verification, error = "error", None, None, "agent"
                message = "RuntimeError: model timed out"
        yield StepEvent(
            T0 + i * 2.6, f"{i:032x}", "bench-agent", TASKS[i % len(TASKS)], "autonomous",
            outcome, attempts, 300 + rng.randrange(400), 40 + rng.randrange(80), latency,
            validation, verification, error, message, latency * 0.6, 0.5, latency * 0.3, 0.5,
            None if message is None else {"issues": [{"message": message}]})


def ensure(url: str, count: int, rebuild: bool,
           make: Callable[[int], Iterator[StepEvent]] | None = None) -> float | None:
    """Fill the store at ``url`` with ``count`` events (``make(count)``, default
    :func:`store_events`) unless it holds exactly that many; the ingest rate when it was
    filled now."""
    if not rebuild:
        try:
            with cl.open_store(url, create=False) as store:  # migrates an older bench store
                if store.count() == count:
                    return None
        except cl.StoreError:
            pass
    reset(url)
    start = time.perf_counter()
    with cl.open_store(url, overflow="block", block_timeout=600.0) as store:
        for event in (make or store_events)(count):
            store.record(event)
        assert store.flush(timeout=None)
        assert store.count() == count
    rate = count / (time.perf_counter() - start)
    if url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(url.split("?", maxsplit=1)[0], autocommit=True) as conn:
            # what autovacuum does by itself a little later: statistics, visibility map
            conn.execute(f'VACUUM ANALYZE "{schema_of(url)}".events')
    return rate


def schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


def reset(url: str) -> None:
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink(missing_ok=True)
        return
    import psycopg

    with psycopg.connect(url.split("?", maxsplit=1)[0], autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema_of(url)}" CASCADE')


def time_report(url: str, rounds: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds (of this process: with SQLite, all of the work) per round."""
    times, cpu = [], []
    for _ in range(rounds):
        start, used = time.perf_counter(), time.process_time()
        with cl.open_store(url, read_only=url.startswith("sqlite"), create=False) as store:
            report = report_from_store(store)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - used)
        assert report.overall.runs > 0
    return times, cpu


def time_baseline(url: str) -> float:
    start = time.perf_counter()
    with cl.open_store(url, read_only=url.startswith("sqlite"), create=False) as store:
        build_report(store.events())
    return time.perf_counter() - start


def time_cli(url: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "closedloop", "report", "--store", url],
                   check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def ingest(args: argparse.Namespace) -> None:
    """``write_batch`` alone over the stores' events (batches of 4096), per backend: what the
    summary's indexes cost the writer. Run it with the code before and after (PYTHONPATH)."""
    from closedloop.store import open_backend

    batch = list(store_events(args.events))
    sep = "&" if "?" in args.pg else "?"
    with tempfile.TemporaryDirectory() as tmp:
        urls = {"sqlite": f"sqlite:///{tmp}/ingest.db",
                "postgresql": f"{args.pg}{sep}schema=closedloop_bench_ingest"}
        for _ in range(args.rounds):
            for kind, url in urls.items():
                reset(url)
                backend = open_backend(url)
                backend.write_batch(batch[:1])  # the first day's partition exists
                start, cpu = time.perf_counter(), time.process_time()
                for i in range(1, len(batch), 4096):
                    backend.write_batch(batch[i:i + 4096])
                elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
                backend.close()
                print(f"{kind:10} {(len(batch) - 1) / elapsed:9,.0f} events/s, "
                      f"{cpu * 1e6 / (len(batch) - 1):5.1f} µs CPU/event in this process "
                      f"(load {os.getloadavg()[0]:.2f})")
        reset(urls["postgresql"])


def stores(args: argparse.Namespace) -> None:
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    sep = "&" if "?" in args.pg else "?"
    tag = args.tag
    urls = {"sqlite": f"sqlite:///{cache / f'report-{args.events}{tag}.db'}",
            "postgresql": f"{args.pg}{sep}schema=closedloop_bench_report_{args.events}{tag}"}
    urls = {kind: url for kind, url in urls.items() if kind in args.backends.split(",")}
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}, "
          f"{args.events:,} events, load {os.getloadavg()[0]:.2f}")
    try:
        for kind, url in urls.items():
            rate = ensure(url, args.events, args.rebuild)
            built = "reused" if rate is None else f"built at {rate:,.0f} events/s"
            times, cpu = time_report(url, args.rounds)
            print(f"{kind:10} report_from_store median {statistics.median(times):.3f} s "
                  f"(min {min(times):.3f}, max {max(times):.3f}, {args.rounds} rounds; "
                  f"CPU of this process median {statistics.median(cpu):.3f} s; "
                  f"store {built}; load {os.getloadavg()[0]:.2f})")
            print(f"{kind:10} closedloop report (whole process) {time_cli(url):.3f} s")
            if args.baseline:
                print(f"{kind:10} Python pass over the events {time_baseline(url):.3f} s")
    finally:
        if args.drop and "postgresql" in urls:
            reset(urls["postgresql"])


def html(args: argparse.Namespace) -> None:
    """``report --html`` on the SQLite store of ``stores``."""
    from closedloop.learn import html_report

    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{cache / f'report-{args.events}{args.tag}.db'}"
    rate = ensure(url, args.events, rebuild=False)
    print(f"python {sys.version.split()[0]}, closedloop {cl.__version__}, "
          f"{args.events:,} events ({'reused' if rate is None else 'built'}), "
          f"load {os.getloadavg()[0]:.2f}")
    times, cpu, size = [], [], 0
    for _ in range(args.rounds):
        start, used = time.perf_counter(), time.process_time()
        with cl.open_store(url, read_only=True, create=False) as store:
            page = html_report(store)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - used)
        size = len(page.encode())
    print(f"html_report median {statistics.median(times):.3f} s (min {min(times):.3f}, max "
          f"{max(times):.3f}, {args.rounds} rounds; CPU of this process median "
          f"{statistics.median(cpu):.3f} s; page {size / 1024:,.0f} KiB; "
          f"load {os.getloadavg()[0]:.2f})")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "closedloop", "report", "--store", url, "--html",
                        str(Path(tmp) / "report.html")], check=True, stdout=subprocess.DEVNULL,
                       env=env)
        print(f"closedloop report --html (whole process) {time.perf_counter() - start:.3f} s; "
              f"load {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = parser.add_subparsers(dest="mode")
    group = modes.add_parser("grouping", help="the cost of grouping failure messages")
    scale = modes.add_parser("stores", help="closedloop report on 1M events, both backends")
    for p, count in ((parser, 200_000), (group, 200_000)):
        p.add_argument("--events", type=int, default=count)
        p.add_argument("--failed", type=float, default=0.3, help="share of failed steps")
        p.add_argument("--rounds", type=int, default=7)
    scale.add_argument("--events", type=int, default=1_000_000)
    scale.add_argument("--rounds", type=int, default=5)
    scale.add_argument("--cache", default="~/.cache/closedloop-bench")
    scale.add_argument("--pg", default=PG, help="PostgreSQL URL (a schema of its own is used)")
    scale.add_argument("--rebuild", action="store_true", help="build the stores afresh")
    scale.add_argument("--drop", action="store_true", help="drop the PostgreSQL schema after")
    scale.add_argument("--baseline", action="store_true", help="also time the Python pass")
    scale.add_argument("--backends", default="sqlite,postgresql",
                       help="which stores to time, comma-separated")
    scale.add_argument("--tag", default="", help="suffix of the stores' names: a branch with "
                       "a newer schema keeps stores of its own instead of migrating shared ones")
    page = modes.add_parser("html", help="closedloop report --html on 1M events (SQLite)")
    page.add_argument("--events", type=int, default=1_000_000)
    page.add_argument("--rounds", type=int, default=3)
    page.add_argument("--cache", default="~/.cache/closedloop-bench")
    page.add_argument("--tag", default="")
    writes = modes.add_parser("ingest", help="what the summary's indexes cost the writer")
    writes.add_argument("--events", type=int, default=300_000)
    writes.add_argument("--rounds", type=int, default=3)
    writes.add_argument("--pg", default=PG, help="PostgreSQL URL (a schema of its own is used)")
    args = parser.parse_args()
    if args.mode == "stores":
        stores(args)
    elif args.mode == "html":
        html(args)
    elif args.mode == "ingest":
        ingest(args)
    else:
        grouping(args)


if __name__ == "__main__":
    main()
