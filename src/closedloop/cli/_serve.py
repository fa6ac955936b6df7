"""``closedloop serve``: a Prometheus ``/metrics`` endpoint fed by the spans in a store.

Agents in other processes write spans to the store (``closedloop.telemetry.configure()``);
this process tails them into metrics and serves ``/metrics``. Counters start at zero when the
server starts (Prometheus' ``rate()`` handles the reset); ``--from-start`` replays the whole
store first. Ctrl-C (SIGINT) stops it and exits 130; SIGTERM stops it and exits 0.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import click

from closedloop._errors import ConfigError
from closedloop.cli import main
from closedloop.cli._common import open_store_to_read, say, store_option


@main.command()
@store_option
@click.option("--metrics", "serve_metrics", is_flag=True, default=True,
              help="Serve Prometheus metrics: the default, and for now all serve does.")
@click.option("--port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              help="Port to listen on; 0 picks a free one.")
@click.option("--addr", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 exposes it to the network.")
@click.option("--interval", type=click.FloatRange(0.05, 3600), default=1.0, show_default=True,
              help="Seconds between reads of new spans from the store.")
@click.option("--from-start", is_flag=True, help="Count every span already in the store.")
def serve(  # noqa: PLR0917 - click passes every option as an argument
        store_url: str, serve_metrics: bool, port: int, addr: str, interval: float,
          from_start: bool) -> None:
    """Serve Prometheus /metrics for the agents writing to the store, until stopped."""
    from prometheus_client import CollectorRegistry

    from closedloop.telemetry import Metrics, StoreTail, span_store_for, start_metrics_server

    store = open_store_to_read(store_url)
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    from closedloop.control import ledger_for_store

    # pauses and halts live in the store's file, so this process can show them too
    metrics.watch_control(ledger=ledger_for_store(store))
    tail = StoreTail(span_store_for(store), metrics, from_start=from_start)
    try:
        server = start_metrics_server(port, addr, registry)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {addr}:{port}: {exc.strerror or exc}") from None
    stop = threading.Event()
    received: list[int] = []

    def _stop(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    say(f"serving metrics on http://{addr}:{server.server_port}/metrics from {store.url}",
        err=True)
    while not stop.is_set():
        tail.poll()
        stop.wait(interval)
    server.shutdown()
    if signal.SIGINT in received:  # ends as Ctrl-C ends any command (closedloop.cli._Group)
        raise KeyboardInterrupt
