"""The command line: ``closedloop report`` for people and scripts, and one-line user errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

import _services
import closedloop as cl
from _report_scenario import run_scenario
from closedloop.cli import main
from closedloop.cli._common import EXIT_NO_DATA, Since
from closedloop.control import SQLiteLedger, Stop, StopKind
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


def test_report_shows_why_steps_failed_grouped(db: Path) -> None:
    result = invoke("report", "--store", str(db))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Failure messages" in out
    lands = next(line for line in out.splitlines() if "check lands returned False" in line)
    assert "lands: [error] failed:" in lands  # "[error]" is text, not markup that vanishes
    assert "│     4 │" in lands  # both windows' two verification failures, one group
    assert "Failure messages" not in invoke("report", "--store", str(db),
                                            "--top-messages", "0").stdout


def test_report_shows_cost_in_total_and_per_success_when_steps_were_priced(
        tmp_path: Path) -> None:
    path = tmp_path / "priced.db"
    with cl.open_store(f"sqlite:///{path}") as store:
        run_scenario(store, time.time() - 600)
        assert "Cost (USD)" not in invoke("report", "--store", str(path)).stdout
        loop = cl.Loop(lambda x, a: a.record_usage(1000, 0, cost_usd=1.5), task_type="priced",
                       store=store)
        for i in range(4):
            loop.run(i)
    result = invoke("report", "--store", str(path))
    assert result.exit_code == 0, result.output
    assert "Cost (USD)" in result.stdout
    lines = [line for line in result.stdout.splitlines() if "$" in line]
    [priced] = [line for line in lines if "priced" in line]
    assert "$6.00" in priced and "4/4" in priced and "$1.50" in priced
    [overall] = [line for line in lines if "overall" in line]
    assert "$6.00" in overall and "4/14" in overall and "$0.7500" in overall
    data = json.loads(invoke("report", "--store", str(path), "--json").stdout)
    assert data["overall"]["outcomes"]["succeeded"] == 8
    assert data["overall"]["cost"] == {"total_usd": 6.0, "priced": 4, "per_success_usd": 0.75}


def test_report_json_is_the_report_dict_plus_scores_and_runs(db: Path) -> None:
    result = invoke("report", "--store", str(db), "--json")
    assert result.exit_code == 0, result.output
    with cl.open_store(db) as store:
        expected = {**report_from_store(store).to_dict(), "scores": [],  # no scores recorded
                    "runs": store.runs().summarize_runs().to_dict()}
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


@pytest.mark.parametrize("command", [
    ("report",), ("traces", "list"), ("traces", "show", "0" * 32), ("scores", "list"),
    ("status",), ("replay", "--task-type", "t", "--validator", "json:loads")])
def test_readers_never_turn_another_file_into_a_store(tmp_path: Path,
                                                      command: tuple[str, ...]) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    conn.close()
    before = other.read_bytes()
    for path in (empty, other):
        assert_one_line_error(invoke(*command, "--store", str(path)), 1,
                              f"sqlite:///{path} is not a closedloop store")
    assert empty.stat().st_size == 0
    assert other.read_bytes() == before


def test_readers_read_a_store_on_a_read_only_mount(db: Path, tmp_path: Path) -> None:
    data, mount = tmp_path / "data", tmp_path / "ro"
    data.mkdir()
    mount.mkdir()
    shutil.copy(db, data / "events.db")
    SQLiteLedger(data / "events.db").put(Stop(task_type="provision", kind=StopKind.HALTED,
                                              reason="disk", by="ops", at=time.time()))
    bind = subprocess.run(["mount", "--bind", str(data), str(mount)], capture_output=True,
                          check=False)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount here (needs CAP_SYS_ADMIN): {bind.stderr!r}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mount)], check=True)
        with pytest.raises(OSError, match="Read-only file system"):
            (mount / "probe").touch()
        before = sorted(p.name for p in mount.iterdir())
        # real processes: the test process keeps no file on the mount open
        report = _closedloop("report", "--json", env_store=mount / "events.db")
        assert report.returncode == 0, report.stderr
        assert json.loads(report.stdout)["overall"]["runs"] == 20
        traces = _closedloop("traces", "list", env_store=mount / "events.db")
        assert (traces.returncode, traces.stderr) == (1, "no traces\n")
        status = _closedloop("status", "--json", env_store=mount / "events.db")
        assert status.returncode == 0, status.stderr
        assert [s["task_type"] for s in json.loads(status.stdout)["stops"]] == ["provision"]
        assert sorted(p.name for p in mount.iterdir()) == before
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_unreadable_store_file_exits_1(db: Path) -> None:
    # root reads any file through CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH; a root process
    # started without them (as CI runs) obeys the file's permission bits like anyone else
    without_override = ([_services.program("setpriv"),
                         "--bounding-set=-dac_override,-dac_read_search", "--"]
                        if os.geteuid() == 0 else [])
    db.chmod(0)
    try:
        result = _closedloop("report", env_store=db, prefix=without_override)
    finally:
        db.chmod(0o600)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("error: ") and "cannot open store" in line, line
    assert result.stdout == ""


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


def _closedloop(*args: str, env_store: Path, prefix: list[str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("closedloop")  # the console script pip installed
    script = "from closedloop.cli import main; main(prog_name='closedloop')"
    command = [str(exe)] if exe.exists() else [sys.executable, "-c", script]
    env = {**os.environ, "CLOSEDLOOP_STORE": f"sqlite:///{env_store}"}
    return subprocess.run([*(prefix or []), *command, *args], capture_output=True, text=True,
                          env=env,
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


def test_a_store_opened_read_only_refuses_to_write(db: Path) -> None:
    store = cl.open_store(db, read_only=True)
    try:
        with pytest.raises(cl.StoreError, match="opened read-only"):
            store.backend.write_batch([])
        assert store.count() == 20
    finally:
        store.close()


def _subcommands(group: click.Group) -> dict[str, click.Command]:
    """The group's commands as `--help` finds them (the list may be filled lazily)."""
    ctx = click.Context(group)
    found = {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}
    return {name: command for name, command in found.items() if command is not None}


