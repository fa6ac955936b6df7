"""``closedloop status`` and ``closedloop resume`` against the store's SQLite file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import closedloop as cl
from closedloop.cli import main
from closedloop.control import SQLiteLedger, Stop, StopKind


@pytest.fixture
def halted_store(tmp_path: Path) -> str:
    db = tmp_path / "events.db"
    cl.open_store(f"sqlite:///{db}").close()
    SQLiteLedger(db).put(Stop(task_type="provision", kind=StopKind.HALTED,
                              reason="5 verifications failed in a row", by="FaultControl",
                              at=time.time(), evidence={"consecutive_failures": 5}))
    return f"sqlite:///{db}"


def test_status_shows_the_halt_with_who_and_why(halted_store: str) -> None:
    result = CliRunner().invoke(main, ["status", "--store", halted_store])
    assert result.exit_code == 0
    assert "provision" in result.output
    assert "HALTED" in result.output
    assert "5 verifications failed in a row" in result.output


def test_status_json_lists_the_stops(halted_store: str) -> None:
    result = CliRunner().invoke(main, ["status", "--store", halted_store, "--json"])
    data = json.loads(result.output)
    assert data["stops"][0]["task_type"] == "provision"
    assert data["stops"][0]["evidence"] == {"consecutive_failures": 5}


def test_resume_lifts_the_halt(halted_store: str) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["resume", "provision", "--reason", "AMI fixed",
                                  "--by", "alice", "--store", halted_store])
    assert result.exit_code == 0, result.output
    assert "resumed provision" in result.output
    status = json.loads(runner.invoke(main, ["status", "--store", halted_store,
                                             "--json"]).output)
    assert status["stops"] == []
    assert status["history"][0]["by"] == "alice"


def test_resume_without_a_reason_is_a_usage_error(halted_store: str) -> None:
    result = CliRunner().invoke(main, ["resume", "provision", "--store", halted_store])
    assert result.exit_code == 2
    assert "--reason" in result.output


def test_resuming_a_running_task_type_says_so(halted_store: str) -> None:
    result = CliRunner().invoke(main, ["resume", "deploy", "--reason", "x",
                                       "--store", halted_store])
    assert result.exit_code == 1
    assert "neither halted nor paused" in result.output


def test_status_shows_limits_published_by_a_process(halted_store: str) -> None:
    from closedloop.control import Backpressure

    ledger = SQLiteLedger(halted_store[len("sqlite:///"):])
    bp = Backpressure(publish_to=ledger)
    bp.call("anthropic/claude", lambda: "ok")
    result = CliRunner().invoke(main, ["status", "--store", halted_store, "--json"])
    data = json.loads(result.output)
    (name, snap), = data["keys"].items()
    assert name.startswith("anthropic/claude@pid ")
    assert snap["breaker"] == "closed"
    assert snap["counts"]["ok"] == 1


def test_status_prints_stored_text_literally(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    cl.open_store(f"sqlite:///{db}").close()
    hostile = "[/bold] [red]boom[error] \x1b[31m"
    SQLiteLedger(db).put(Stop(task_type="[error]deploy", kind=StopKind.HALTED, reason=hostile,
                              by="[bold]mallory", at=time.time()))
    result = CliRunner().invoke(main, ["status", "--store", f"sqlite:///{db}"],
                                env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "[error]deploy" in result.output
    assert "[/bold] [red]boom[error]" in result.output
    assert "[bold]mallory" in result.output


def test_status_on_an_unreadable_store_is_one_line(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    db.write_bytes(b"this is not a database" * 100)
    result = CliRunner().invoke(main, ["status", "--store", f"sqlite:///{db}"])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
