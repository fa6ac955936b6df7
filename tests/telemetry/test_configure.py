"""Turning telemetry on: configure(), periodic export, serving and mounting the metrics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import closedloop as cl
from closedloop.telemetry import (
    MemoryExporter,
    SpanRecord,
    Telemetry,
    configure,
    default_telemetry,
    metrics_asgi_app,
    reset_default_telemetry,
    span_store_for,
    start_metrics_server,
)


@pytest.fixture(autouse=True)
def _no_default_pipeline() -> Iterator[None]:
    yield
    reset_default_telemetry()


def test_configure_installs_a_default_that_writes_spans_and_metrics(
    memory_store: cl.Store,
) -> None:
    registry = CollectorRegistry()
    pipeline = configure(store=memory_store, registry=registry)
    assert default_telemetry() is pipeline
    with pipeline.span("closedloop.step", **{"closedloop.task_type": "t",
                                            "closedloop.outcome": "succeeded"}) as root:
        pass
    pipeline.flush(5.0)
    assert span_store_for(memory_store).trace(root.record.trace_id_hex)
    assert registry.get_sample_value("closedloop_task_runs_total",
                                     {"task_type": "t", "outcome": "succeeded"}) == 1
    assert registry.get_sample_value("closedloop_telemetry_spans_dropped_total") == 0


def test_configure_again_shuts_the_previous_pipeline_down(memory_store: cl.Store) -> None:
    first = configure(store=memory_store, registry=CollectorRegistry())
    configure(store=memory_store, registry=CollectorRegistry())
    assert not first.submit(first.start_span("late"))
    assert first.stats().dropped == 1


class Signal:
    """An exporter that tells when a batch arrived."""

    def __init__(self) -> None:
        self.arrived = threading.Event()

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        self.arrived.set()
        return True

    def force_flush(self, timeout: float = 10.0) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def test_spans_are_exported_without_a_flush_within_the_interval() -> None:
    signal = Signal()
    pipeline = Telemetry([signal], flush_interval=0.02)
    pipeline.end_span(pipeline.start_span("background"))
    assert signal.arrived.wait(5.0)
    pipeline.shutdown()


def test_the_in_process_metrics_server_serves_the_registry() -> None:
    registry = CollectorRegistry()
    configure(store=False, registry=registry)
    server = start_metrics_server(0, registry=registry)
    try:
        text = httpx.get(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5.0).text
    finally:
        server.shutdown()
        server.server_close()
    assert "# TYPE closedloop_task_runs_total counter" in text


def test_the_asgi_app_serves_the_metrics() -> None:
    registry = CollectorRegistry()
    configure(store=False, registry=registry)
    app = metrics_asgi_app(registry)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": "/metrics", "query_string": b"",
             "headers": [], "http_version": "1.1", "scheme": "http", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    assert b"closedloop_step_duration_seconds" in b"".join(m.get("body", b"") for m in sent)


def test_a_memory_exporter_is_a_test_double_for_users() -> None:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter])
    with pipeline.span("mine", answer=1):
        pass
    pipeline.shutdown()
    assert [(s.name, s.attributes) for s in exporter.finished()] == [("mine", {"answer": 1})]