def _commands(group: click.Group, path: str = "closedloop") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(_subcommands(group).items()):
        yield f"{path} {name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{path} {name}")


@pytest.mark.parametrize("columns", ["50", "80", "200"])
@pytest.mark.parametrize("group", [(), ("traces",), ("scores",)])
def test_help_lists_each_command_with_its_whole_first_sentence(columns: str,
                                                               group: tuple[str, ...]) -> None:
    result = CliRunner(env={"COLUMNS": columns}).invoke(main, [*group, "--help"],
                                                        prog_name="closedloop")
    assert result.exit_code == 0, result.output
    listing = " ".join(result.stdout.split("Commands:")[1].split())
    assert "..." not in listing
    parent = main if not group else _subcommands(main)[group[0]]
    assert isinstance(parent, click.Group)
    commands = _subcommands(parent)
    assert len(commands) >= 2
    for name, command in commands.items():
        summary = " ".join(command.get_short_help_str(limit=1_000).split())
        assert summary.endswith("."), summary  # a sentence, not a cut-off phrase
        assert f"{name} {summary}" in listing


def test_every_option_of_every_command_has_help_text() -> None:
    commands = dict(_commands(main))
    assert {"closedloop report", "closedloop traces show", "closedloop serve"} <= set(commands)
    missing = [f"{path} {param.opts[0]}" for path, command in commands.items()
               for param in command.params
               if isinstance(param, click.Option) and not param.hidden and not param.help]
    assert missing == []


def _start(*args: str, **env: str) -> subprocess.Popen[str]:
    # Ctrl-C handled as in an interactive shell's child: a test run started in the background
    # passes SIGINT on ignored, and Python would keep ignoring it
    script = ("import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
              "from closedloop.cli import main; main(prog_name='closedloop')")
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def _stopped(proc: subprocess.Popen[str], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 0)])
def test_serve_needs_no_flag_and_stops_on_ctrl_c_with_130(db: Path, sig: int, code: int) -> None:
    with _start("serve", "--port", "0", "--store", str(db)) as proc:
        try:
            assert proc.stderr is not None
            first = proc.stderr.readline()  # written once it listens and handles signals
            match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", first)
            assert match, first
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback
            with direct.open(match.group(0), timeout=10) as response:
                assert b"closedloop" in response.read()
            returncode, rest = _stopped(proc, sig)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert returncode == code
    assert "Traceback" not in rest
    assert rest == ("error: interrupted\n" if sig == signal.SIGINT else "")


