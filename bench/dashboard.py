"""Server time of each dashboard page on a large store, SQLite and PostgreSQL.

``PYTHONPATH=src python bench/dashboard.py [--rounds 5] [--events N] [--pg URL | --no-pg]
[--store URL ...] [--tag SUFFIX]`` builds (once; reused while it holds exactly ``--events``)
a store of ``--events`` (1,000,000) events on each backend, as ``bench/report.py stores``
builds its own (five task types over 30 days; :func:`report.ensure`), plus ``--requests``
(2,000) approval requests, nine in ten decided: a SQLite file
``dashboard-<events><tag>.db`` in ``~/.cache/closedloop-bench`` and the PostgreSQL schema
``closedloop_bench_dashboard_<events><tag>`` of ``--pg``'s database; ``--store URL`` (repeated)
measures those stores instead. On each it builds the app ``closedloop serve`` runs
(``create_app(dashboard=True)``) and requests each page in-process (httpx's ASGI transport:
no socket, no browser), reporting per page the median wall time and the median CPU time of
this process over ``--rounds`` after one warm-up (the warm-up's wall time shown apart: on
SQLite the first overview folds the events into the hourly roll-up its trend reads, once
per store, see ``closedloop.store.sqlite._rollup``). With PostgreSQL the database's own
work is in the wall time only. The app may write to the store (it settles due approvals and
keeps the roll-up): use the bench's own stores, not one that matters.

``--now newest`` (the default) runs the pages as if it were an hour after the newest stored
step (``time.time`` is shifted for this process), so that the overview's and the learning
pages' last 24 hours, 7 and 30 days hold steps whatever day the bench's fixed-time stores
are read on; ``--now real`` reads them at the real time (their windows may then be empty).
The shift is the same for any tree the bench runs against (``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

import closedloop as cl
from closedloop.web import create_app

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import PG, ensure

PAGES = ("/ui/", "/ui/?window=24h", "/ui/?window=30d", "/ui/?window=all", "/ui/steps",
         "/ui/steps?outcome=failed", "/ui/traces", "/ui/approvals", "/ui/control",
         "/ui/steps?model=nothing", "/ui/steps?label=tier%3Dnothing&since=60d",
         "/ui/steps?since=60d&until=50d", "/ui/runs", "/ui/failures", "/ui/failures?window=all",
         "/ui/factors", "/ui/factors?window=all", "/ui/autonomy")
_LINK = re.compile(r'href="(/ui/(?:traces|approvals)/[0-9a-f]+)"')


def with_requests(url: str, count: int) -> None:
    """Give the store ``count`` approval requests (one in ten still pending, the rest decided)
    unless it has them: the approvals pages' queue and decided list."""
    from closedloop._approvals import new_request
    from closedloop.approvals import approvals_for, list_requests

    with cl.open_store(url) as store:
        have = 0
        cursor = None
        while True:
            page = list_requests(limit=200, cursor=cursor, store=store)
            have += len(page.requests)
            if page.next_cursor is None or have >= count:
                break
            cursor = page.next_cursor
        approvals = approvals_for(store)
        for i in range(have, count):
            made = approvals.create(new_request(
                task_type=f"task{i % 5}", agent_id="bench-agent",
                proposal={"action": "run_instances", "count": 1 + i % 3, "i": i},
                task_input={"ask": f"web server {i}"}, requested_by="bench-agent@host",
                verdicts=[{"check": "tags", "passed": True}],
                risk={"summary": "creates instances", "destructive": i % 7 == 0}))
            if i % 10:
                approvals.decide(made.request_id, approve=i % 3 != 0, by="alice",
                                 reason="bench")


def _linked(html: str) -> list[str]:
    """The first trace or request page a listing links to (none on a store without)."""
    found = _LINK.search(html)
    return [] if found is None else [found.group(1)]


