"""A real ``closedloop serve`` (uvicorn, a free loopback port, its own process) on a store of
the test's own, SQLite or PostgreSQL, and requests made in that store as an agent would."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

import closedloop as cl
from closedloop._approvals import ApprovalRequest, new_request
from closedloop.approvals import approvals_for
from store.conftest import any_url, pg_schema, pg_url  # noqa: F401 - fixtures (and used below)

TOKEN = "test-token-" + "7f3a9c" * 4
_LISTENING = re.compile(r"http://[^ ]+?:(\d+)/")


@dataclass
class Served:
    """A running ``closedloop serve``: its base URL, store URL, process and stderr lines."""

    url: str
    store_url: str
    proc: subprocess.Popen[str]
    err: list[str] = field(default_factory=list)
    token: str = TOKEN
    drain: threading.Thread | None = None

    def client(self, *, token: str | None = TOKEN) -> httpx.Client:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, trust_env=False)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        code = self.proc.wait(30)
        if self.drain is not None:
            self.drain.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def start_serve(store_url: str, *args: str, token: str | None = TOKEN,
                env: dict[str, str] | None = None) -> Served:
    """``closedloop serve --port 0`` on ``store_url``; returns once it listens."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLOSEDLOOP_API_TOKEN", "CLOSEDLOOP_APPROVAL_WEBHOOK"))}
    if token is not None:
        environ["CLOSEDLOOP_API_TOKEN"] = token
    environ.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "closedloop", "serve", "--port", "0",
                             "--store", store_url, *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=environ)
    assert proc.stderr is not None
    first = proc.stderr.readline()
    match = _LISTENING.search(first)
    if match is None:
        proc.kill()
        rest = proc.stderr.read()
        proc.wait(10)
        proc.stderr.close()
        pytest.fail(f"closedloop serve did not start: {first}{rest}")
    served = Served(f"http://127.0.0.1:{match.group(1)}", store_url, proc, [first])

    def drain() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            served.err.append(line)

    served.drain = threading.Thread(target=drain, daemon=True)
    served.drain.start()
    return served


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store, SQLite or PostgreSQL, created (migrated) before serve opens it."""
    url = (f"sqlite:///{tmp_path / 'agents.db'}" if request.param == "sqlite"
           else str(request.getfixturevalue("pg_url")))
    cl.open_store(url).close()
    return url


@pytest.fixture
def served(store_url: str) -> Iterator[Served]:
    """``closedloop serve`` with the API token, on loopback."""
    s = start_serve(store_url)
    yield s
    s.stop()


def make_request(store_url: str, *, proposal: Any = None, task_type: str = "deploy",
                 requested_by: str = "agent-1@host", expires_in: float | None = 3600,
                 created: float | None = None, destructive: bool = False,
                 two_approvers: bool = False,
                 verdicts: Sequence[dict[str, Any]] = ({"check": "tags", "passed": True},),
                 ) -> ApprovalRequest:
    """A pending request, stored as the loop stores one (from this process)."""
    with cl.open_store(store_url) as store:
        return approvals_for(store).create(new_request(
            task_type=task_type, agent_id="agent-1",
            proposal={"action": "run_instances", "count": 2} if proposal is None else proposal,
            task_input={"ask": "two web servers"}, requested_by=requested_by,
            step_id=uuid.uuid4().hex, trace_id=uuid.uuid4().hex, verdicts=verdicts,
            risk={"summary": "deletes 1 database", "destructive": True,
                  "items": [{"address": "aws_db_instance.main", "action": "delete"}]}
            if destructive else {"summary": "creates 2 instances", "destructive": False},
            expires_in=expires_in, two_approvers=two_approvers, now=created))


def stored(store_url: str, request_id: str) -> ApprovalRequest:
    with cl.open_store(store_url) as store:
        found = approvals_for(store).get(request_id)
    assert found is not None
    return found


def wait_for(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@dataclass
class Receiver:
    """A webhook receiver: answers each POST with the next of ``script`` (then 200)."""

    url: str
    script: list[int]
    bodies: list[dict[str, Any]] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)

    def delivered(self) -> list[dict[str, Any]]:
        """The bodies it answered with success."""
        return [b for b, a in zip(self.bodies, self.answers, strict=True) if a < 300]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    lock = threading.Lock()
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            me = holder[0]
            with lock:
                status = me.script.pop(0) if me.script else 200
                me.bodies.append(body)
                me.answers.append(status)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    holder.append(Receiver(f"http://127.0.0.1:{server.server_address[1]}/hooks/s3cr3t", []))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()
