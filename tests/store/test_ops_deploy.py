"""docs/deploy.md and the files it ships agree: the compose file's services and ports, the
Prometheus, collector and Grafana configurations, every command line it shows, and its
agent snippet, which runs against a real PostgreSQL store."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]
from click.testing import CliRunner

import _services
import closedloop as cl
from closedloop.cli import main

from .test_contract import SRC

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOC = (ROOT / "docs" / "deploy.md").read_text()
COMPOSE: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
COLLECTOR: dict[str, Any] = yaml.safe_load((DEPLOY / "otel" / "collector.yaml").read_text())


def doc_table() -> dict[str, set[int]]:
    """The doc's table of services: name -> ports."""
    rows = re.findall(r"^\| (`[a-z-]+`|agents) \| ([\d, ]+) \|", DOC, re.MULTILINE)
    return {name.strip("`"): {int(p) for p in ports.split(",")} for name, ports in rows}


def published(service: dict[str, Any]) -> set[int]:
    """The host ports a compose service listens on."""
    if service.get("network_mode") == "host":
        args = " ".join(service.get("command", []))
        env = service.get("environment", {})
        found = re.findall(r"--web\.listen-address=[\d.]+:(\d+)", args)
        found += [env["GF_SERVER_HTTP_PORT"]] if "GF_SERVER_HTTP_PORT" in env else []
        return {int(p) for p in found}
    return {int(p.split(":")[-2]) for p in service.get("ports", [])}


def shell_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC, re.DOTALL)


def test_the_doc_lists_every_compose_service_with_its_ports() -> None:
    table = doc_table()
    assert set(table) - {"agents"} == set(SERVICES)
    for name, service in SERVICES.items():
        assert published(service) == table[name], name


def test_compose_publishes_on_loopback_only_and_mounts_files_that_exist() -> None:
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), (name, source)
    assert "docker compose -f deploy/compose.yaml up -d" in DOC


def test_prometheus_accepts_the_configuration_and_scrapes_the_agents_port() -> None:
    config = DEPLOY / "prometheus" / "prometheus.yml"
    out = subprocess.run([_services.program("promtool"), "check", "config", str(config)],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = yaml.safe_load(config.read_text())["scrape_configs"]
    targets = [t for job in jobs for c in job["static_configs"] for t in c["targets"]]
    assert {int(t.rsplit(":", 1)[1]) for t in targets} == doc_table()["agents"]


def test_grafana_reads_that_prometheus_and_the_mounted_dashboard() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    assert int(source["url"].rsplit(":", 1)[1]) in doc_table()["prometheus"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "closedloop.yml").read_text())[
        "providers"]
    mounted = [v.split(":")[1] for v in SERVICES["grafana"]["volumes"]
               if v.startswith("./grafana/closedloop.json")]
    assert mounted == [f"{provider['options']['path']}/closedloop.json"]


def test_the_collector_pipelines_use_only_declared_parts_on_the_documented_ports() -> None:
    declared = {kind: set(COLLECTOR[kind]) for kind in ("receivers", "processors", "exporters")}
    for name, pipeline in COLLECTOR["service"]["pipelines"].items():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= declared[kind], (name, kind)
    protocols = COLLECTOR["receivers"]["otlp"]["protocols"]
    ports = {int(p["endpoint"].rsplit(":", 1)[1]) for p in protocols.values()}
    assert ports == doc_table()["otel-collector"] == published(SERVICES["otel-collector"])
    backend = COLLECTOR["exporters"]["otlp/traces"]["endpoint"].split(":")[0]
    assert backend in SERVICES


def test_every_command_line_in_the_doc_is_a_real_command_with_real_options() -> None:
    lines = [line.split("#")[0].strip() for block in shell_blocks()
             for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("closedloop ")]
    assert len(commands) >= 8
    for args in commands:
        result = CliRunner().invoke(main, [*args, "--help"])
        assert result.exit_code == 0, (args, result.output)


def test_the_doc_names_the_environment_variables_closedloop_reads() -> None:
    from closedloop._runtime import REDIS_ENV
    from closedloop.store import ENV_VAR, RETENTION_ENV

    named = set(re.findall(r"export (CLOSEDLOOP_[A-Z_]+)=", DOC))
    assert named == {ENV_VAR, REDIS_ENV, RETENTION_ENV}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def collector() -> Iterator[tuple[int, list[str]]]:
    """An OTLP/gRPC trace receiver on loopback, standing in for the collector: its port and
    the names of the spans it received."""
    import grpc  # type: ignore[import-untyped]
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    names: list[str] = []

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:
            names.extend(span.name for rs in request.resource_spans
                         for ss in rs.scope_spans for span in ss.spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, names
    server.stop(grace=None)


def test_the_agent_snippet_records_into_postgresql_and_traces_to_the_collector(
    pg_url: str, collector: tuple[int, list[str]],
) -> None:
    (snippet,) = [b for b in re.findall(r"```python\n(.*?)```", DOC, re.DOTALL)
                  if "telemetry.configure(" in b]
    otlp_port, received = collector
    code = snippet.replace("metrics_port=9464", f"metrics_port={_free_port()}").replace(
        '"localhost:4317"', f'"127.0.0.1:{otlp_port}"')
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": SRC, "CLOSEDLOOP_STORE": pg_url,
           "CLOSEDLOOP_RETENTION": "30d", "HOME": os.environ.get("HOME", "/tmp")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    with cl.open_store(pg_url, read_only=True) as store:
        assert [e.task_type for e in store.events()] == ["echo"]
    assert "closedloop.step" in received


@pytest.mark.parametrize("name", ["compose.yaml", "prometheus/prometheus.yml",
                                  "otel/collector.yaml", "grafana/closedloop.json"])
def test_the_doc_links_the_files_it_ships(name: str) -> None:
    assert f"../deploy/{name}" in DOC
    assert (DEPLOY / name).is_file()
