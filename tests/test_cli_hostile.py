"""Stored text is data: every printing command shows hostile stored strings literally.

Task types, verdict messages, captured content, scores and control reasons come from agents
and users. Rich markup in them is printed as written (never interpreted, never swallowed),
emoji codes stay codes, and control characters (ANSI escapes, ``\\r``, NUL, bidi overrides)
are shown escaped (``\\x1b``), never sent to the terminal.
"""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop.cli import main
from closedloop.cli._common import literal
from closedloop.control import SQLiteLedger, Stop, StopKind
from closedloop.telemetry import StoreExporter, Telemetry, record_score

HOSTILE = ("[/bold]", "[red]x[/red]", "[error]", "\x1b[31mred\x1b[0m", "\x1b]0;title\x07",
           "<script>alert(1)</script>", "a\rb", "n\x00ul", ":thumbs_up:", "\u202eevil")
TEXT = " ".join(HOSTILE)
TASK_TYPE = "deploy[/bold]\x1b[31m"
RAW_CONTROLS = ("\x1b", "\x07", "\x00", "\r", "\u202e")


def test_literal_escapes_controls_and_keeps_markup() -> None:
    assert literal(TEXT) == ("[/bold] [red]x[/red] [error] \\x1b[31mred\\x1b[0m "
                             "\\x1b]0;title\\x07 <script>alert(1)</script> a\\rb n\\x00ul "
                             ":thumbs_up: \\u202eevil")
    assert literal("two\nlines") == "two\\nlines"
    assert literal("two\nlines", newlines=True) == "two\nlines"
    assert literal("tab\tand ünïcode ✓ 中文") == "tab\tand ünïcode ✓ 中文"
    assert literal("a\u2028b\u2066c\x85d\x7f") == "a\\u2028b\\u2066c\\x85d\\x7f"


class Hostile(NamedTuple):
    url: str
    trace_id: str  # a loop step: validation re-asked, verification failed
    diff_a: str  # two traces of user spans that differ in their captured content
    diff_b: str


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Hostile:
    """A store whose every text field is hostile: one real step, traced, scored, halted."""
    path = tmp_path_factory.mktemp("hostile") / "events.db"
    url = f"sqlite:///{path}"
    store = cl.open_store(url)
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)

    def agent(task: dict[str, str], attempt: cl.Attempt) -> dict[str, object]:
        return {"plan": TEXT, "n": attempt.number}

    def validator(plan: dict[str, object]) -> str | None:
        return None if plan["n"] != 1 else f"validator says {TEXT}"

    def verifier(intent: object, result: object) -> cl.Verdict:
        return cl.Verdict.fail(f"verifier says {TEXT}")

    loop = cl.Loop(agent, task_type=TASK_TYPE, validators=[validator], executor=lambda p: p,
                   verifiers=[verifier], store=store, telemetry=pipeline, max_attempts=2)
    trace_id = loop.run({"ask": TEXT}).trace_id
    pairs = []
    for passed in (True, False):  # two traces of user spans with hostile names, for the diff
        with pipeline.span(f"user {TEXT}") as root, pipeline.span(f"stage {TEXT}") as stage:
            stage.record.content = {"closedloop.proposal": f"{passed} {TEXT}"}
        pairs.append(root.record.trace_id_hex)
    pipeline.shutdown()
    store.flush()
    record_score(trace_id, "quality[/]", TEXT, comment=f"comment {TEXT}", store=store)
    store.close()
    SQLiteLedger(path).put(Stop(task_type=f"halted {TEXT}", kind=StopKind.HALTED,
                                reason=f"reason {TEXT}", by=f"by {TEXT}", at=time.time()))
    return Hostile(url, trace_id, pairs[0], pairs[1])


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop")


def assert_literal(output: str, *expected: str) -> None:
    """Each expected stored text appears as written (controls escaped); none is executed."""
    assert "Traceback" not in output
    for text in expected:
        assert literal(text) in output, (literal(text), output)
    for raw in RAW_CONTROLS:
        assert raw not in output, (raw, output)


def unwrap(output: str) -> str:
    """Table and tree output with the box characters and wrapping removed, for matching."""
    return " ".join(output.replace("│", " ").replace("┃", " ").split())


