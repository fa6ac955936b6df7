"""The shipped alert rules load in Prometheus and fire as intended, and a real Prometheus
scrapes ``closedloop serve --metrics`` on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import _services
from closedloop.store import open_store
from closedloop.telemetry import StoreExporter, Telemetry

from .test_deploy import dashboard_exprs

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_promtool_accepts_the_alert_rules() -> None:
    out = subprocess.run([_services.program("promtool"), "check", "rules", str(ALERTS)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "6 rules found" in out.stdout


def test_the_alerts_fire_on_spikes_and_halts_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    spec = (Path(__file__).parent / "alerts_test.yml").read_text()
    test_file = tmp_path / "alerts_test.yml"
    test_file.write_text(spec.replace("ALERTS_FILE", str(ALERTS)))
    out = subprocess.run([_services.program("promtool"), "test", "rules", str(test_file)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def _wait(what: str, probe: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = probe()
        except (httpx.HTTPError, ValueError, KeyError):
            # not listening yet, or still starting: Prometheus answers 503 in plain text
            # ("Service Unavailable") until its storage is ready
            found = None
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def served_store(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A store with a `closedloop serve --metrics` process tailing it."""
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    open_store(url).close()
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from closedloop.cli import main; main()", "serve", "--metrics",
         "--store", url, "--port", str(port), "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait("closedloop serve", lambda: proc.poll() is None and httpx.get(f"http://127.0.0.1:{port}/metrics",
                                                    timeout=1.0).status_code == 200)
        yield url, port
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.slow
def test_prometheus_scrapes_serve_and_loads_the_rules(
    tmp_path: Path, served_store: tuple[str, int],
) -> None:
    url, metrics_port = served_store
    prom_port = _port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{ALERTS}']\n"
        "scrape_configs:\n"
        "  - job_name: closedloop\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n")
    store = open_store(url)
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    with pipeline.span("closedloop.step", **{"closedloop.task_type": "deploy",
                                            "closedloop.outcome": "halted"}):
        pass
    pipeline.shutdown()
    store.close()
    prom = subprocess.Popen(
        [_services.program("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        query = 'closedloop_task_runs_total{task_type="deploy",outcome="halted"}'
        result = _wait("the scraped series", lambda: httpx.get(
            f"{api}/query", params={"query": query}, timeout=2.0).json()["data"]["result"])
        assert result[0]["value"][1] == "1"
        groups = httpx.get(f"{api}/rules", timeout=2.0).json()["data"]["groups"]
        assert [g["name"] for g in groups] == ["closedloop"]
        assert len(groups[0]["rules"]) == 6
        targets = httpx.get(f"{api}/targets", timeout=2.0).json()["data"]["activeTargets"]
        assert targets[0]["health"] == "up"
        for expr in dashboard_exprs():  # every dashboard panel is valid PromQL for Prometheus
            answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=2.0).json()
            assert answer["status"] == "success", (expr, answer)
    finally:
        prom.terminate()
        prom.wait(10)