def _blocked_reading_stdin(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/wchan").read_text().endswith("pipe_read")
    except OSError:
        return False


def test_ctrl_c_in_any_command_is_one_line_and_exit_130(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object"}')
    with _start("check", "json-schema", "--schema", str(schema), "-") as proc:
        try:
            deadline = time.monotonic() + 30
            while not _blocked_reading_stdin(proc.pid):  # waiting for the document on stdin
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.02)
            returncode, err = _stopped(proc, signal.SIGINT)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert (returncode, err) == (130, "error: interrupted\n")


_BLOCK = ("import sys; sys.modules.update(dict.fromkeys({modules!r})); "
          "from closedloop.cli import main; main(prog_name='closedloop')")


def _without(modules: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    """The command in a process where ``modules`` cannot be imported (as if not installed)."""
    return subprocess.run([sys.executable, "-c", _BLOCK.format(modules=modules), *args],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("module", "extra", "command"), [
    ("prometheus_client", "prometheus", ("serve", "--port", "0")),
    ("opentelemetry", "otel", ("scores", "export", "--otlp-http", "http://127.0.0.1:9/v1/logs")),
])
def test_a_missing_extra_is_one_line_naming_what_to_install(db: Path, module: str, extra: str,
                                                            command: tuple[str, ...]) -> None:
    from closedloop.telemetry import record_score

    with cl.open_store(db) as store:  # something to export
        record_score("0" * 32, "quality", 1, store=store)
    done = _without((module,), *command, "--store", str(db))
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: closedloop {command[0]}")
    assert f"needs the '{extra}' extra: pip install 'closedloop[{extra}]'" in done.stderr


@pytest.mark.parametrize("command", [
    ("traces", "show", "0" * 32), ("traces", "list"), ("scores", "list"),
    ("scores", "add", "0" * 32, "q", "1"),
    ("replay", "--task-type", "t", "--validator", "json:loads")])
def test_readers_without_the_telemetry_extras_work_or_name_them(db: Path,
                                                               command: tuple[str, ...]) -> None:
    done = _without(("opentelemetry", "prometheus_client"), *command, "--store", str(db))
    assert "Traceback" not in done.stderr
    assert done.returncode in (0, 1), done.stderr
    assert done.stderr.count("\n") <= 1, done.stderr
    if "extra" in done.stderr:  # the command imports them: it says which to install
        assert re.fullmatch(r"error: closedloop [a-z ]+ needs the '(otel|prometheus)' extra: "
                            r"pip install 'closedloop\[(otel|prometheus)\]' \(\S+ is not "
                            r"installed\)\n", done.stderr), done.stderr


def test_an_import_error_of_closedloop_itself_is_not_blamed_on_an_extra(db: Path) -> None:
    done = _without(("closedloop.learn._diff",), "traces", "show", "0" * 32, "--store",
                    str(db))
    assert done.returncode == 1
    assert "extra" not in done.stderr
    assert "closedloop.learn._diff" in done.stderr


@pytest.mark.parametrize("url", ["memory://", "sqlite:///{tmp}/events.db"])
def test_events_can_be_read_by_trace_id(tmp_path: Path, url: str) -> None:
    store = cl.open_store(url.format(tmp=tmp_path))
    try:
        loop = cl.Loop(lambda task, attempt: task, task_type="t", store=store, telemetry=None)
        first, second = loop.run(1).trace_id, loop.run(2).trace_id
        store.flush()
        assert [e.trace_id for e in store.events(trace_id=second)] == [second]
        assert [e.trace_id for e in store.events(trace_id=first)] == [first]
        assert list(store.events(trace_id="f" * 32)) == []
    finally:
        store.close()


@pytest.mark.parametrize("args", [("report",), ("report", "--json")])
def test_output_that_cannot_be_written_is_one_line(db: Path, args: tuple[str, ...]) -> None:
    script = "from closedloop.cli import main; main(prog_name='closedloop')"
    with open("/dev/full", "w") as full:  # every write fails: No space left on device
        done = subprocess.run([sys.executable, "-c", script, *args, "--store", str(db)],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                              check=False)
    assert (done.returncode, done.stderr) == (1, "error: No space left on device\n")


def test_a_reader_that_goes_away_ends_the_command_quietly(db: Path) -> None:
    from closedloop.telemetry import Score, span_store_for

    with cl.open_store(db) as store:  # more output than a pipe holds: writes must fail
        spans = span_store_for(store)
        for i in range(200):
            spans.add_score(Score(trace_id=f"{i:032x}", name="quality", value=float(i),
                                  comment="x" * 1000, ts=T0 + i))
    script = "from closedloop.cli import main; main(prog_name='closedloop')"
    with subprocess.Popen([sys.executable, "-c", script, "scores", "list", "--store", str(db)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # like `closedloop scores list | head -0`
        err = proc.stderr.read()
    assert b"Traceback" not in err
    assert err == b""
