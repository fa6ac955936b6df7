"""Server time of each dashboard page on a large store.

``PYTHONPATH=src python bench/dashboard.py --store sqlite:///PATH [--rounds 5]`` builds the app
``closedloop serve`` runs (``create_app(dashboard=True)``) on the store and requests each page
in-process (httpx's ASGI transport: no socket, no browser), reporting per page the median
wall time and the median CPU time of this process over ``--rounds`` after one warm-up (its
wall time shown apart: on SQLite the first overview folds the events into the hourly roll-up
its trend reads, once per store, see ``closedloop.store.sqlite._rollup``). Use a
copy of the 1M-event store of ``bench/report.py stores`` (``~/.cache/closedloop-bench``): the
store is opened read-write by the app.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import httpx

import closedloop as cl
from closedloop.web import create_app

PAGES = ("/ui/", "/ui/?window=24h", "/ui/?window=30d", "/ui/?window=all", "/ui/steps",
         "/ui/steps?outcome=failed", "/ui/traces", "/ui/approvals", "/ui/control")


async def measure(url: str, rounds: int) -> list[tuple[str, float, float, int, float]]:
    store = cl.open_store(url)
    app = create_app(store=store, dashboard=True)
    out = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
        steps = await http.get("/ui/steps")
        cursor_page = steps.text.split('rel="next" href="/ui/steps')[1].split('"')[0]
        pages = (*PAGES, "/ui/steps" + cursor_page.replace("&amp;", "&"))
        for path in pages:
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
    store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with cl.open_store(args.store) as store:
        events = store.count()
    print(f"{events:,} events in {args.store}")
    for path, wall, cpu, status, first in asyncio.run(measure(args.store, args.rounds)):
        print(f"{path[:60]:60} {status}  wall {wall:9.1f} ms  cpu {cpu:9.1f} ms  (first "
              f"request {first:,.0f} ms; load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
