"""Span exporters: the embedded store, any OpenTelemetry SDK exporter (OTLP), and memory.

Conversion happens here, on the pipeline's thread: records become rows for the store or
standard ``ReadableSpan`` objects for the official OpenTelemetry exporters, so what reaches a
collector is plain OTLP produced by the OpenTelemetry project's own encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from closedloop._redact import Redactor, default_redactor, truncate
from closedloop._spans import SpanStore, StoredSpan
from closedloop._version import __version__
from closedloop.store import MemorySpanStore, span_store_for
from closedloop.telemetry._redact import Capture
from closedloop.telemetry._span import STATUS_ERROR, STATUS_OK, SpanRecord, jsonable

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExporter as SDKSpanExporter

    from closedloop.store import Store

log = logging.getLogger("closedloop.telemetry")


STATUS_MAX_CHARS = 500
"""A span's status message is redacted, then capped at this length."""


def status_message(span: SpanRecord, redactor: Redactor) -> str | None:
    """The span's status message, redacted and then capped."""
    message = span.status_message
    return None if message is None else truncate(redactor(message), STATUS_MAX_CHARS)


def span_events(span: SpanRecord, redactor: Redactor) -> list[tuple[str, int, dict[str, Any]]]:
    """The span's events with their names and attributes redacted."""
    if not span.events:
        return []
    return [(redactor(n), ts, redactor.attributes(a)) for n, ts, a in span.events]


def to_stored(span: SpanRecord, capture: Capture) -> StoredSpan:
    """A record as a :class:`StoredSpan`: status, attributes and events redacted, content
    captured per ``capture``."""
    redactor = default_redactor()
    events = [{"name": n, "ts_ns": ts, "attributes": a}
              for n, ts, a in span_events(span, redactor)]
    return StoredSpan(
        trace_id=span.trace_id_hex, span_id=span.span_id_hex, parent_id=span.parent_id_hex,
        name=span.name, kind=span.kind, start_ns=span.start_ns, end_ns=span.end_ns,
        status=span.status, status_message=status_message(span, redactor),
        attributes={k: jsonable(v) for k, v in redactor.attributes(span.attributes).items()},
        events=events, content=capture.apply(span.content),
    )


class StoreExporter:
    """Writes spans into the store (its span/score port: the SQLite file, the PostgreSQL
    schema, or memory).

    Content (prompts, proposals, responses) is captured redacted and capped by default.
    """

    def __init__(self, store: Store | SpanStore | None = None, *,
                 capture: Capture | None = None) -> None:
        if store is None:
            from closedloop.store import default_store

            store = default_store()
        self.spans: SpanStore = (store if isinstance(store, SpanStore)
                                 else span_store_for(store))
        self.capture = capture if capture is not None else Capture()

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Write the batch in one transaction."""
        capture = self.capture
        self.spans.write_spans([to_stored(s, capture) for s in spans])
        return True

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Writes are synchronous; nothing is buffered."""
        return True

    def shutdown(self) -> None:
        """Close the store's connection for this thread."""
        close = getattr(self.spans, "close", None)
        if callable(close):
            close()


class MemoryExporter(StoreExporter):
    """Keeps exported spans in memory: the capture users need for their own tests."""

    def __init__(self, *, capture: Capture | None = None) -> None:
        self.store = MemorySpanStore()
        super().__init__(self.store, capture=capture)

    def finished(self) -> list[StoredSpan]:
        """Every span exported so far, in export order."""
        return self.store.all_spans()


class OTelExporter:
    """Hands spans to an OpenTelemetry SDK exporter (OTLP/HTTP, OTLP/gRPC, console…).

    Message content reaches this destination only if ``capture`` allows it (off by default,
    as the GenAI conventions make content opt-in); captured content is sent as the span
    attributes named in the record (``gen_ai.input.messages``…), redacted and capped.
    """

    def __init__(
        self,
        exporter: SDKSpanExporter,
        *,
        capture: Capture | None = None,
        service_name: str = "closedloop",
        resource_attributes: Mapping[str, Any] | None = None,
    ) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self.exporter = exporter
        self.capture = capture if capture is not None else Capture.none()
        self.resource = Resource.create({"service.name": service_name,
                                         **(resource_attributes or {})})
        self.scope = InstrumentationScope("closedloop", __version__)

    def to_readable(self, span: SpanRecord) -> ReadableSpan:
        """The record as a standard SDK ``ReadableSpan``."""
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        flags = TraceFlags(TraceFlags.SAMPLED)
        context = SpanContext(span.trace_id, span.span_id, False, flags)
        parent = (SpanContext(span.trace_id, span.parent_id, False, flags)
                  if span.parent_id else None)
        redactor = default_redactor()
        if span.status == STATUS_ERROR:
            status = Status(StatusCode.ERROR, status_message(span, redactor))
        elif span.status == STATUS_OK:
            status = Status(StatusCode.OK)
        else:
            status = Status(StatusCode.UNSET)
        attributes = {k: _otel_value(v)
                      for k, v in redactor.attributes(span.attributes).items()}
        attributes.update(self.capture.apply(span.content))
        events = [Event(n, a, ts) for n, ts, a in span_events(span, redactor)]
        return ReadableSpan(
            name=span.name, context=context, parent=parent, resource=self.resource,
            attributes=attributes, events=events, kind=SpanKind(span.kind), status=status,
            start_time=span.start_ns, end_time=span.end_ns, instrumentation_scope=self.scope,
        )

    def export(self, spans: Sequence[SpanRecord]) -> bool:
        """Convert and export the batch; True when the SDK exporter reports success."""
        from opentelemetry.sdk.trace.export import SpanExportResult

        result = self.exporter.export([self.to_readable(s) for s in spans])
        return result is SpanExportResult.SUCCESS

    def force_flush(self, timeout: float = 10.0) -> bool:
        """Flush the SDK exporter."""
        return bool(self.exporter.force_flush(int(timeout * 1000)))

    def shutdown(self) -> None:
        """Shut the SDK exporter down."""
        self.exporter.shutdown()


def _otel_value(value: Any) -> Any:
    """OTLP attribute values are scalars or homogeneous lists; anything else becomes text."""
    if isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    if isinstance(value, list | tuple) and all(isinstance(v, int | float) for v in value):
        return tuple(value)
    return str(value)


def otlp_http(
    endpoint: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    capture: Capture | None = None,
    service_name: str = "closedloop",
) -> OTelExporter:
    """OTLP over HTTP/protobuf (``endpoint`` like ``http://collector:4318/v1/traces``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTelExporter(OTLPSpanExporter(endpoint=endpoint, headers=dict(headers or {}),
                                         timeout=timeout),
                        capture=capture, service_name=service_name)


def otlp_grpc(
    endpoint: str,
    *,
    insecure: bool = False,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    capture: Capture | None = None,
    service_name: str = "closedloop",
) -> OTelExporter:
    """OTLP over gRPC (``endpoint`` like ``collector:4317``; ``insecure`` for plaintext)."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTelExporter(OTLPSpanExporter(endpoint=endpoint, insecure=insecure,
                                         headers=dict(headers or {}), timeout=timeout),
                        capture=capture, service_name=service_name)