def test_report_prints_task_types_and_failure_messages_literally(
        hostile: Hostile) -> None:
    url = hostile.url
    result = invoke("report", "--store", url)
    assert result.exit_code == 0, result.output
    assert_literal(result.stdout, TASK_TYPE)
    assert_literal(unwrap(result.stdout), f"verifier says {TEXT}")


def test_traces_list_prints_the_task_type_literally(hostile: Hostile) -> None:
    url, trace_id = hostile.url, hostile.trace_id
    result = invoke("traces", "list", "--store", url)
    assert result.exit_code == 0, result.output
    assert trace_id in result.stdout
    assert_literal(result.stdout, TASK_TYPE)


def test_traces_show_prints_verdict_messages_and_content_literally(
        hostile: Hostile) -> None:
    url, trace_id = hostile.url, hostile.trace_id
    result = invoke("traces", "show", trace_id, "--store", url, "--content")
    assert result.exit_code == 0, result.output
    flat = unwrap(result.stdout)
    assert_literal(flat, f"verifier says {TEXT}", f"validator says {TEXT}")
    assert "closedloop.proposal:" in flat
    assert_literal(result.stdout)


def test_traces_diff_prints_stage_names_literally(hostile: Hostile) -> None:
    result = invoke("traces", "diff", hostile.diff_a, hostile.diff_b, "--store", hostile.url)
    assert result.exit_code == 0, result.output
    assert_literal(result.stdout, f"first divergence: user {TEXT} / stage {TEXT} #1")
    assert len(result.stdout.splitlines()) == 3  # first divergence, the stage, its difference


def test_scores_list_prints_names_labels_and_comments_literally(
        hostile: Hostile) -> None:
    url = hostile.url
    result = invoke("scores", "list", "--store", url)
    assert result.exit_code == 0, result.output
    assert_literal(result.stdout, f"quality[/]={TEXT}", f"# comment {TEXT}")
    assert len(result.stdout.splitlines()) == 1


def test_status_prints_stops_and_history_literally(hostile: Hostile) -> None:
    url = hostile.url
    result = invoke("status", "--store", url)
    assert result.exit_code == 0, result.output
    flat = unwrap(result.stdout)
    assert_literal(flat, f"halted {TEXT}", f"reason {TEXT}", f"by {TEXT}")


def test_resume_echoes_the_lifted_stop_literally(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    cl.open_store(path).close()
    SQLiteLedger(path).put(Stop(task_type=TASK_TYPE, kind=StopKind.HALTED,
                                reason=f"reason {TEXT}", by="me", at=time.time()))
    result = invoke("resume", TASK_TYPE, "--reason", "fixed", "--store", str(path))
    assert result.exit_code == 0, result.output
    assert_literal(result.stdout, f"resumed {TASK_TYPE}", f"reason {TEXT}")
    assert len(result.stdout.splitlines()) == 1


@pytest.mark.parametrize("command", [("resume", TEXT, "--reason", "r"),
                                     ("replay", "--task-type", TEXT, "--validator", "json:loads")])
def test_errors_naming_user_text_stay_one_literal_line(hostile: Hostile,
                                                       command: tuple[str, ...]) -> None:
    url = hostile.url
    result = invoke(*command, "--store", url)
    assert result.exit_code == 1, result.output
    assert_literal(result.stderr, TEXT)
    assert len(result.stderr.splitlines()) == 1


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    script = "from closedloop.cli import main; main(prog_name='closedloop')"
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.mark.parametrize("command", [("report",), ("traces", "list"), ("traces", "show", "ID"),
                                     ("scores", "list"), ("status",)])
def test_real_processes_print_stored_text_literally(hostile: Hostile,
                                                    command: tuple[str, ...]) -> None:
    url, trace_id = hostile.url, hostile.trace_id
    args = [trace_id if a == "ID" else a for a in command]
    done = _run(*args, "--store", url)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert_literal(done.stdout)
    assert "[/bold]" in done.stdout


def test_on_a_terminal_stored_escapes_are_shown_not_executed(hostile: Hostile) -> None:
    """With a terminal, rich styles its own output; the stored ANSI sequences stay text."""
    url, trace_id = hostile.url, hostile.trace_id
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "200", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from closedloop.cli import main; main()",
             "traces", "show", trace_id, "--store", url],
            stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE, env=env,
            timeout=60, check=False)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    out = b"".join(chunks).decode()
    assert done.returncode == 0, done.stderr
    assert "\x1b[" in out  # rich did style the tree (this is a terminal)
    for raw in ("\x1b[31mred", "\x1b]0;title", "\x07", "\x00", "\u202e"):
        assert raw not in out
    assert "\\x1b[31mred\\x1b[0m" in out


