"""People decide from the command line; workers are real processes.

``closedloop approvals list|show|approve|reject|retry`` end to end (refused self-approval,
an expired request, two approvers), and ``closedloop worker`` processes: two racing on the
same approved requests execute each once; one killed while it executes leaves the request
``crashed``, never re-run until a person retries it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop import approvals as ap
from closedloop.cli import main

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop", env=env)


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'approvals.db'}"


@pytest.fixture
def app_env(tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The environment of the app's processes: its store, its log, the tests folder on the
    path (the app module lives there)."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": f"{SRC}:{TESTS}",
           "CLOSEDLOOP_STORE": url, "APPROVAL_LOG": str(tmp_path / "executed.log"),
           "HOME": str(tmp_path)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.syspath_prepend(str(TESTS))
    cl.reset()
    return env


@pytest.fixture
def app(app_env: dict[str, str]) -> Iterator[Any]:
    import approval_app

    cl.reset()
    yield approval_app
    cl.reset()


def executed(env: dict[str, str]) -> list[dict[str, Any]]:
    path = Path(env["APPROVAL_LOG"])
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def gated_requests(app: Any, n: int) -> list[str]:
    ids = [app.loop.run({"n": i}).approval_id for i in range(n)]
    assert all(ids)
    assert cl.current_runtime().flush()
    return [str(i) for i in ids]


def test_people_decide_from_the_command_line(app: Any, url: str) -> None:
    [rid] = gated_requests(app, 1)
    listed = invoke("approvals", "list", "--store", url, "--status", "pending", "--json")
    assert listed.exit_code == 0, listed.output
    assert [r["request_id"] for r in json.loads(listed.stdout)["requests"]] == [rid]
    shown = invoke("approvals", "show", rid, "--store", url)
    assert shown.exit_code == 0, shown.output
    assert '"action": "launch"' in shown.stdout and "launcher@" in shown.stdout
    # the agent cannot approve its own request
    mine = invoke("approvals", "approve", rid, "--store", url, "--by", "launcher")
    assert mine.exit_code == 1 and "cannot approve it" in mine.output
    assert "Traceback" not in mine.output and len(mine.output.splitlines()) == 1
    nobody = invoke("approvals", "reject", rid, "--store", url, "--by", "bob")
    assert nobody.exit_code == 2 and "--reason" in nobody.output  # a rejection says why
    done = invoke("approvals", "approve", rid, "--store", url, "--by", "alice",
                  "--reason", "checked the plan")
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == f"{rid}: approved"
    again = invoke("approvals", "approve", rid, "--store", url, "--by", "bob")
    assert again.exit_code == 1 and "not pending" in again.output
    history = json.loads(invoke("approvals", "show", rid, "--store", url, "--json").stdout)
    assert [(h["action"], h["by"], h["reason"]) for h in history["history"]][1:] == [
        ("approved", "alice", "checked the plan")]
    missing = invoke("approvals", "show", "f" * 32, "--store", url)
    assert missing.exit_code == 1 and "no approval request" in missing.output


def test_the_approver_comes_from_the_environment(app: Any, url: str) -> None:
    [rid] = gated_requests(app, 1)
    done = invoke("approvals", "approve", rid, "--store", url, "--json",
                  env={"CLOSEDLOOP_APPROVER": "carol"})
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["approvers"] == ["carol"]


def test_an_expired_request_cannot_be_approved(url: str) -> None:
    with cl.open_store(url) as store:
        gated = cl.Loop(lambda t, a: {"x": 1}, task_type="t", executor=lambda p: p,
                        autonomy="approve", store=store, guards=(),
                        approval=cl.ApprovalPolicy(expires_in=0))
        rid = gated.run(None).approval_id or ""
    late = invoke("approvals", "approve", rid, "--store", url, "--by", "alice")
    assert late.exit_code == 1 and "expired" in late.output
    listed = json.loads(invoke("approvals", "list", "--store", url, "--json").stdout)
    assert listed["requests"][0]["status"] == "expired"


def test_two_approvers_from_the_command_line(url: str) -> None:
    with cl.open_store(url) as store:
        gated = cl.Loop(lambda t, a: "DROP TABLE users", task_type="sql", executor=lambda p: p,
                        autonomy="autonomous", store=store, guards=(),
                        risk_rules=[ap.destructive_sql()],
                        approval=cl.ApprovalPolicy(two_approvers=True))
        rid = gated.run(None).approval_id or ""
    shown = invoke("approvals", "show", rid, "--store", url)
    assert "RISK: SQL destroys data: DROP TABLE users" in shown.stdout
    first = invoke("approvals", "approve", rid, "--store", url, "--by", "alice")
    assert first.exit_code == 0 and "needs another approver" in first.stdout
    same = invoke("approvals", "approve", rid, "--store", url, "--by", "alice")
    assert same.exit_code == 1 and "already approved" in same.output
    second = invoke("approvals", "approve", rid, "--store", url, "--by", "bob")
    assert second.exit_code == 0 and second.stdout.strip() == f"{rid}: approved"


def worker(env: dict[str, str], cwd: Path, *args: str,
           pipes: bool = False) -> subprocess.Popen[str]:
    out = subprocess.PIPE if pipes else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "closedloop", "worker", "--app",
                             "approval_app:loop", *args], cwd=cwd, env=env, text=True,
                            stdout=out, stderr=out)


def test_two_racing_workers_execute_each_request_once(app: Any, app_env: dict[str, str],
                                                      url: str, tmp_path: Path) -> None:
    ids = gated_requests(app, 12)
    for rid in ids:
        ap.approve(rid, by="alice")
    racers = [worker(app_env, tmp_path, "--once", pipes=True) for _ in range(2)]
    for p in racers:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    lines = executed(app_env)
    assert sorted(line["key"] for line in lines) == sorted(ids)  # each once, none twice
    for rid in ids:
        request = ap.get_request(rid)
        assert request.status is ap.ApprovalStatus.EXECUTED
        assert request.result is not None
        assert request.result["executed_digest"] == request.proposal_digest
    assert {line["digest"] for line in lines} == {ap.get_request(r).proposal_digest
                                                  for r in ids}
    # the worker recorded each step under the request's step id, with its real outcome
    with cl.open_store(url) as store:
        outcomes = [(e.step_id, e.outcome) for e in store.events()]
    for rid in ids:
        step = ap.get_request(rid).step_id
        assert (step, "awaiting_approval") in outcomes and (step, "succeeded") in outcomes


def test_a_worker_killed_while_executing_leaves_the_request_crashed(
        app: Any, app_env: dict[str, str], tmp_path: Path) -> None:
    [rid] = gated_requests(app, 1)
    ap.approve(rid, by="alice")
    slow = tmp_path / "executing.pid"
    env = {**app_env, "APPROVAL_SLOW": str(slow), "APPROVAL_LEASE": "0.5"}
    victim = worker(env, tmp_path)
    deadline = time.monotonic() + 60
    while not slow.exists():
        assert time.monotonic() < deadline and victim.poll() is None
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    assert ap.get_request(rid).status is ap.ApprovalStatus.EXECUTING
    # another worker finds the lease run out: crashed, and not executed again
    while ap.get_request(rid).status is ap.ApprovalStatus.EXECUTING:
        survivor = worker(app_env, tmp_path, "--once")
        assert survivor.wait(timeout=60) == 0
    assert ap.get_request(rid).status is ap.ApprovalStatus.CRASHED
    assert executed(app_env) == []
    crashed = invoke("approvals", "list", "--status", "crashed", "--json")
    assert [r["request_id"] for r in json.loads(crashed.stdout)["requests"]] == [rid]
    # a person checks and retries it: executed once, with the same idempotency key
    retried = invoke("approvals", "retry", rid, "--by", "alice", "--reason",
                     "no instance was launched")
    assert retried.exit_code == 0, retried.output
    assert worker(app_env, tmp_path, "--once").wait(timeout=60) == 0
    assert [line["key"] for line in executed(app_env)] == [rid]
    assert ap.get_request(rid).status is ap.ApprovalStatus.EXECUTED


def test_a_worker_stops_on_sigterm(app_env: dict[str, str], tmp_path: Path) -> None:
    proc = worker(app_env, tmp_path, "--poll", "0.05", pipes=True)
    assert proc.stderr is not None
    assert "executing approved requests of launch" in proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0


def test_a_bad_app_is_one_line(app_env: dict[str, str], tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "closedloop", "worker", "--app",
                             "no_such_module:loop", "--once"], check=False, cwd=tmp_path,
                            env=app_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("error: cannot import no_such_module:loop")
    assert len(result.stderr.splitlines()) == 1
