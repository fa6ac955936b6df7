"""The command line: ``closedloop report`` for people and scripts, and one-line user errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from _report_scenario import run_scenario
from closedloop.cli import main
from closedloop.cli._common import EXIT_NO_DATA, Since
from closedloop.learn import report_from_store

T0 = 1_700_000_000.0


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop")


def assert_one_line_error(result: Result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0]
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                      SystemExit)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A store file holding the scenario twice: two days ago and ten minutes ago."""
    path = tmp_path / "events.db"
    with cl.open_store(f"sqlite:///{path}") as store:
        now = time.time()
        run_scenario(store, now - 2 * 86400)
        run_scenario(store, now - 600)
    return path


def test_version_prints_the_package_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert cl.__version__ in result.output


def test_report_prints_each_task_type_and_overall(db: Path) -> None:
    result = invoke("report", "--store", str(db))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for title in ("Feedback loops", "Latency (ms) and tokens", "Outcomes", "Top error types"):
        assert title in out
    provision = next(line for line in out.splitlines() if "provision" in line)
    assert "83.3% (10/12)" in provision  # validation
    assert "50.0% (6/12)" in provision  # re-ask
    assert "66.7% (4/6)" in provision  # re-ask ok
    assert "60.0% (6/10)" in provision  # verification
    overall = next(line for line in out.splitlines() if "overall" in line)
    assert "│   20 │" in overall


def test_report_json_is_the_report_dict_plus_scores(db: Path) -> None:
    result = invoke("report", "--store", str(db), "--json")
    assert result.exit_code == 0, result.output
    with cl.open_store(db) as store:
        expected = {**report_from_store(store).to_dict(), "scores": []}  # no scores recorded
    assert json.loads(result.stdout) == expected
    assert result.stderr == ""


def test_since_age_keeps_only_recent_events(db: Path) -> None:
    result = invoke("report", "--store", str(db), "--since", "1h", "--json")
    data = json.loads(result.stdout)
    assert data["overall"]["runs"] == 10
    assert data["since"] == pytest.approx(time.time() - 3600, abs=60)


def test_since_date_and_iso_datetime_are_utc(db: Path) -> None:
    three_days_ago = time.time() - 3 * 86400
    day = time.strftime("%Y-%m-%d", time.gmtime(three_days_ago))
    result = invoke("report", "--store", str(db), "--since", day, "--json")
    assert json.loads(result.stdout)["overall"]["runs"] == 20
    an_hour_ago = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 3600))
    for text in (an_hour_ago, an_hour_ago + "Z", an_hour_ago + "+00:00"):
        result = invoke("report", "--store", str(db), "--since", text, "--json")
        assert json.loads(result.stdout)["overall"]["runs"] == 10, text


@pytest.mark.parametrize(
    ("text", "seconds_ago"),
    [("30s", 30), ("30m", 1800), ("24h", 86400), ("7d", 7 * 86400), ("2w", 14 * 86400),
     ("1.5h", 5400), ("90M", 5400)],
)
def test_since_ages_count_back_from_now(text: str, seconds_ago: float) -> None:
    assert Since(now=lambda: 1e9).convert(text, None, None) == 1e9 - seconds_ago


def test_task_type_filter(db: Path) -> None:
    result = invoke("report", "--store", str(db), "--task-type", "review", "--json")
    data = json.loads(result.stdout)
    assert [row["task_type"] for row in data["task_types"]] == ["review"]
    assert data["overall"]["outcomes"]["paused"] == 2


