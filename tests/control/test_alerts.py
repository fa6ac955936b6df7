"""Alert sinks: log, webhook (against a real local HTTP server) and metric."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from closedloop.control import Alert, LogSink, MetricSink, WebhookSink

ALERT = Alert(kind="halted", subject="provision", summary="5 verifications failed in a row",
              action="run `closedloop resume provision --reason ...`", severity="critical",
              evidence={"consecutive_failures": 5, "window_s": 300.0}, at=1_700_000_000.0)


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]], list[int]]]:
    received: list[dict[str, Any]] = []
    status = [200]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(status[0])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", received, status
    server.shutdown()
    server.server_close()


def test_the_webhook_posts_the_alert_as_json(
        receiver: tuple[str, list[dict[str, Any]], list[int]]) -> None:
    url, received, _ = receiver
    sink = WebhookSink(url)
    sink.send(ALERT)
    assert sink.flush(5.0)
    sink.close()
    body = received[0]
    assert (body["kind"], body["subject"], body["severity"]) == (
        "halted", "provision", "critical")
    assert body["evidence"]["consecutive_failures"] == 5
    assert body["action"].startswith("run `closedloop resume")
    assert body["time"] == "2023-11-14T22:13:20Z"


def test_a_failing_webhook_is_counted_not_raised(
        receiver: tuple[str, list[dict[str, Any]], list[int]]) -> None:
    url, _, status = receiver
    status[0] = 500
    sink = WebhookSink(url)
    sink.send(ALERT)
    assert sink.flush(5.0)
    sink.close()
    assert (sink.sent, sink.failed) == (0, 1)


def test_a_full_webhook_queue_drops_and_counts() -> None:
    sink = WebhookSink("http://127.0.0.1:9/unreachable", max_pending=1, timeout=0.2)
    for _ in range(50):
        sink.send(ALERT)
    sink.close(5.0)
    assert sink.dropped > 0


def test_the_log_sink_logs_a_halt_as_critical(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="closedloop.control"):
        LogSink().send(ALERT)
    record = caplog.records[0]
    assert record.levelno == logging.CRITICAL
    assert "consecutive_failures=5" in record.getMessage()


def test_the_metric_sink_counts_alerts() -> None:
    registry = CollectorRegistry()
    sink = MetricSink(registry)
    sink.send(ALERT)
    sink.send(ALERT)
    value = registry.get_sample_value("closedloop_alerts_total",
                                      {"kind": "halted", "subject": "provision"})
    assert value == 2.0
