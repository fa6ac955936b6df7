"""``closedloop autonomy``: status, set, feedback and recommend, for people and scripts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop.autonomy import AutonomyLevels, AutonomyPolicy, LevelKey
from closedloop.cli import main
from closedloop.cli._common import literal

HOSTILE = "deploy[/bold]\x1b[31m\r\u202e"


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop")


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.fixture
def db(tmp_path: Path) -> str:
    """A store with a suggest-level task type (5 suggestions) and an autonomous one."""
    url = url_of(tmp_path / "events.db")
    with cl.open_store(url) as store:
        levels = AutonomyLevels(store)
        levels.set("provision", "suggest", by="alice", reason="new agent")
        loop = cl.Loop(lambda t, a: t, task_type="provision", executor=lambda p: p,
                       store=store)
        for i in range(5):
            loop.run(i)
        cl.Loop(lambda t, a: t, task_type="deploy", executor=lambda p: p, store=store,
                verifiers=[lambda i, r: True]).run(1)
    return url


def step_ids(url: str, task_type: str) -> list[str]:
    with cl.open_store(url) as store:
        return [e.step_id for e in store.events(task_type=task_type) if e.step_id]


def test_status_shows_levels_evidence_what_it_takes_and_history(db: str) -> None:
    result = invoke("autonomy", "status", "--store", db)
    assert result.exit_code == 0, result.output
    out = result.stdout
    provision = next(line for line in out.splitlines() if line.startswith("│ provision"))
    assert "suggest" in provision and "approve: not yet" in provision
    deploy = next(i for i, line in enumerate(out.splitlines()) if line.startswith("│ deploy"))
    both = " ".join(out.splitlines()[deploy:deploy + 2])  # a cell may wrap onto a second line
    assert "autonomous" in both and "(default)" in both and "100.0% (1/1" in both
    assert "provision → approve: 50 more suggestions with feedback (0 of 50)" in out
    assert "set      provision: (none) → suggest  by alice: new agent" in out


def test_status_json_carries_the_evidence(db: str) -> None:
    result = invoke("autonomy", "status", "--store", db, "--json", "--task-type", "provision")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    (key,) = data["keys"]
    assert key["key"]["task_type"] == "provision" and key["level"] == "suggest"
    assert key["evidence"]["suggestions"] == 5 and key["target"] == "approve"
    assert data["history"][0]["by"] == "alice"


def test_set_records_who_and_why(db: str) -> None:
    result = invoke("autonomy", "set", "deploy", "approve", "--by", "carol", "--reason",
                    "review first", "--class", "drop", "--ceiling", "approve", "--store", db)
    assert result.exit_code == 0, result.output
    assert "deploy[drop]: (none) → approve (by carol)" in result.stdout
    with cl.open_store(db) as store:
        (record,) = list(AutonomyLevels(store).levels.levels("deploy"))
    assert (record.key, record.level, record.ceiling, record.reason) == (
        LevelKey(task_type="deploy", action_class="drop"), "approve", "approve",
        "review first")


@pytest.mark.parametrize(("args", "needle"), [
    (("set", "deploy", "yolo", "--by", "a", "--reason", "r"), "yolo"),
    (("set", "deploy", "approve", "--by", "a"), "--reason"),
    (("set", "deploy", "autonomous", "--by", "a", "--reason", "r", "--ceiling", "approve"),
     "above the ceiling"),
    (("feedback", "nope", "--agreed"), "32 lowercase hex"),
    (("feedback", "ab" * 16), "--agreed"),
])
def test_mistakes_are_one_line_exit_2(db: str, args: tuple[str, ...], needle: str) -> None:
    result = invoke("autonomy", *args, "--store", db)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and needle in line


def test_feedback_and_recommend_apply(tmp_path: Path) -> None:
    url = url_of(tmp_path / "events.db")
    with cl.open_store(url) as store:
        AutonomyLevels(store).set("t", "suggest", by="alice", reason="start")
        loop = cl.Loop(lambda t, a: t, task_type="t", executor=lambda p: p, store=store)
        for i in range(50):
            loop.run(i)
    ids = step_ids(url, "t")
    for step in ids[:49]:
        assert invoke("autonomy", "feedback", step, "--agreed", "--by", "bob",
                      "--store", url).exit_code == 0
    result = invoke("autonomy", "recommend", "--store", url)
    assert result.exit_code == 0 and "no promotion is earned yet" in result.stdout
    assert invoke("autonomy", "feedback", ids[49], "--disagreed", "--note", "did X",
                  "--store", url).exit_code == 0
    # 49/50 agreeing: lower bound 89.5 % < 90 %; with 60 agreeing it is earned
    with cl.open_store(url) as store:
        loop = cl.Loop(lambda t, a: t, task_type="t", executor=lambda p: p, store=store)
        more = [loop.run(i).event for i in range(40)]
    for e in more:
        assert e is not None and e.step_id is not None
        invoke("autonomy", "feedback", e.step_id, "--agreed", "--store", url)
    result = invoke("autonomy", "recommend", "--store", url, "--json")
    data = json.loads(result.stdout)
    assert [r["key"]["task_type"] for r in data["ready"]] == ["t"] and not data["applied"]
    result = invoke("autonomy", "recommend", "--apply", "--by", "carol", "--store", url)
    assert result.exit_code == 0, result.output
    assert "applied: t suggest → approve (agreement 98.9% (89/90" in result.stdout
    with cl.open_store(url) as store:
        levels = AutonomyLevels(store, policy=AutonomyPolicy())
        assert levels.resolve("t").level is cl.Autonomy.APPROVE
        assert levels.levels.history()[0].by == "carol"


def test_hostile_stored_text_is_printed_literally(tmp_path: Path) -> None:
    url = url_of(tmp_path / "events.db")
    with cl.open_store(url) as store:
        AutonomyLevels(store).set(HOSTILE, "suggest", by=f"by {HOSTILE}",
                                  reason=f"reason {HOSTILE}", action_class=f"c{HOSTILE}")
    for args in (("status",), ("recommend",)):
        result = invoke("autonomy", *args, "--store", url)
        assert result.exit_code == 0, result.output
        assert "Traceback" not in result.output
        for raw in ("\x1b", "\r", "\u202e"):
            assert raw not in result.stdout
    out = " ".join(invoke("autonomy", "status", "--store", url).stdout.split())
    assert literal(f"reason {HOSTILE}") in out and literal(f"by {HOSTILE}") in out


def test_status_of_a_missing_store_is_exit_1(tmp_path: Path) -> None:
    result = invoke("autonomy", "status", "--store", url_of(tmp_path / "nope.db"))
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
