"""Local servers for the verifiers: moto's EC2 on 127.0.0.1 and a small HTTP app."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's threaded EC2 server on a free port of 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def ec2(moto_endpoint: str) -> Any:
    """A boto3 EC2 client talking to the local moto server (never to AWS)."""
    import boto3

    return boto3.client("ec2", region_name="us-east-1", endpoint_url=moto_endpoint,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, b'{"error": "not found"}'))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="session")
def http_base() -> Iterator[str]:
    """A local HTTP server with fixed JSON routes."""
    _Handler.routes = {
        "/health": (200, json.dumps({"status": "ok", "version": "1.4.2",
                                     "checks": [{"name": "db", "ok": True}]}).encode()),
        "/degraded": (503, json.dumps({"status": "degraded"}).encode()),
        "/text": (200, b"plain text"),
    }
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
