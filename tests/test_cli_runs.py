"""``closedloop runs list|show`` and the runs section of ``closedloop report``: what a person
and a script read about runs; stored text printed literally."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop.cli import main
from test_cli_hostile import RAW_CONTROLS, TEXT, assert_literal


class Stored(NamedTuple):
    url: str
    spent: cl.Run  # a budget refused its third step
    aborted: cl.Run  # its one action rolled back


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop")


@pytest.fixture
def stored(tmp_path: Path) -> Stored:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    store = cl.open_store(url)
    lp = cl.Loop(lambda task, attempt: task, task_type="fix", store=store, guards=())
    with cl.Run(f"ticket {TEXT}", store=store, max_steps=2) as spent:
        spent.record_usage(120, 30, cost_usd=0.25)
        for i in range(3):
            lp.run(i)
    with cl.Run("undo", store=store) as aborted:
        aborted.on_rollback(lambda: None, label="drop table")
        aborted.abort(f"reason {TEXT}")
    store.close()
    return Stored(url, spent, aborted)


def test_runs_list_shows_the_newest_first_with_outcome_and_usage(stored: Stored) -> None:
    result = invoke("runs", "list", "--store", stored.url)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["run", "id", "started", "name"]
    assert lines[1].startswith(stored.aborted.run_id) and " aborted " in lines[1]
    assert lines[2].startswith(stored.spent.run_id) and " budget_exceeded " in lines[2]
    assert "120/30" in lines[2] and "$0.2500" in lines[2]
    assert_literal(result.stdout, f"ticket {TEXT}")


def test_runs_list_json_pages_and_filters(stored: Stored) -> None:
    result = invoke("runs", "list", "--store", stored.url, "--json", "--limit", "1")
    page = json.loads(result.stdout)
    assert [r["run_id"] for r in page["runs"]] == [stored.aborted.run_id]
    rest = json.loads(invoke("runs", "list", "--store", stored.url, "--json", "--cursor",
                             page["next_cursor"]).stdout)
    assert [r["run_id"] for r in rest["runs"]] == [stored.spent.run_id]
    assert rest["runs"][0]["name"] == f"ticket {TEXT}"  # JSON carries the raw text
    only = json.loads(invoke("runs", "list", "--store", stored.url, "--json", "--outcome",
                             "budget_exceeded").stdout)
    assert [r["outcome"] for r in only["runs"]] == ["budget_exceeded"]


def test_runs_show_prints_the_record_and_every_step(stored: Stored) -> None:
    result = invoke("runs", "show", stored.spent.run_id, "--store", stored.url)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"run {stored.spent.run_id}" in out and "budget_exceeded" in out
    assert "steps 2 admitted, 1 refused" in out and "budgets max_steps=2" in out
    assert out.count("fix succeeded") == 2 and out.count("fix budget_exceeded") == 1
    assert "error=budget_exceeded: run " in out
    assert_literal(out, f"ticket {TEXT}")


def test_runs_show_prints_the_abort_reason_and_the_compensation_literally(
        stored: Stored) -> None:
    out = invoke("runs", "show", stored.aborted.run_id, "--store", stored.url).stdout
    assert "aborted" in out and "1 compensated" in out and "compensated" in out
    assert_literal(out, f"reason {TEXT}")
    for raw in RAW_CONTROLS:
        assert raw not in out


def test_runs_show_json(stored: Stored) -> None:
    data = json.loads(invoke("runs", "show", stored.spent.run_id, "--store", stored.url,
                             "--json").stdout)
    assert data["run"]["run_id"] == stored.spent.run_id and data["run"]["steps"] == 2
    assert [s["outcome"] for s in data["steps"]] == ["succeeded", "succeeded",
                                                     "budget_exceeded"]


def test_runs_show_of_an_unknown_run_is_one_line_and_exit_1(stored: Stored) -> None:
    result = invoke("runs", "show", "f" * 32, "--store", stored.url)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no run {'f' * 32}"


def test_runs_show_of_a_run_whose_record_was_never_written(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    with cl.open_store(url) as store:  # a step of a run whose process died: no record
        cl.Loop(lambda t, a: t, task_type="t", store=store, guards=()).run(1, run_id="lost")
    out = invoke("runs", "show", "lost", "--store", url).stdout
    assert "run lost: no record" in out and "t succeeded" in out


def test_report_has_a_runs_section(stored: Stored) -> None:
    result = invoke("report", "--store", stored.url)
    assert result.exit_code == 0, result.output
    assert "Runs (closedloop runs list)" in result.stdout
    assert "aborted: 1, budget_exceeded: 1" in result.stdout
    data = json.loads(invoke("report", "--store", stored.url, "--json").stdout)
    assert data["runs"]["runs"] == 2 and data["runs"]["refused"] == 1
    assert data["runs"]["compensated"] == 1
    assert data["runs"]["outcomes"] == {"aborted": 1, "budget_exceeded": 1}
    assert json.loads(invoke("report", "--store", stored.url, "--json", "--task-type",
                             "fix").stdout)["runs"] is None


def test_runs_list_of_a_store_without_runs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    cl.open_store(url).close()
    result = invoke("runs", "list", "--store", url)
    assert result.exit_code == 1 and result.stderr.strip() == "no runs"
