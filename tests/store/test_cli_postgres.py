"""``--store postgresql://...`` for the commands: the demo writes there, report reads it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import closedloop as cl
from _report_scenario import run_scenario
from closedloop.cli import main


def test_report_on_postgresql_matches_report_on_sqlite(pg_url: str, tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'events.db'}"
    now = time.time()
    for url in (pg_url, sqlite_url):
        with cl.open_store(url) as store:
            run_scenario(store, now - 2 * 86_400)  # two days: two partitions on PostgreSQL
            run_scenario(store, now - 600)
    reports = []
    for url in (pg_url, sqlite_url):
        result = CliRunner().invoke(main, ["report", "--store", url, "--json", "--since", "7d"])
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout))
    pg_report, sqlite_report = reports
    assert pg_report["overall"]["runs"] == 20
    for key in set(pg_report) - {"store", "since", "until", "generated_at"}:
        assert pg_report[key] == sqlite_report[key], key


def test_demo_records_into_postgresql_and_report_reads_it(pg_url: str) -> None:
    demo = CliRunner().invoke(main, ["demo", "--requests", "6", "--seed", "2", "--json",
                                     "--store", pg_url])
    assert demo.exit_code == 0, demo.output
    report = CliRunner().invoke(main, ["report", "--store", pg_url, "--json"])
    assert report.exit_code == 0, report.output
    assert json.loads(report.stdout)["overall"]["runs"] == 6


def test_report_on_a_schema_without_a_store_is_one_line_and_creates_nothing(
    pg_url: str, pg_schema: str
) -> None:
    result = CliRunner().invoke(main, ["report", "--store", pg_url])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: no closedloop store in schema '{pg_schema}'; run `closedloop demo --store URL` "
        "or point --store at one")
    import psycopg

    from .conftest import PG_URL

    with psycopg.connect(PG_URL) as conn:
        found = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                             (pg_schema,)).fetchone()
    assert found == (0,)


@pytest.mark.requires("psycopg", "psycopg_pool")
def test_report_on_an_unreachable_server_is_one_line_without_the_password() -> None:
    url = "postgresql://postgres:hunter2@127.0.0.1:1/test"
    result = CliRunner().invoke(main, ["report", "--store", url])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot open store ")
    assert "hunter2" not in result.output and "postgres:***@127.0.0.1:1" in lines[0]


def test_autonomy_levels_on_postgresql(pg_url: str) -> None:
    with cl.open_store(pg_url) as store:
        loop = cl.Loop(lambda t, a: t, task_type="provision", executor=lambda p: p,
                       store=store, autonomy="suggest")
        step = loop.run(1).event
    assert step is not None and step.step_id is not None
    runner = CliRunner()
    done = runner.invoke(main, ["autonomy", "set", "provision", "suggest", "--by", "alice",
                                "--reason", "new agent", "--store", pg_url])
    assert done.exit_code == 0, done.output
    done = runner.invoke(main, ["autonomy", "feedback", step.step_id, "--disagreed",
                                "--store", pg_url])
    assert done.exit_code == 0, done.output
    status = runner.invoke(main, ["autonomy", "status", "--json", "--store", pg_url])
    assert status.exit_code == 0, status.output
    (key,) = json.loads(status.stdout)["keys"]
    assert (key["level"], key["key"]["task_type"]) == ("suggest", "provision")
    assert json.loads(status.stdout)["history"][0]["by"] == "alice"
