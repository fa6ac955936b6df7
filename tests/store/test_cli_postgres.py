"""``--store postgresql://...`` for the commands: the demo writes there, report reads it."""

from __future__ import annotations

import json
import time
from pathlib import Path

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
