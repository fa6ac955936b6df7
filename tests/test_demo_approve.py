"""``closedloop demo --autonomy approve``: the README's scripted run, end to end, in real
processes: the demo queues every plan for a person (the destructive one marked), `approvals
list` lists them, a person approves a launch and rejects the termination, `closedloop worker`
executes the approved launch once against the demo's EC2 (kept in a file between processes),
`approvals show` says executed, the instance exists once, and `autonomy status` counts the
decisions. Plus: a second execution of one request (a failed one a person retried) launches
no second instance; `--autonomy suggest` executes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop import approvals
from closedloop.demo import (
    REQUEST_TAG,
    DemoEnvironment,
    Ec2Executor,
    LocalEc2,
    ProvisionRequest,
    run_demo,
)
from closedloop.demo._ec2 import provision_environment

SRC = str(Path(__file__).resolve().parents[1] / "src")
README = Path(__file__).resolve().parents[1] / "README.md"
SEED = 7
REQUESTS = 6


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, "PYTHONPATH": SRC, "COLUMNS": "200", **(env or {})}
    full.pop("CLOSEDLOOP_DEMO_EC2", None)
    done = subprocess.run([sys.executable, "-m", "closedloop", *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def instances_in(state: Path, *, tag: str | None = None) -> dict[str, str]:
    """Instance id → state, in the demo's EC2 as the state file keeps it (read in a process
    of its own, as any later process would)."""
    code = textwrap.dedent(f"""
        import json
        from closedloop.demo import Ec2State, LocalEc2
        with LocalEc2() as ec2:
            Ec2State({str(state)!r}).load()
            filters = [{{"Name": "tag:{REQUEST_TAG}", "Values": [{tag!r}]}}] if {tag!r} else []
            found = ec2.client.describe_instances(Filters=filters)["Reservations"]
            print(json.dumps({{i["InstanceId"]: i["State"]["Name"]
                              for r in found for i in r["Instances"]}}))
        """)
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120, check=True)
    found: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def scripted_run() -> tuple[dict[str, str], list[list[str]]]:
    """The README's scripted approve run: its exported variables and its commands."""
    text = README.read_text(encoding="utf-8")
    found = re.search(r"<!-- scripted-approve-demo -->\n```bash\n(.*?)```", text, re.DOTALL)
    assert found is not None, "the README lost its scripted approve run"
    env: dict[str, str] = {}
    commands = []
    for line in found.group(1).splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value
        elif line.strip():
            commands.append(shlex.split(line))
    return env, commands


def test_the_readme_run_approves_executes_once_and_counts_the_decisions(
    tmp_path: Path,
) -> None:
    env, commands = scripted_run()
    assert all(c[0] == "closedloop" for c in commands)
    outputs: list[str] = []
    ids: dict[str, str] = {}
    for command in commands:
        args = [ids.get(a, a) for a in command[1:]]
        assert not any(a.startswith("$") for a in args), args
        outputs.append(cli(*args, cwd=tmp_path, env=env))
        if args[:2] == ["approvals", "list"]:  # the person reads the ids off the listing
            listed = json.loads(cli(*args, "--json", cwd=tmp_path, env=env))["requests"]
            ids["$RISKY"] = next(r["request_id"] for r in listed if r["risk"])
            ids["$LAUNCH"] = next(r["request_id"] for r in listed if not r["risk"])
    demo, listing, approved, half, worked, rejected, shown, status = outputs
    assert "Waiting for approval: 6 request(s)" in demo
    assert re.search(r"of which destructive\W+1\W", demo), demo
    assert listing.count("pending") == 6
    assert approved.strip() == f"{ids['$LAUNCH']}: approved"
    assert "needs another approver" in half  # destructive: one person is not enough
    assert worked.strip() == "executed 1 approved request(s)"
    assert rejected.strip() == f"{ids['$RISKY']}: rejected"
    assert re.search(r"status\W+executed", shown), shown
    assert "50.0% (1/2" in status

    launch = json.loads(cli("approvals", "show", ids["$LAUNCH"], "--json", cwd=tmp_path,
                            env=env))
    assert launch["status"] == "executed"
    assert launch["result"]["outcome"] == "succeeded"  # verified against the request
    state = tmp_path / "demo.db.ec2"
    mine = instances_in(state, tag=ids["$LAUNCH"])
    assert list(mine.values()) == ["running"]  # launched once
    everything = instances_in(state)
    assert sorted(everything.values()) == ["running"] * 4  # 3 production + the launch
    # a second worker round finds nothing to execute: still one instance
    again = cli("worker", "--app", "closedloop.demo:worker", "--once", cwd=tmp_path, env=env)
    assert again.strip() == "executed 0 approved request(s)"
    assert len(instances_in(state)) == 4
    risky = json.loads(cli("approvals", "show", ids["$RISKY"], "--json", cwd=tmp_path, env=env))
    assert risky["status"] == "rejected" and risky["risk"]["destructive"]

    found = json.loads(cli("autonomy", "status", "--task-type", "ec2.provision", "--json",
                           cwd=tmp_path, env=env))
    [key] = found["keys"]
    assert key["level"] == "approve"
    evidence = key["evidence"]
    assert (evidence["approval"]["successes"], evidence["approval"]["trials"]) == (1, 2)
    assert (evidence["verification"]["successes"], evidence["verification"]["trials"]) == (1, 1)


