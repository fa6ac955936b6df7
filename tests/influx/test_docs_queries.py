"""The InfluxQL queries of docs/influxdb.md, run against a real InfluxDB holding steps whose
answers are known: every query runs, and the design's questions get the right answers."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest

import closedloop as cl

from .conftest import OwnInfluxd

pytestmark = pytest.mark.requires("influxd")

DOC = Path(__file__).parents[2] / "docs" / "influxdb.md"
QUERIES = re.findall(r"```sql\n(.*?)\n```", DOC.read_text(), re.S)

# (task type, model, prompt version, region, steps, failures)
PLAN = [("plan", "model-a", "p1", "eu", 8, 1), ("plan", "model-b", "p1", "us", 4, 3),
        ("apply", "model-a", "p2", "eu", 5, 0)]


@pytest.fixture(scope="module")
def seeded(influxd: OwnInfluxd) -> tuple[OwnInfluxd, str]:
    db = influxd.create_db()
    cl.configure(store="memory://", influxdb=influxd.url(db),
                 prices={"model-*": {"input": 1.0, "output": 0.0}})
    try:
        for task, model, prompt, region, steps, failures in PLAN:
            def agent(i: int, attempt: cl.Attempt, model: str = model,
                      failures: int = failures) -> int:
                attempt.record_usage(1_000, 0, model=model, provider="test")
                if i < failures:
                    raise RuntimeError(f"{model} timed out after {i} s")
                return i

            loop = cl.Loop(agent, task_type=task, prompt_version=prompt,
                           labels={"region": region})
            for i in range(steps):
                with contextlib.suppress(RuntimeError):
                    loop.run(i)
        assert cl.current_runtime().flush(30)
    finally:
        cl.reset()
    return influxd, db


def test_the_doc_has_the_queries() -> None:
    assert len(QUERIES) >= 8


@pytest.mark.parametrize("query", QUERIES, ids=lambda q: q[:60])
def test_every_documented_query_runs_and_answers(seeded: tuple[OwnInfluxd, str],
                                                 query: str) -> None:
    server, db = seeded
    assert server.query(db, query), f"no series: {query}"


def _rows(seeded: tuple[OwnInfluxd, str], needle: str) -> list[dict[str, object]]:
    server, db = seeded
    [query] = [q for q in QUERIES if needle in q]
    return server.rows(db, query)


def test_which_task_types_succeed_most(seeded: tuple[OwnInfluxd, str]) -> None:
    rows = {r["task_type"]: (r["success_rate"], r["steps"])
            for r in _rows(seeded, 'AS "success_rate", count("succeeded")')}
    assert rows == {"plan": (8 / 12, 12), "apply": (1.0, 5)}


def test_where_failures_cluster(seeded: tuple[OwnInfluxd, str]) -> None:
    rows = {(r["task_type"], r["error_type"]): r["failures"]
            for r in _rows(seeded, 'GROUP BY "task_type", "error_type"')}
    assert rows == {("plan", "agent"): 4}


def test_what_correlates_with_errors(seeded: tuple[OwnInfluxd, str]) -> None:
    by_model = {(r["task_type"], r["model"], r["prompt_version"]): r["failure_rate"]
                for r in _rows(seeded, 'GROUP BY "task_type", "model", "prompt_version"')}
    assert by_model == {("plan", "model-a", "p1"): pytest.approx(1 / 8),
                        ("plan", "model-b", "p1"): pytest.approx(3 / 4),
                        ("apply", "model-a", "p2"): 0.0}
    by_region = {r["label_region"]: r["steps"] for r in _rows(seeded, '"label_region"')}
    assert by_region == {"eu": 13, "us": 4}


def test_what_a_success_costs(seeded: tuple[OwnInfluxd, str]) -> None:
    rows = {r["task_type"]: (r["cost_usd"], r["cost_per_success"])
            for r in _rows(seeded, '"cost_per_success"')}
    assert rows["plan"] == (pytest.approx(12 * 0.001), pytest.approx(12 * 0.001 / 8))
    assert rows["apply"] == (pytest.approx(5 * 0.001), pytest.approx(0.001))
