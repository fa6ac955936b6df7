"""What sending every step to InfluxDB costs, and what pricing a model call costs.

Run: ``python bench/influx.py`` (options: ``--events``, ``--rounds``); needs ``influxd`` on
PATH (Debian's ``influxdb``): it starts one of its own on a free loopback port, with its own
data folder, and stops it at the end.

* line protocol: ``event_line`` per loop-shaped event (tags, labels, ids, a cost), µs of CPU;
* ingest: ``--events`` events recorded into a ``memory://`` store, flushed, with and without
  an ``InfluxSink`` attached (flushed too, so every point is acknowledged by InfluxDB): this
  process's CPU per event (the store writer's fan-out, the sink's formatting and HTTP; the
  server's CPU is its own process's) and events/s delivered; rounds interleaved, medians;
* pricing: ``Prices.cost`` of one call from the user's own price and from genai-prices.

The agent's own thread is not involved in any of these (``bench/overhead.py`` measures it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import closedloop as cl
from closedloop._pricing import Prices
from closedloop.telemetry import InfluxSink, event_line


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_influxd(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    conf = folder / "influxdb.conf"
    conf.write_text(f"""reporting-disabled = true
bind-address = "127.0.0.1:{_port()}"
[meta]
  dir = "{folder / 'meta'}"
  logging-enabled = false
[data]
  dir = "{folder / 'data'}"
  wal-dir = "{folder / 'wal'}"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{port}"
  log-enabled = false
[logging]
  level = "error"
""")
    influxd = shutil.which("influxd")
    if influxd is None:
        sys.exit("influxd is not on PATH (apt-get install influxdb)")
    proc = subprocess.Popen([influxd, "run", "-config", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/ping", timeout=1).status_code == 204:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    httpx.post(f"{base}/query", data={"q": "CREATE DATABASE bench"}).raise_for_status()
    return proc, base


def event(i: int) -> cl.StepEvent:
    return cl.StepEvent(
        ts=1_790_000_000.0 + i * 1e-3, trace_id=f"{i:032x}", agent_id="planner",
        task_type="provision_ec2", autonomy="autonomous",
        outcome="succeeded" if i % 10 else "failed", attempts=1 + (i % 3 == 0),
        input_tokens=1200, output_tokens=300, latency_ms=850.0 + i % 100,
        validation_passed=True, verification_passed=bool(i % 10),
        error_type=None if i % 10 else "verification",
        error_message=None if i % 10 else "instance i-0abc is a t3.large, requested t3.micro",
        propose_ms=800.0, validate_ms=2.0, act_ms=40.0, verify_ms=8.0, detail=None,
        step_id=f"s-{i}", run_id="r-1", model="gpt-4o-2024-08-06", provider="openai",
        agent_version="v3", prompt_version="p12", labels={"region": "eu-west-1"},
        cached_input_tokens=200, cost_usd=0.00725, proposal='{"instance_type":"t3.micro"}')


def line_cost(n: int) -> float:
    events = [event(i) for i in range(n)]
    start = time.process_time()
    for e in events:
        event_line(e)
    return (time.process_time() - start) / n * 1e6


def ingest(n: int, base: str | None) -> tuple[float, float]:
    """(CPU µs per event, events/s) of recording ``n`` events and flushing them."""
    events = [event(i) for i in range(n)]
    store = cl.open_store("memory://")
    sink = InfluxSink(f"{base}/?db=bench") if base else None
    if sink is not None:
        store.add_sink(sink)
    cpu, wall = time.process_time(), time.perf_counter()
    for e in events:
        store.record(e)
    assert store.flush(120)
    if sink is not None:
        assert sink.flush(120), sink.stats()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    if sink is not None:
        assert sink.stats().written == n, sink.stats()
        sink.close()
    store.close()
    return cpu / n * 1e6, n / wall


def pricing_cost(n: int) -> tuple[float, float]:
    own = Prices({"gpt-4o-2024-08-06": {"input": 2.5, "output": 10.0}})
    table = Prices()
    table.cost("gpt-4o-2024-08-06", "openai", 1, 1)  # loaded and indexed once
    out = []
    for prices in (own, table):
        start = time.process_time()
        for _ in range(n):
            prices.cost("gpt-4o-2024-08-06", "openai", 1200, 300, cached_input_tokens=200)
        out.append((time.process_time() - start) / n * 1e6)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, load {os.getloadavg()[0]:.2f}")
    print(f"line protocol: {line_cost(args.events):.2f} µs CPU per event")
    own, table = pricing_cost(20_000)
    print(f"pricing one call: own price {own:.2f} µs, genai-prices {table:.1f} µs (CPU)")
    with tempfile.TemporaryDirectory() as tmp:
        proc, base = start_influxd(Path(tmp))
        try:
            without, with_sink = [], []
            for r in range(args.rounds):
                without.append(ingest(args.events, None))
                with_sink.append(ingest(args.events, base))
                print(f"round {r + 1}: store only {without[-1][0]:.2f} µs/event "
                      f"({without[-1][1]:,.0f}/s); store + InfluxDB {with_sink[-1][0]:.2f} "
                      f"µs/event ({with_sink[-1][1]:,.0f}/s)  load {os.getloadavg()[0]:.2f}")
        finally:
            proc.kill()
            proc.wait()
    a = statistics.median(c for c, _ in without)
    b = statistics.median(c for c, _ in with_sink)
    print(f"median CPU per event: store only {a:.2f} µs, with InfluxDB {b:.2f} µs "
          f"(+{b - a:.2f} µs); delivered {statistics.median(r for _, r in with_sink):,.0f} "
          f"events/s")


if __name__ == "__main__":
    main()
