"""``closedloop traces`` and ``closedloop scores`` read what the pipeline stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from closedloop.cli import main
from closedloop.store import open_store
from closedloop.telemetry import StoreExporter, Telemetry


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop")


def _record(url: str, *, passed: bool, proposal: str) -> str:
    store = open_store(url)
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    outcome = "succeeded" if passed else "failed"
    with pipeline.span("closedloop.step", **{"closedloop.task_type": "deploy",
                                            "closedloop.outcome": outcome}) as root:
        with pipeline.span("closedloop.attempt"), pipeline.span("invoke_agent a") as agent:
            agent.record.content = {"closedloop.proposal": proposal}
        with pipeline.span("closedloop.validate", **{"closedloop.check": "schema",
                                                    "closedloop.verdict.passed": passed}):
            pass
    pipeline.shutdown()
    store.close()
    return root.record.trace_id_hex


def test_list_shows_traces_newest_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    old = _record(url, passed=True, proposal="a")
    new = _record(url, passed=False, proposal="b")
    result = invoke("traces", "list", "--store", url, "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert [(r["trace_id"], r["outcome"]) for r in listed["traces"]] == [
        (new, "failed"), (old, "succeeded")]
    assert listed["next_cursor"] is None


def test_show_prints_the_tree_with_verdicts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    trace_id = _record(url, passed=False, proposal="x")
    result = invoke("traces", "show", trace_id, "--store", url)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("closedloop.step" in line and "outcome=failed" in line for line in lines)
    validate = next(line for line in lines if "closedloop.validate" in line)
    assert "verdict.passed=False" in validate
    assert lines.index(validate) > 1  # nested under the step


def test_show_of_an_unknown_trace_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    _record(url, passed=True, proposal="x")
    result = invoke("traces", "show", "f" * 32, "--store", url)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no spans for trace {'f' * 32}"


def test_diff_names_the_first_divergent_stage(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    good = _record(url, passed=True, proposal="region=eu-west-1")
    bad = _record(url, passed=False, proposal="region=mars-1")
    result = invoke("traces", "diff", good, bad, "--store", url)
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first == "first divergence: closedloop.step / closedloop.attempt / invoke_agent a #1"
    assert "closedloop.proposal: A='region=eu-west-1'  B='region=mars-1'" in result.output
    assert "verdict.passed: A=True  B=False" in result.output


def test_scores_add_then_list(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    trace_id = _record(url, passed=True, proposal="x")
    added = invoke("scores", "add", trace_id, "satisfaction", "4", "--comment", "good",
                   "--store", url)
    assert added.exit_code == 0, added.output
    invoke("scores", "add", trace_id, "quality", "wrong_region", "--source", "rule",
           "--store", url)
    listed = json.loads(invoke("scores", "list", "--store", url, "--json").output)
    assert [(s["name"], s["value"], s["label"], s["source"]) for s in listed] == [
        ("satisfaction", 4.0, None, "human"), ("quality", None, "wrong_region", "rule")]


def test_a_malformed_trace_id_is_a_usage_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    _record(url, passed=True, proposal="x")
    result = invoke("scores", "add", "xyz", "q", "1", "--store", url)
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: trace id 'xyz' is not 32 hex digits"


def test_show_prints_why_each_check_failed(tmp_path: Path) -> None:
    import closedloop as cl

    store = open_store(f"sqlite:///{tmp_path / 's.db'}")
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    loop = cl.Loop(lambda task, attempt: task, task_type="deploy", store=store,
                   telemetry=pipeline, validators=[lambda p: "region mars-1 does not exist"],
                   max_attempts=1)
    trace_id = loop.run("mars-1").trace_id
    pipeline.shutdown()
    store.close()
    result = invoke("traces", "show", trace_id, "--store", f"sqlite:///{tmp_path / 's.db'}")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    validate = next(i for i, line in enumerate(lines) if "closedloop.validate" in line)
    assert "[error] invalid: region mars-1 does not exist" in lines[validate + 1]


def _stored(url: str) -> list[tuple[str, float | None, str | None]]:
    listed = json.loads(invoke("scores", "list", "--store", url, "--json").output)
    return [(s["name"], s["value"], s["label"]) for s in listed]


@pytest.mark.parametrize(("typed", "value", "label"), [
    ("-1", -1.0, None), ("-0.5", -0.5, None), ("+2", 2.0, None), ("4", 4.0, None),
    ("1e3", 1000.0, None), (".5", 0.5, None),
    ("good", None, "good"), ("true", None, "true"), ("bad", None, "bad"), ("nan", None, "nan"),
    (" wrong_region ", None, "wrong_region"),
])
def test_scores_add_keeps_numbers_as_numbers_and_labels_as_labels(
        tmp_path: Path, typed: str, value: float | None, label: str | None) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    trace_id = _record(url, passed=True, proposal="x")
    result = invoke("scores", "add", trace_id, "q", typed, "--store", url)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert _stored(url) == [("q", value, label)]


def test_scores_add_maps_labels_only_when_asked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    trace_id = _record(url, passed=True, proposal="x")
    for typed in ("good", "meh"):
        result = invoke("scores", "add", trace_id, "mood", typed, "--map", "good=1",
                        "--map", "bad=-1", "--store", url)
        assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("mood=meh (human)")
    assert _stored(url) == [("mood", 1.0, "good"), ("mood", None, "meh")]
    bad = invoke("scores", "add", trace_id, "mood", "good", "--map", "good", "--store", url)
    assert bad.exit_code == 2
    assert "'good' is not LABEL=NUMBER" in bad.stderr


@pytest.mark.parametrize("typed", ["", "   "])
def test_scores_add_rejects_an_empty_value(tmp_path: Path, typed: str) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    trace_id = _record(url, passed=True, proposal="x")
    result = invoke("scores", "add", trace_id, "q", typed, "--store", url)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "VALUE: is empty: give a number or a label" in result.stderr
    assert _stored(url) == []


@pytest.mark.parametrize(("args", "option"), [(("q", "--bogus"), "--bogus"),
                                              (("--bogus", "1"), "--bogus"), (("q", "-x"), "-x")])
def test_scores_add_still_refuses_unknown_options(tmp_path: Path, args: tuple[str, ...],
                                                  option: str) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    trace_id = _record(url, passed=True, proposal="x")
    result = invoke("scores", "add", trace_id, *args, "--store", url)
    assert result.exit_code == 2
    assert f"No such option '{option}'" in result.stderr
    assert _stored(url) == []


def test_scoring_an_unknown_trace_warns_and_stores(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    _record(url, passed=True, proposal="x")
    result = invoke("scores", "add", "A" * 32, "q", "1", "--store", url)
    assert result.exit_code == 0, result.output
    assert result.stderr == (f"warning: {url} has no step or span of trace {'a' * 32}; "
                             "the score is stored anyway\n")
    assert _stored(url) == [("q", 1.0, None)]


def test_scoring_a_trace_known_only_by_its_step_event_does_not_warn(tmp_path: Path) -> None:
    import closedloop as cl

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    trace_id = cl.Loop(lambda task, attempt: task, task_type="t", store=store,
                       telemetry=None).run(1).trace_id
    store.close()
    result = invoke("scores", "add", trace_id, "q", "1", "--store", url)
    assert (result.exit_code, result.stderr) == (0, "")


def test_show_prints_why_a_check_could_not_tell_and_passing_warnings(tmp_path: Path) -> None:
    import closedloop as cl

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    warned = cl.Issue(message="converged after 3 s", code="slow", severity=cl.Severity.WARNING)
    loop = cl.Loop(lambda task, attempt: task, task_type="deploy", store=store,
                   telemetry=pipeline, executor=lambda plan: plan,
                   validators=[lambda plan: cl.Verdict.ok(warned)],
                   verifiers=[lambda intent, result: cl.Verdict.cannot_tell("API timed out")])
    trace_id = loop.run("x").trace_id
    pipeline.shutdown()
    store.close()
    lines = invoke("traces", "show", trace_id, "--store", url).output.splitlines()
    validate = next(i for i, line in enumerate(lines) if "closedloop.validate" in line)
    assert "[warning] slow: converged after 3 s" in lines[validate + 1]
    verify = next(i for i, line in enumerate(lines) if "closedloop.verify" in line)
    assert "verdict.unknown=True" in lines[verify]
    assert "unknown: API timed out" in lines[verify + 1]


def test_show_lists_the_traces_steps_with_their_v3_fields_printed_as_data(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import closedloop as cl

    monkeypatch.setenv("COLUMNS", "400")  # one line per step: the asserts below read fields

    url = f"sqlite:///{tmp_path / 's.db'}"
    store = open_store(url)
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    inner = cl.Loop(lambda t, a: {"token": "hunter2"}, task_type="inner", store=store,
                    guards=(), telemetry=pipeline, agent_version="[red]v2[/red]")

    def agent(task: str, attempt: cl.Attempt) -> str:
        attempt.record_usage(10, 2, cached_input_tokens=4, model="m-1", provider="acme")
        inner.run(task)
        return task

    outer = cl.Loop(agent, task_type="outer", store=store, guards=(), telemetry=pipeline,
                    labels={"tier": "gold\n[bold]x"})
    result = outer.run("x", run_id="run-7")
    pipeline.shutdown()
    store.close()
    shown = invoke("traces", "show", result.trace_id, "--store", url, "--content")
    assert shown.exit_code == 0, shown.output
    out = shown.output
    assert f"step {result.step_id}" in out and f"parent_step={result.step_id}" in out
    assert "run=run-7" in out and "model=m-1 (acme)" in out and "(4 cached)" in out
    assert "labels=tier=gold\\n[bold]x" in out  # one line, markup printed as text
    assert "agent_version=[red]v2[/red]" in out
    assert f"proposal=sha256:{result.event.proposal_digest}" in out  # type: ignore[union-attr]
    assert 'proposal: {"token":"[REDACTED:secret]"}' in out and "hunter2" not in out
    spans = json.loads(invoke("traces", "show", result.trace_id, "--store", url,
                              "--json").output)
    root = next(s for s in spans if s["name"] == "closedloop.step" and s["parent_id"] is None)
    assert root["attributes"]["closedloop.step_id"] == result.step_id
    assert root["attributes"]["closedloop.label.tier"] == "gold\n[bold]x"


def test_show_of_a_step_recorded_without_tracing_lists_the_step(tmp_path: Path) -> None:
    import closedloop as cl

    url = f"sqlite:///{tmp_path / 's.db'}"
    with open_store(url) as store:
        result = cl.Loop(lambda t, a: t, task_type="t", store=store, guards=(),
                         telemetry=None).run(1)
    shown = invoke("traces", "show", result.trace_id, "--store", url)
    assert shown.exit_code == 0, shown.output
    assert f"step {result.step_id}  t succeeded" in shown.output


def test_show_of_a_store_made_before_schema_v3_reads_it_as_it_is(tmp_path: Path) -> None:
    import shutil
    import sqlite3
    from contextlib import closing

    path = tmp_path / "v2.db"
    shutil.copyfile(Path(__file__).resolve().parents[1] / "data" / "store_v2.db", path)
    with closing(sqlite3.connect(path)) as db:
        (trace_id,) = db.execute("SELECT trace_id FROM events WHERE outcome = 'failed'"
                                 ).fetchone()
    shown = invoke("traces", "show", trace_id, "--store", f"sqlite:///{path}")
    assert shown.exit_code == 0, shown.output
    assert "step (no step id: recorded before schema v3)  ec2.provision failed" in shown.output
    assert "closedloop.validate" in shown.output
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)  # read, not migrated