def test_default_store_comes_from_the_environment(tmp_path: Path) -> None:
    # conftest points CLOSEDLOOP_STORE at default.db in the test's folder
    with cl.open_store(tmp_path / "default.db") as store:
        run_scenario(store, T0)
    result = invoke("report", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["overall"]["runs"] == 10


def test_empty_window_is_one_line_and_exit_1(db: Path) -> None:
    result = invoke("report", "--store", str(db), "--task-type", "nope")
    assert result.exit_code == EXIT_NO_DATA
    assert result.stderr.startswith("no events for task type 'nope' in sqlite:///")
    assert result.stderr.count("\n") == 1
    assert result.stdout == ""


def test_empty_window_with_json_still_prints_the_empty_report(db: Path) -> None:
    result = invoke("report", "--store", str(db), "--since", "2099-01-01", "--json")
    assert result.exit_code == EXIT_NO_DATA
    data = json.loads(result.stdout)
    assert data["overall"]["runs"] == 0
    assert data["task_types"] == []
    assert data["overall"]["validation"]["rate"] is None
    assert "no events" in result.stderr


def test_empty_store_is_one_line_and_exit_1(tmp_path: Path) -> None:
    cl.open_store(tmp_path / "empty.db").close()
    result = invoke("report", "--store", f"sqlite:///{tmp_path / 'empty.db'}")
    assert result.exit_code == EXIT_NO_DATA
    assert result.stderr.count("\n") == 1
    assert "no events for any task type" in result.stderr


def test_missing_store_file_is_an_error_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "events.db"
    result = invoke("report", "--store", f"sqlite:///{missing}")
    assert_one_line_error(result, 1, f"no store at {missing}", "closedloop demo")
    assert not missing.exists()
    assert not missing.parent.exists()


def test_unsupported_store_url_exits_2(tmp_path: Path) -> None:
    assert_one_line_error(invoke("report", "--store", "mysql://x"), 2,
                          "unsupported store URL 'mysql://x'")


def test_store_url_without_a_path_exits_2() -> None:
    assert_one_line_error(invoke("report", "--store", "sqlite:///"), 2, "has no path")


def test_store_path_that_is_a_directory_exits_1(tmp_path: Path) -> None:
    assert_one_line_error(invoke("report", "--store", str(tmp_path)), 1, "not a file")


def test_store_file_that_is_not_a_database_exits_1(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("these are not the events you are looking for\n" * 100)
    assert_one_line_error(invoke("report", "--store", str(junk)), 1, "cannot open store")


def test_unreadable_store_file_exits_1(db: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("running as root: file permissions do not stop reading")
    db.chmod(0)
    try:
        assert_one_line_error(invoke("report", "--store", str(db)), 1, "cannot open store")
    finally:
        db.chmod(0o600)


def test_bad_since_value_is_a_one_line_usage_error(db: Path) -> None:
    assert_one_line_error(invoke("report", "--store", str(db), "--since", "yesterday-ish"), 2,
                          "--since", "yesterday-ish", "closedloop report --help")


def test_unknown_option_is_a_one_line_usage_error() -> None:
    assert_one_line_error(invoke("report", "--bogus"), 2, "No such option '--bogus'")
    assert_one_line_error(invoke("--bogus"), 2, "No such option '--bogus'")


def test_unknown_command_is_a_one_line_usage_error() -> None:
    assert_one_line_error(invoke("nosuch"), 2, "No such command 'nosuch'")


def test_no_command_prints_help() -> None:
    result = invoke()
    assert "report" in result.output
    assert "Usage:" in result.output


def test_help_defines_the_report_columns() -> None:
    result = invoke("report", "--help")
    assert result.exit_code == 0
    for term in ("Validation", "Re-ask ok", "Verification", "nearest rank", "Exit codes",
                 '"task_types"'):
        assert term in result.stdout


@pytest.mark.parametrize(
    ("text", "reason"),
    [("soon", "neither an age (30m, 24h, 7d) nor a date"),
     ("", "neither an age"),
     ("-5m", "neither an age"),
     ("2026-02-30", "not a valid date or ISO datetime: day is out of range for month"),
     ("2026-11-01T25:00", "hour must be in 0..23"),
     ("99999999999w", "too far back")],
)
def test_since_rejects_what_it_cannot_read(text: str, reason: str) -> None:
    with pytest.raises(click.BadParameter, match=re.escape(reason)):
        Since().convert(text, None, None)


def _closedloop(*args: str, env_store: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("closedloop")  # the console script pip installed
    script = "from closedloop.cli import main; main(prog_name='closedloop')"
    command = [str(exe)] if exe.exists() else [sys.executable, "-c", script]
    env = {**os.environ, "CLOSEDLOOP_STORE": f"sqlite:///{env_store}"}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_installed_command_reports_and_fails_without_tracebacks(db: Path, tmp_path: Path) -> None:
    ok = _closedloop("report", "--json", env_store=db)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["overall"]["runs"] == 20
    table = _closedloop("report", "--since", "1h", env_store=db)
    assert table.returncode == 0, table.stderr
    assert "overall" in table.stdout
    for args, code in [
        (("report",), 1),  # no store file at the default
        (("report", "--store", "mysql://x"), 2),
        (("report", "--since", "yesterday-ish"), 2),
        (("report", "--store", str(tmp_path)), 1),
    ]:
        failed = _closedloop(*args, env_store=tmp_path / "missing.db")
        assert failed.returncode == code, (args, failed.stderr)
        assert "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1, failed.stderr
