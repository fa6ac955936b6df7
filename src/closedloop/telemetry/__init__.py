"""Observability: OpenTelemetry traces, Prometheus metrics and semantic scores.

Spans are recorded on the agent's thread as plain data (:class:`SpanRecord`) and converted and
exported by a background :class:`Telemetry` pipeline to the embedded store, to any OTLP
collector (HTTP/protobuf or gRPC, through the official OpenTelemetry exporters) and to
Prometheus metrics. While a stage runs user code, closedloop's span is the current
OpenTelemetry span, so a user's own spans nest under it, and a step started inside a user's
span joins the user's trace. Needs the ``otel`` and ``prometheus`` extras.

What the recorded traces say afterwards -- a trace shown as a tree, two traces diffed, today's
checks replayed on recorded proposals, score summaries -- is the learning layer's
(:mod:`closedloop.learn`), and needs neither.

Every step event can also go to InfluxDB (:class:`InfluxSink`, the ``influxdb`` extra):
``closedloop.configure(influxdb="http://127.0.0.1:8086/?db=closedloop")``.

Quick start::

    from closedloop import telemetry
    telemetry.configure(otlp_http="http://localhost:4318/v1/traces", metrics_port=9464)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from closedloop._spans import (
        Score,
        ScoreStat,
        SpanStore,
        StoredSpan,
        TracePage,
        TraceSummary,
        iter_children,
    )
    from closedloop.store import MemorySpanStore, SQLiteSpanStore, Store, span_store_for
    from closedloop.telemetry._export import (
        MemoryExporter,
        OTelExporter,
        StoreExporter,
        otlp_grpc,
        otlp_http,
    )
    from closedloop.telemetry._influx import (
        InfluxSink,
        escape_measurement,
        escape_string,
        escape_tag,
        event_line,
        influx_from_env,
        tag_text,
    )
    from closedloop.telemetry._metrics import (
        Metrics,
        StoreTail,
        metrics_asgi_app,
        start_metrics_server,
    )
    from closedloop.telemetry._pipeline import (
        SpanExporter,
        Telemetry,
        TelemetryStats,
        active_telemetry,
        default_telemetry,
        reset_default_telemetry,
        set_default_telemetry,
    )
    from closedloop.telemetry._redact import Capture, Redactor
    from closedloop.telemetry._scores import (
        OTelScoreExporter,
        TaskScores,
        otlp_http_scores,
        record_score,
    )
    from closedloop.telemetry._span import LiveSpan, SpanRecord

__all__ = [
    "Capture",
    "InfluxSink",
    "LiveSpan",
    "MemoryExporter",
    "MemorySpanStore",
    "Metrics",
    "OTelExporter",
    "OTelScoreExporter",
    "Redactor",
    "SQLiteSpanStore",
    "Score",
    "ScoreStat",
    "SpanExporter",
    "SpanRecord",
    "SpanStore",
    "StoreExporter",
    "StoreTail",
    "StoredSpan",
    "TaskScores",
    "Telemetry",
    "TelemetryStats",
    "TracePage",
    "TraceSummary",
    "active_telemetry",
    "configure",
    "default_telemetry",
    "escape_measurement",
    "escape_string",
    "escape_tag",
    "event_line",
    "influx_from_env",
    "iter_children",
    "metrics_asgi_app",
    "otlp_grpc",
    "otlp_http",
    "otlp_http_scores",
    "record_score",
    "reset_default_telemetry",
    "set_default_telemetry",
    "span_store_for",
    "start_metrics_server",
    "tag_text",
]


def _watch_control(metrics: Metrics, event_store: Store | None) -> None:
    """Expose the process's fault control (pauses, halts) and backpressure in ``metrics``."""
    from closedloop._runtime import current_runtime
    from closedloop.control import ledger_for_store

    rt = current_runtime()
    if event_store is None or rt.has_store(event_store):
        ledger = rt.fault_control.ledger
    else:
        ledger = ledger_for_store(event_store, redis_url=rt.redis_url)
    metrics.watch_control(ledger=ledger, backpressure=rt.backpressure)


def configure(
    *,
    store: Store | bool | None = True,
    otlp_http_endpoint: str | None = None,
    otlp_grpc_endpoint: str | None = None,
    otlp_insecure: bool = False,
    otlp_capture: Capture | None = None,
    store_capture: Capture | None = None,
    metrics: bool = True,
    registry: CollectorRegistry | None = None,
    metrics_port: int | None = None,
    metrics_addr: str = "127.0.0.1",
    exporters: tuple[SpanExporter, ...] = (),
) -> Telemetry:
    """Build a pipeline, install it in the process runtime (loops use it) and return it.

    ``store=True`` writes spans to the runtime's store (``False``/``None``: not at all);
    ``otlp_*_endpoint`` add OTLP destinations; ``metrics`` adds the Prometheus metrics
    (served on ``metrics_port`` if given). The runtime's previous pipeline is shut down; its
    store, fault control and backpressure stay (:func:`closedloop.configure` replaces all).
    """
    from closedloop._runtime import current_runtime
    from closedloop.telemetry._export import StoreExporter, otlp_grpc, otlp_http
    from closedloop.telemetry._metrics import Metrics, start_metrics_server
    from closedloop.telemetry._pipeline import Telemetry

    chosen: list[SpanExporter] = []
    event_store: Store | None = None
    rt = current_runtime()
    if store is True:
        event_store = rt.store
    elif store is not False and store is not None:
        event_store = store
    if event_store is not None:
        chosen.append(StoreExporter(event_store, capture=store_capture))
    if otlp_http_endpoint:
        chosen.append(otlp_http(otlp_http_endpoint, capture=otlp_capture))
    if otlp_grpc_endpoint:
        chosen.append(otlp_grpc(otlp_grpc_endpoint, insecure=otlp_insecure,
                                capture=otlp_capture))
    chosen.extend(exporters)
    m = Metrics(registry) if metrics else None
    if m is not None:
        chosen.append(m)
    pipeline = Telemetry(chosen)
    if m is not None:
        m.watch(telemetry=pipeline, store=event_store)
        _watch_control(m, event_store)
        if metrics_port is not None:
            start_metrics_server(metrics_port, metrics_addr, m.registry)
    previous = rt.set_telemetry(pipeline)
    if previous is not None:
        previous.shutdown()
    return pipeline


if not TYPE_CHECKING:  # type checkers read the imports above; at run time, import on use
    from closedloop._lazy import lazy_exports as _lazy_exports

    __getattr__, __dir__ = _lazy_exports(__name__, {
        "._export": ("MemoryExporter", "OTelExporter", "StoreExporter", "otlp_grpc", "otlp_http"),
        "._influx": ("InfluxSink", "escape_measurement", "escape_string", "escape_tag",
                     "event_line", "influx_from_env", "tag_text"),
        "._metrics": ("Metrics", "StoreTail", "metrics_asgi_app", "start_metrics_server"),
        "._pipeline": ("SpanExporter", "Telemetry", "TelemetryStats", "active_telemetry",
                       "default_telemetry", "reset_default_telemetry", "set_default_telemetry"),
        "._redact": ("Capture", "Redactor"),
        "._scores": ("OTelScoreExporter", "TaskScores", "otlp_http_scores", "record_score"),
        "._span": ("LiveSpan", "SpanRecord"),
        "closedloop._spans": ("Score", "ScoreStat", "SpanStore", "StoredSpan", "TracePage",
                              "TraceSummary", "iter_children"),
        "closedloop.store": ("MemorySpanStore", "SQLiteSpanStore", "span_store_for"),
    })
