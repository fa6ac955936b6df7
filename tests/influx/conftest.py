"""A real InfluxDB (Debian's ``influxdb``, 1.x) of the tests' own, on a free loopback port.

Each server has its own data folder, reporting and self-monitoring off, and authentication
on (an admin user is created first), so that the 1.x credentials path is exercised too.
The session's server is shared, each test writing to a database of its own; a test that
stops and restarts the server (an outage) starts one of its own.
"""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import _services

USER, PASSWORD = "admin", "cl-test-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OwnInfluxd:
    """An influxd on loopback, started and stopped by the tests."""

    def __init__(self, folder: Path) -> None:
        self.binary = _services.program("influxd")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = folder / "influxdb.conf"
        self.config.write_text(f"""
reporting-disabled = true
bind-address = "127.0.0.1:{_free_port()}"
[meta]
  dir = "{folder / 'meta'}"
  logging-enabled = false
[data]
  dir = "{folder / 'data'}"
  wal-dir = "{folder / 'wal'}"
  query-log-enabled = false
[monitor]
  store-enabled = false
[http]
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  auth-enabled = true
[logging]
  level = "error"
""")
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.base, timeout=10.0, auth=(USER, PASSWORD))

    def url(self, db: str, *, credentials: bool = True) -> str:
        """The URL an :class:`~closedloop.telemetry.InfluxSink` writes ``db`` through."""
        auth = f"{USER}:{PASSWORD}@" if credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}/?db={db}"

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "run", "-config", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/ping", timeout=1.0).status_code == 204:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"influxd exited with {self.proc.returncode}")
            time.sleep(0.1)
        else:
            raise RuntimeError("influxd did not answer /ping within 30 s")
        # the first user may be created without credentials; later starts find it there
        httpx.post(f"{self.base}/query", timeout=10.0, data={
            "q": f"CREATE USER {USER} WITH PASSWORD '{PASSWORD}' WITH ALL PRIVILEGES"})

    def stop(self) -> None:
        """Kill the server (the client stays usable for a restart)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def query(self, db: str, q: str) -> list[dict[str, Any]]:
        """InfluxQL over HTTP: the first statement's series (``[]`` when none)."""
        response = self.client.get("/query", params={"db": db, "q": q})
        response.raise_for_status()
        result = response.json()["results"][0]
        if "error" in result:
            raise AssertionError(f"InfluxQL error: {result['error']} ({q})")
        series: list[dict[str, Any]] = result.get("series", [])
        return series

    def rows(self, db: str, q: str) -> list[dict[str, Any]]:
        """Each value row of each series as a dict of column to value, with its tags."""
        out = []
        for s in self.query(db, q):
            for values in s["values"]:
                out.append({**s.get("tags", {}), **dict(zip(s["columns"], values, strict=True))})
        return out

    def create_db(self) -> str:
        name = f"cl_{uuid.uuid4().hex[:12]}"
        self.client.post("/query", data={"q": f'CREATE DATABASE "{name}"'}).raise_for_status()
        return name


@pytest.fixture(scope="session")
def influxd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnInfluxd]:
    """The session's InfluxDB server."""
    server = OwnInfluxd(tmp_path_factory.mktemp("influxd"))
    server.start()
    yield server
    server.stop()
    server.client.close()


@pytest.fixture
def own_influxd(tmp_path: Path) -> Iterator[OwnInfluxd]:
    """An InfluxDB server of this test's own, which it may stop and start again."""
    server = OwnInfluxd(tmp_path / "influxd")
    server.start()
    yield server
    server.stop()
    server.client.close()


@pytest.fixture
def db(influxd: OwnInfluxd) -> str:
    """A fresh database on the session's server."""
    return influxd.create_db()
