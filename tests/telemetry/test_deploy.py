"""The shipped Grafana dashboard and alert rules only use metrics closedloop exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml  # type: ignore[import-untyped]
from prometheus_client import CollectorRegistry, generate_latest

import closedloop as cl
from closedloop.telemetry import Metrics, Telemetry

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "closedloop.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
NAME = re.compile(r"\b((?:closedloop|gen_ai)_[a-z_]+)")
GROUPING = re.compile(r"\bby \([^)]*\)")  # label names, not metrics


def metric_names(expr: str) -> set[str]:
    return {family(n) for n in NAME.findall(GROUPING.sub("", expr))}


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p["targets"]]


def alert_exprs() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def exported_families(store: cl.Store) -> set[str]:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    pipeline = Telemetry([metrics])
    metrics.watch(telemetry=pipeline, store=store)
    text = generate_latest(registry).decode()
    pipeline.shutdown()
    return {family(n) for n in re.findall(r"^# TYPE (\S+)", text, re.MULTILINE)}


def family(name: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_total"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def test_the_dashboard_only_queries_exported_metrics(store: cl.Store) -> None:
    families = exported_families(store)
    used = set().union(*(metric_names(e) for e in dashboard_exprs()))
    assert used
    assert used <= families, used - families


def test_the_alerts_only_query_exported_metrics(store: cl.Store) -> None:
    families = exported_families(store)
    used = set().union(*(metric_names(e) for e in alert_exprs()))
    assert used <= families, used - families