def test_the_console_escapes_controls_in_text_objects_too(
        capsys: pytest.CaptureFixture[str]) -> None:
    from rich.table import Table
    from rich.text import Text

    from closedloop.cli._common import console

    table = Table("stored")
    table.add_row(Text(TEXT, style="bold"))
    console().print(Text(TEXT), table)
    out = capsys.readouterr().out
    assert_literal(out)  # nothing raw reaches the terminal
    # rich's Text itself drops \r and BEL; what it keeps is shown escaped
    assert out.count("\\x1b[31mred\\x1b[0m") == 2
    assert out.count("n\\x00ul") == 2


def test_check_prints_file_names_and_messages_literally(tmp_path: Path) -> None:
    bad = tmp_path / "x\x1b[31mred.tf"
    bad.write_text('resource "a" "b" {\n  x = 1 !!!\n}\n')
    result = invoke("check", "hcl", str(bad))
    assert result.exit_code == 1, result.output
    assert_literal(result.stdout, "x\x1b[31mred.tf:line 2")


def test_usage_errors_quote_what_was_typed_literally() -> None:
    result = invoke("report", "\x1b[31m[red]so\ron")
    assert result.exit_code == 2
    assert_literal(result.stderr, "unexpected extra argument (\x1b[31m[red]so\ron)")
    assert len(result.stderr.splitlines()) == 1


def test_import_deadletter_prints_the_file_and_store_literally(tmp_path: Path) -> None:
    dead = tmp_path / "dead\x1b[31m\r.jsonl"
    dead.write_text("")
    db = tmp_path / "ev\x1b]0;t\x07.db"
    cl.open_store(db).close()
    result = invoke("store", "import-deadletter", str(dead), "--store", f"sqlite:///{db}")
    assert result.exit_code == 0, result.output
    assert_literal(result.stdout, f"from {dead} into sqlite:///{db} (0 already stored")


def test_approvals_print_proposals_risks_and_reasons_literally(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one row per request: matched without wrapping
    from closedloop._approvals import new_request
    from closedloop.store import approval_store_for

    url = f"sqlite:///{tmp_path / 'approvals.db'}"
    with cl.open_store(url) as store:
        approvals = approval_store_for(store)
        made = approvals.create(new_request(
            task_type=TASK_TYPE, agent_id=f"agent {TEXT}", proposal={"plan": TEXT},
            task_input={"ask": TEXT}, requested_by="asker",
            risk={"summary": f"risk {TEXT}", "destructive": True,
                  "items": [{"address": f"addr {TEXT}"}]},
            verdicts=[{"check": f"check {TEXT}", "issues": [
                {"severity": "warning", "message": f"note {TEXT}"}]}]))
        approvals.decide(made.request_id, approve=False, by="alice", reason=f"why {TEXT}")
    listed = invoke("approvals", "list", "--store", url)
    assert listed.exit_code == 0, listed.output
    assert made.request_id in listed.stdout
    assert_literal(unwrap(listed.stdout), TASK_TYPE, f"risk {TEXT}")
    shown = invoke("approvals", "show", made.request_id, "--store", url)
    assert shown.exit_code == 0, shown.output
    flat = unwrap(shown.stdout)
    assert_literal(flat, f"risk {TEXT}", f"why {TEXT}", f"note {TEXT}", f"addr {TEXT}")
    # the proposal is shown as indented JSON: markup as written, controls JSON-escaped
    assert_literal(shown.stdout, '"plan": "[/bold] [red]x[/red] [error] \\u001b[31mred')