async def measure(url: str, rounds: int, only: str | None = None
                  ) -> list[tuple[str, float, float, int, float]]:
    store = cl.open_store(url)
    app = create_app(store=store, dashboard=True)
    out = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        steps = await http.get("/ui/steps")
        cursor_page = steps.text.split('rel="next" href="/ui/steps')[1].split('"')[0]
        traces = await http.get("/ui/traces")
        waiting = await http.get("/ui/approvals")
        pages = (*PAGES, "/ui/steps" + cursor_page.replace("&amp;", "&"),
                 *_linked(steps.text), *_linked(traces.text), *_linked(waiting.text))
        for path in pages:
            if only is not None and not re.search(only, path):
                continue
            walls, cpus = [], []
            status, first = 0, 0.0
            for i in range(rounds + 1):
                w0, c0 = time.perf_counter(), time.process_time()
                answer = await http.get(path)
                w1, c1 = time.perf_counter(), time.process_time()
                status = answer.status_code
                if i:
                    walls.append(w1 - w0)
                    cpus.append(c1 - c0)
                else:
                    first = w1 - w0
            out.append((path, statistics.median(walls) * 1000, statistics.median(cpus) * 1000,
                        status, first * 1000))
    if only is None:
        out.append(_live_poll(store, rounds))
    store.close()
    return out


def _live_poll(store: cl.Store, rounds: int) -> tuple[str, float, float, int, float]:
    """What one live stream's poll costs when nothing is new: ``steps_after`` the newest."""
    head = store.steps(limit=50).head_cursor
    walls, cpus = [], []
    for i in range(rounds + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        store.steps_after(head, limit=50)
        w1, c1 = time.perf_counter(), time.process_time()
        if i:
            walls.append(w1 - w0)
            cpus.append(c1 - c0)
    return ("(live poll: Store.steps_after the newest step)",
            statistics.median(walls) * 1000, statistics.median(cpus) * 1000, 0, 0.0)


def shift_clock(url: str) -> float:
    """Make ``time.time`` read an hour after the newest step of ``url``; the shift (s)."""
    with cl.open_store(url) as store:
        newest = store.steps(limit=1).steps
    if not newest:
        return 0.0
    shift = time.time() - (newest[0].ts + 3600.0)
    real = _REAL_TIME
    time.time = lambda: real() - shift
    return shift


_REAL_TIME = time.time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", action="append", default=[],
                        help="measure this store (repeatable) instead of the bench's own")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--cache", default="~/.cache/closedloop-bench")
    parser.add_argument("--pg", default=PG, help="PostgreSQL URL (a schema of its own is used)")
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    parser.add_argument("--tag", default="", help="suffix of the stores' names")
    parser.add_argument("--requests", type=int, default=2000,
                        help="approval requests the bench's stores hold")
    parser.add_argument("--only", help="measure only the pages matching this regex")
    parser.add_argument("--now", choices=("newest", "real"), default="newest",
                        help="ask the pages as if it were an hour after the newest step "
                             "(default), or at the real time")
    args = parser.parse_args()
    urls = list(args.store)
    if not urls:
        cache = Path(args.cache).expanduser()
        cache.mkdir(parents=True, exist_ok=True)
        urls.append(f"sqlite:///{cache / f'dashboard-{args.events}{args.tag}.db'}")
        if not args.no_pg:
            sep = "&" if "?" in args.pg else "?"
            urls.append(f"{args.pg}{sep}schema=closedloop_bench_dashboard_{args.events}"
                        f"{args.tag}")
        for url in urls:
            rate = ensure(url, args.events, rebuild=False)
            if rate is not None:
                print(f"built {url} at {rate:,.0f} events/s")
            with_requests(url, args.requests)
    for url in urls:
        with cl.open_store(url) as store:
            events = store.count()
        time.time = _REAL_TIME
        shift = shift_clock(url) if args.now == "newest" else 0.0
        print(f"{events:,} events in {url} (load {os.getloadavg()[0]:.2f}; the clock "
              f"{shift / 86400:,.1f} days back)")
        for path, wall, cpu, status, first in asyncio.run(measure(url, args.rounds,
                                                                   args.only)):
            print(f"{path[:60]:60} {status}  wall {wall:9.1f} ms  cpu {cpu:9.1f} ms  (first "
                  f"request {first:,.0f} ms)")
        print(f"(load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