def test_the_summary_says_what_is_waiting(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'demo.db'}"
    out = cli("demo", "--autonomy", "approve", "--requests", "3", "--seed", str(SEED),
              "--store", store, cwd=tmp_path)
    assert "Waiting for approval: 3 request(s)" in out
    assert re.search(r"of which destructive\W+1\W", out), out
    assert "closedloop worker --app closedloop.demo:worker --once" in out


def test_approve_needs_a_store_that_outlives_the_demo(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-m", "closedloop", "demo", "--autonomy", "approve",
                           "--requests", "2", "--store", "memory://"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert "pass --store sqlite:///PATH" in done.stderr


def test_the_worker_without_a_demo_says_what_to_run_first(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("CLOSEDLOOP_DEMO_EC2", None)
    done = subprocess.run([sys.executable, "-m", "closedloop", "worker", "--app",
                           "closedloop.demo:worker", "--once", "--store",
                           f"sqlite:///{tmp_path / 'none.db'}"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"error: no demo EC2 state at {tmp_path / 'none.db.ec2'}: "
                                   "run `closedloop demo --autonomy approve --store "
                                   "sqlite:///PATH` first")


@pytest.fixture(scope="module")
def ec2() -> Iterator[tuple[Any, DemoEnvironment]]:
    with LocalEc2() as local:
        yield local.client, provision_environment(local.client, launches=10)


class LaunchThenFail:
    """Launches (EC2 accepted the call), then raises, as a timeout after the call would."""

    def __init__(self, inner: Ec2Executor) -> None:
        self.inner = inner

    def __call__(self, proposal: str) -> object:
        self.inner(proposal)
        raise TimeoutError("no answer from EC2")


def test_a_retried_execution_launches_no_second_instance(
    ec2: tuple[Any, DemoEnvironment],
) -> None:
    client, env = ec2
    request = ProvisionRequest(index=0, instance_type="t3.small", security_groups=("web",),
                               tags={"Name": "retry", "owner": "search", "env": "dev"})
    plan = json.dumps(request.correct_plan())
    store = cl.open_store("memory://")
    asked = cl.Loop(lambda task, attempt: plan, task_type="ec2.provision", autonomy="approve",
                    executor=LaunchThenFail(Ec2Executor(client, env)), store=store, guards=())
    request_id = asked.run(request).approval_id
    assert request_id is not None
    approvals.approve(request_id, by="alice", store=store)
    with pytest.raises(TimeoutError):
        asked.run_approved()
    assert approvals.get_request(request_id, store=store).status.value == "failed"
    approvals.retry(request_id, by="alice", reason="checking: retry is safe", store=store)
    retried = cl.Loop(lambda task, attempt: plan, task_type="ec2.provision", autonomy="approve",
                      executor=Ec2Executor(client, env), store=store, guards=())
    done = retried.run_approved()
    assert done is not None and done.result is not None
    tagged = client.describe_instances(Filters=[
        {"Name": f"tag:{REQUEST_TAG}", "Values": [request_id]}])["Reservations"]
    ids = [i["InstanceId"] for r in tagged for i in r["Instances"]]
    assert len(ids) == 1 and list(done.result.ids) == ids
    store.close()


def test_suggest_executes_nothing(tmp_path: Path) -> None:
    summary = run_demo(4, SEED, f"sqlite:///{tmp_path / 'demo.db'}", autonomy="suggest",
                       traces=False)
    assert summary.autonomy == "suggest"
    assert summary.succeeded == 0 and summary.waiting == ()
    assert summary.suggested + summary.blocked + summary.failed_validation == 4
    assert summary.suggested >= 1
    assert summary.production_running == summary.production_instances == 3
