"""A local HTTP server that speaks the providers' wire formats (JSON and server-sent events)."""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted response: JSON ``body``, or ``events`` sent as server-sent events."""

    status: int = 200
    body: dict[str, Any] | None = None
    events: list[tuple[str | None, Any]] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class WireServer:
    """Answers each POST with the next scripted :class:`Reply`, and keeps the requests."""

    def __init__(self) -> None:
        self.replies: deque[Reply] = deque()
        self.requests: list[tuple[str, dict[str, Any]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.requests.append((self.path, json.loads(body or b"{}")))
                reply = server.replies.popleft()
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                if reply.events is not None:
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for name, data in reply.events:
                        text = data if isinstance(data, str) else json.dumps(data)
                        prefix = f"event: {name}\n" if name else ""
                        self.wfile.write(f"{prefix}data: {text}\n\n".encode())
                        self.wfile.flush()
                    self.close_connection = True
                    return
                payload = json.dumps(reply.body or {}).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def script(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
