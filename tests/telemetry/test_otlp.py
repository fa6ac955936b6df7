"""OTLP export: the official exporters deliver closedloop's spans to local receivers that decode
the real protobuf payload, over HTTP and over gRPC."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from closedloop.store import open_store
from closedloop.telemetry import Capture, Telemetry, otlp_grpc, otlp_http, record_score

Request = trace_service_pb2.ExportTraceServiceRequest


class _Handler(BaseHTTPRequestHandler):
    received: list[Request]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request: Any = (Request() if self.path == "/v1/traces"
                        else logs_service_pb2.ExportLogsServiceRequest())
        request.ParseFromString(body)
        self.server.received.append((self.path, self.headers["Content-Type"], request))  # type: ignore[attr-defined]
        payload = b""  # an empty Export*ServiceResponse
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_receiver() -> Iterator[tuple[str, list[tuple[str, str, Request]]]]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1/traces", server.received  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


class _Servicer(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.received: list[Request] = []

    def Export(self, request: Request, context: Any) -> Any:
        self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def grpc_receiver() -> Iterator[tuple[str, _Servicer]]:
    servicer = _Servicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def _spans(request: Request) -> list[trace_pb2.Span]:
    return [s for rs in request.resource_spans for ss in rs.scope_spans for s in ss.spans]


def _attrs(span: trace_pb2.Span) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        field = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, field)
    return out


def _record_step(pipeline: Telemetry) -> tuple[str, str]:
    model = {"gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 12}
    with pipeline.span("closedloop.step", **{"closedloop.task_type": "t"}) as outer, \
            pipeline.span("chat gpt-4o", **model) as inner:
        inner.record.content = {"gen_ai.input.messages": "mail me at bob@example.com"}
    return outer.record.span_id_hex, inner.record.span_id_hex


def test_otlp_http_delivers_protobuf_spans_with_parents(
    http_receiver: tuple[str, list[tuple[str, str, Request]]],
) -> None:
    endpoint, received = http_receiver
    pipeline = Telemetry([otlp_http(endpoint, service_name="svc")], flush_interval=60.0)
    outer_id, _ = _record_step(pipeline)
    assert pipeline.flush(10.0)
    pipeline.shutdown()
    ((path, content_type, request),) = received
    assert path == "/v1/traces"
    assert content_type == "application/x-protobuf"
    spans = {s.name: s for s in _spans(request)}
    assert spans["closedloop.step"].span_id.hex() == outer_id
    assert spans["chat gpt-4o"].parent_span_id.hex() == outer_id
    assert _attrs(spans["chat gpt-4o"])["gen_ai.usage.input_tokens"] == 12
    resource_attrs = request.resource_spans[0].resource.attributes
    resource = {kv.key: kv.value.string_value for kv in resource_attrs}
    assert resource["service.name"] == "svc"


def test_otlp_sends_no_message_content_unless_asked(
    http_receiver: tuple[str, list[tuple[str, str, Request]]],
) -> None:
    endpoint, received = http_receiver
    pipeline = Telemetry([otlp_http(endpoint)], flush_interval=60.0)
    _record_step(pipeline)
    pipeline.shutdown()
    spans = {s.name: s for s in _spans(received[0][2])}
    assert "gen_ai.input.messages" not in _attrs(spans["chat gpt-4o"])


def test_otlp_content_opt_in_is_redacted(
    http_receiver: tuple[str, list[tuple[str, str, Request]]],
) -> None:
    endpoint, received = http_receiver
    pipeline = Telemetry([otlp_http(endpoint, capture=Capture())], flush_interval=60.0)
    _record_step(pipeline)
    pipeline.shutdown()
    spans = {s.name: s for s in _spans(received[0][2])}
    sent = _attrs(spans["chat gpt-4o"])["gen_ai.input.messages"]
    assert sent == "mail me at [REDACTED:email]"


def test_otlp_status_attributes_and_events_are_redacted_with_content_off(
    http_receiver: tuple[str, list[tuple[str, str, Request]]],
) -> None:
    endpoint, received = http_receiver
    pipeline = Telemetry([otlp_http(endpoint)], flush_interval=60.0)
    dsn = "postgres://app:s3cr3t-pw@db:5432/x"
    with pipeline.span("closedloop.step") as step:
        step.set_attribute("db.connection_string", dsn)
        step.add_event("retry", {"error": "401 for bob@example.com"})
        step.record.fail(f"cannot connect: {dsn}")
    pipeline.shutdown()
    (span,) = _spans(received[0][2])
    assert span.status.message == "cannot connect: postgres://app:[REDACTED:url_password]@db:5432/x"
    assert _attrs(span)["db.connection_string"] == (
        "postgres://app:[REDACTED:url_password]@db:5432/x")
    assert span.events[0].attributes[0].value.string_value == "401 for [REDACTED:email]"


def test_otlp_grpc_delivers_protobuf_spans(grpc_receiver: tuple[str, _Servicer]) -> None:
    endpoint, servicer = grpc_receiver
    pipeline = Telemetry([otlp_grpc(endpoint, insecure=True)], flush_interval=60.0)
    outer_id, inner_id = _record_step(pipeline)
    assert pipeline.flush(10.0)
    pipeline.shutdown()
    spans = {s.span_id.hex(): s for r in servicer.received for s in _spans(r)}
    assert spans[inner_id].parent_span_id.hex() == outer_id
    assert spans[outer_id].name == "closedloop.step"


def test_an_unreachable_collector_is_counted_not_raised() -> None:
    with socket_free_port() as port:
        pass
    pipeline = Telemetry([otlp_http(f"http://127.0.0.1:{port}/v1/traces", timeout=1.0)],
                         flush_interval=60.0)
    pipeline.end_span(pipeline.start_span("lost"))
    pipeline.flush(10.0)
    assert pipeline.stats().export_failures == {"OTelExporter": 1}
    pipeline.shutdown()


class socket_free_port:
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_scores_reach_a_collector_as_evaluation_events(
    http_receiver: tuple[str, list[tuple[str, str, Any]]], tmp_path: Any,
) -> None:
    from click.testing import CliRunner

    from closedloop.cli import main

    endpoint, received = http_receiver
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    record_score("ab" * 16, "satisfaction", 4, comment="ok", store=store)
    record_score("ab" * 16, "quality", "wrong_region", span_id="cd" * 8, source="rule",
                 store=store)
    store.close()
    logs_endpoint = endpoint.replace("/v1/traces", "/v1/logs")
    result = CliRunner().invoke(main, ["scores", "export", "--otlp-http", logs_endpoint,
                                       "--store", url])
    assert result.exit_code == 0, result.output
    ((path, _, request),) = received
    records = request.resource_logs[0].scope_logs[0].log_records
    assert path == "/v1/logs"
    assert [r.event_name for r in records] == ["gen_ai.evaluation.result"] * 2
    assert records[0].trace_id.hex() == "ab" * 16
    assert records[1].span_id.hex() == "cd" * 8
    attrs = {kv.key: kv.value for kv in records[1].attributes}
    assert attrs["gen_ai.evaluation.score.label"].string_value == "wrong_region"
