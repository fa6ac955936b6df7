"""What one read of the durable control ledger costs, per store: SQLite file vs PostgreSQL.

Run: ``PYTHONPATH=src python bench/control_ledger.py [--pg URL] [--number N] [--repeat R]``
(default URL ``postgresql://postgres@127.0.0.1:5432/test``; a schema of its own is created
and dropped). The SQLite ledger connects per call, the PostgreSQL one keeps a connection;
this is the price of a ``FaultControl`` re-read (once per ``recheck`` second per task type,
never per step) and of each ``closedloop status`` query. Figures: median over ``--repeat``
rounds of ``--number`` calls.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import closedloop as cl
from closedloop.control import ControlLedger, Stop, StopKind, ledger_for_store
from closedloop.store.postgres import PostgresLedger


def per_call(fn: Callable[[], object], number: int, repeat: int) -> float:
    """Median seconds per call."""
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        rounds.append((time.perf_counter() - start) / number)
    return statistics.median(rounds)


def measure(name: str, ledger: ControlLedger, number: int, repeat: int) -> None:
    ledger.put(Stop(task_type="halted", kind=StopKind.HALTED, reason="bench", by="bench",
                    at=time.time()))
    for what, fn in (("get, no stop", lambda: ledger.get("running")),
                     ("get, halted", lambda: ledger.get("halted")),
                     ("stops()", ledger.stops)):
        print(f"| {name} | {what} | {per_call(fn, number, repeat) * 1e3:.2f} ms |")
    put = Stop(task_type="paused", kind=StopKind.PAUSED, reason="bench", by="bench",
               at=time.time(), until=time.time() + 60)
    print(f"| {name} | put (pause) | "
          f"{per_call(lambda: ledger.put(put), number // 4 or 1, repeat) * 1e3:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--number", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print("| store | call | median per call |\n| --- | --- | --- |")
    with (tempfile.TemporaryDirectory() as tmp,
          cl.open_store(f"sqlite:///{Path(tmp) / 'events.db'}") as store):
        measure("SQLite", ledger_for_store(store, redis_url=None), args.number, args.repeat)
    schema = f"closedloop_bench_{uuid.uuid4().hex[:8]}"
    url = f"{args.pg}?schema={schema}"
    import psycopg

    try:
        with cl.open_store(url) as store:
            measure("PostgreSQL", ledger_for_store(store, redis_url=None), args.number,
                    args.repeat)
    finally:
        with psycopg.connect(args.pg, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    down = PostgresLedger.from_url(f"postgresql://postgres@127.0.0.1:{port}/test")

    def refused() -> None:
        with suppress(cl.ControlUnavailable):
            down.get("running")

    print(f"| PostgreSQL, port closed | get → ControlUnavailable | "
          f"{per_call(refused, args.number, args.repeat) * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
