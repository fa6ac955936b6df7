"""The approvals JSON API over real HTTP: what a page of the queue, one request and one
decision cost ``closedloop serve`` (uvicorn in its own process) on a store holding many
requests.

Run: ``python bench/approvals_http.py`` (options: ``--requests 2000``, ``--rounds 300``,
``--store URL``; default store: a SQLite file in a temporary folder).

The store is filled with ``--requests`` pending requests (as the loop stores them), then one
client (httpx, keep-alive) calls in turn ``GET /api/v1/approvals?status=pending&limit=50``
(the first page and a page deep in the keyset), ``GET /api/v1/approvals/{id}``, and
``POST …/approve``. Printed per call: median and 95th percentile of the wall time seen by the
client, and the server's CPU time per call (user + system of the serve process, from
``/proc``, over the calls of that kind). The machine is shared: compare CPU times, and read
the wall times next to the load shown.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

import closedloop as cl
from closedloop._approvals import new_request
from closedloop.approvals import approvals_for

TOKEN = "bench-token-" + "ab12" * 6


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fill(url: str, n: int) -> list[str]:
    ids = []
    t0 = time.time() - n
    with cl.open_store(url) as store:
        approvals = approvals_for(store)
        for i in range(n):
            made = approvals.create(new_request(
                task_type=f"deploy-{i % 5}", agent_id="agent-1",
                proposal={"action": "run_instances", "count": i % 7, "tags": {"n": str(i)}},
                task_input={"ask": i}, requested_by="agent-1@host",
                verdicts=[{"check": "tags", "passed": True}],
                risk={"summary": "creates instances", "destructive": False},
                expires_in=10 * 86400, now=t0 + i))
            ids.append(made.request_id)
    return ids


def measure(label: str, pid: int, rounds: int, call: Callable[[int], httpx.Response]) -> None:
    times = []
    cpu0 = cpu_seconds(pid)
    for i in range(rounds):
        start = time.perf_counter()
        answer = call(i)
        times.append(time.perf_counter() - start)
        assert answer.status_code == 200, answer.text
    cpu = (cpu_seconds(pid) - cpu0) / rounds
    times.sort()
    print(f"{label:<34} median {statistics.median(times) * 1e3:6.2f} ms   "
          f"p95 {times[int(0.95 * len(times)) - 1] * 1e3:6.2f} ms   "
          f"server CPU {cpu * 1e3:6.2f} ms/call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--store", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.store or f"sqlite:///{tmp}/bench.db"
        cl.open_store(url).close()
        ids = fill(url, args.requests)
        env = {**os.environ, "CLOSEDLOOP_API_TOKEN": TOKEN}
        proc = subprocess.Popen([sys.executable, "-m", "closedloop", "serve", "--port", "0",
                                 "--no-metrics", "--store", url], env=env,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
            assert match, first
            base = f"http://127.0.0.1:{match.group(1)}"
            print(f"{args.requests} pending requests in {url.split('?')[0]}; load "
                  f"{os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs")
            with httpx.Client(base_url=base, trust_env=False, timeout=30,
                              headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                cursor = None
                for _ in range(5):  # 1,000 requests in
                    cursor = http.get("/api/v1/approvals", params={
                        "status": "pending", "limit": 200,
                        **({"cursor": cursor} if cursor else {})}).json()["next_cursor"]
                measure("GET list, first page of 50", proc.pid, args.rounds,
                        lambda i: http.get("/api/v1/approvals",
                                           params={"status": "pending", "limit": 50}))
                measure("GET list, page of 50 after 1000", proc.pid, args.rounds,
                        lambda i: http.get("/api/v1/approvals", params={
                            "status": "pending", "limit": 50, "cursor": cursor}))
                measure("GET one request", proc.pid, args.rounds,
                        lambda i: http.get(f"/api/v1/approvals/{ids[i]}"))
                measure("POST approve", proc.pid, args.rounds,
                        lambda i: http.post(f"/api/v1/approvals/{ids[-1 - i]}/approve",
                                            json={"by": "alice", "reason": "bench"}))
            print(f"load after: {os.getloadavg()[0]:.2f}")
        finally:
            proc.terminate()
            proc.wait(30)
            assert proc.stderr is not None
            proc.stderr.close()


if __name__ == "__main__":
    main()
