"""The demo end to end: the recorded events against the simulated model's ground truth.

One 200-request run (real boto3 against moto's local EC2 API, a temporary SQLite store) is
shared by the module; each test checks one thing a user of the demo relies on. The parts
(plan validators, executor, verifier) are also checked on their own against moto.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import closedloop as cl
from closedloop import approvals
from closedloop.cli import main
from closedloop.demo import (
    DemoSummary,
    FaultCategory,
    FaultKind,
    FaultLedger,
    FaultRates,
    LedgerEntry,
    ProvisionRequest,
    SimulatedModel,
    expected_result,
    generate_requests,
    run_demo,
)
from closedloop.demo._ec2 import (
    MAX_LAUNCHES,
    PRODUCTION_INSTANCES,
    VPC_CIDR,
    Action,
    DemoEnvironment,
    Ec2Executor,
    InstanceMatchesRequest,
    LocalEc2,
    count_running,
    provision_environment,
    subnet_for,
)
from closedloop.demo._plan import no_destructive_actions, plan_schema, required_tags

pytestmark = pytest.mark.slow

REQUESTS = 200
SEED = 7
MAX_ATTEMPTS = 3


class DemoRun:
    """A finished demo run and the events it stored, by trace id."""

    def __init__(self, summary: DemoSummary, url: str) -> None:
        self.summary = summary
        self.url = url
        with cl.open_store(url) as store:
            self.events = {e.trace_id: e for e in store.events()}
        # What a user sees: `closedloop report --json` over the run's store, taken now,
        # before any later run appends to it.
        result = CliRunner().invoke(main, ["report", "--store", url, "--json"])
        assert result.exit_code == 0, result.output
        self.report: dict[str, Any] = json.loads(result.output)

    @property
    def ledger(self) -> FaultLedger:
        return self.summary.ledger

    def traces(self, category: FaultCategory) -> set[str]:
        return {e.trace_id for e in self.ledger.faults if e.category is category}

    def with_error(self, error_type: cl.ErrorType) -> set[str]:
        return {t for t, e in self.events.items() if e.error_type == error_type.value}


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('demo') / 'events.db'}"


@pytest.fixture(scope="module")
def run(db: str) -> DemoRun:
    return DemoRun(run_demo(REQUESTS, SEED, db), db)


@pytest.fixture(scope="module")
def second_run(run: DemoRun, db: str) -> DemoSummary:
    return run_demo(20, SEED, db)


def failed_attempts(event: cl.StepEvent, check: str) -> dict[int, set[str]]:
    """Attempt number → locations of the issues ``check`` reported on it."""
    out: dict[int, set[str]] = {}
    for entry in (event.detail or {}).get("attempts", []):
        for verdict in entry["verdicts"]:
            if verdict["check"] == check and not verdict["passed"]:
                out[entry["attempt"]] = {i["location"] for i in verdict.get("issues", [])}
    return out


# -- end to end: events against the ledger -------------------------------------------------


def test_run_records_one_event_per_request(run: DemoRun) -> None:
    assert len(run.events) == REQUESTS
    assert run.summary.events_written == REQUESTS and run.summary.events_lost == 0
    assert {e.task_type for e in run.events.values()} == {"ec2.provision"}
    assert set(run.events) == {e.trace_id for e in run.ledger.entries}


def test_the_model_injects_every_kind_of_fault(run: DemoRun) -> None:
    counts = run.ledger.counts()
    assert counts["requests"] == REQUESTS
    assert counts["malformed"] >= 10 and counts["destructive"] >= 1
    assert 0.10 <= counts["semantic"] / REQUESTS <= 0.20  # the design's "about 15%"
    assert run.summary.failed_validation >= 1  # a few exhaust the re-asks


def test_every_malformed_proposal_is_caught_by_validation_attempt_by_attempt(
    run: DemoRun,
) -> None:
    caught = 0
    for trace, entries in run.ledger.by_trace().items():
        failures = failed_attempts(run.events[trace], "plan_schema")
        injected = {e.attempt: e for e in entries if e.category is FaultCategory.MALFORMED}
        assert set(failures) == set(injected), trace
        for attempt, entry in injected.items():
            assert set(entry.locations) <= failures[attempt], (trace, entry)
        caught += len(failures)
    assert caught == run.ledger.counts()["malformed"]


def test_reasked_proposals_that_stay_malformed_fail_with_validation_error(run: DemoRun) -> None:
    exhausted = {t for t, entries in run.ledger.by_trace().items()
                 if expected_result(entries, MAX_ATTEMPTS) == "failed_validation"}
    assert run.with_error(cl.ErrorType.VALIDATION) == exhausted
    assert all(run.events[t].attempts == MAX_ATTEMPTS for t in exhausted)


def test_every_semantic_fault_is_caught_by_verification(run: DemoRun) -> None:
    semantic = [e for e in run.ledger.faults if e.category is FaultCategory.SEMANTIC]
    assert run.with_error(cl.ErrorType.VERIFICATION) == {e.trace_id for e in semantic}
    for entry in semantic:
        event = run.events[entry.trace_id]
        assert event.validation_passed is True and event.verification_passed is False
        assert event.detail is not None
        locations = {i["location"] for v in event.detail["verification"]
                     for i in v.get("issues", [])}
        assert locations == set(entry.locations), entry


def test_destructive_plans_are_blocked_and_never_executed(run: DemoRun) -> None:
    blocked = {t for t, e in run.events.items() if e.outcome == cl.Outcome.BLOCKED}
    assert blocked == run.traces(FaultCategory.DESTRUCTIVE)
    assert run.summary.blocked == run.ledger.counts()["destructive"]
    assert all(run.events[t].attempts == 1 for t in blocked)  # no re-ask
    assert run.summary.production_running == run.summary.production_instances == 3


def test_every_step_ends_as_the_ledger_says(run: DemoRun) -> None:
    expected_outcome = {"succeeded": "succeeded", "failed_validation": "failed",
                        "failed_verification": "failed", "blocked": "blocked"}
    for trace, entries in run.ledger.by_trace().items():
        result = expected_result(entries, MAX_ATTEMPTS)
        assert result is not None
        assert run.events[trace].outcome == expected_outcome[result], trace
    s, expected = run.summary, run.ledger.expected_outcomes(MAX_ATTEMPTS)
    assert (s.succeeded, s.failed_validation, s.caught_by_verification, s.blocked) == (
        expected["succeeded"], expected["failed_validation"],
        expected["failed_verification"], expected["blocked"])
    assert s.errors == 0 and s.unverified == 0


def test_ledger_predicts_the_report_figures_of_the_stored_events(run: DemoRun) -> None:
    events = list(run.events.values())

    def rate(count: int, total: int) -> dict[str, int]:
        return {"count": count, "total": total}

    validated = [e for e in events if e.validation_passed is not None]
    reasked = [e for e in validated if e.attempts > 1]
    verified = [e for e in events if e.verification_passed is not None]
    observed = {
        "runs": len(events),
        "validation": rate(sum(bool(e.validation_passed) for e in validated), len(validated)),
        "reask": rate(len(reasked), len(validated)),
        "reask_success": rate(sum(bool(e.validation_passed) for e in reasked), len(reasked)),
        "verification": rate(sum(bool(e.verification_passed) for e in verified), len(verified)),
        "outcomes": {o: sum(e.outcome == o for e in events)
                     for o in ("succeeded", "failed", "blocked")},
        "error_types": {t: sum(e.error_type == t for e in events)
                        for t in ("validation", "verification", "blocked")},
    }
    assert run.ledger.expected_report(MAX_ATTEMPTS) == observed


def test_closedloop_report_shows_the_figures_the_ledger_predicts(run: DemoRun) -> None:
    (row,) = run.report["task_types"]
    expected = run.ledger.expected_report(MAX_ATTEMPTS)
    shown = {
        "runs": row["runs"],
        **{k: {"count": row[k]["count"], "total": row[k]["total"]}
           for k in ("validation", "reask", "reask_success", "verification")},
        "outcomes": {k: row["outcomes"][k] for k in expected["outcomes"]},
        "error_types": {k: next((e["count"] for e in row["top_errors"]
                                 if e["error_type"] == k), 0)
                        for k in expected["error_types"]},
    }
    assert shown == expected
    assert row["runs"] == REQUESTS
    # the injected faults themselves: every malformed-to-the-end, semantic and destructive one
    counts = run.ledger.expected_outcomes(MAX_ATTEMPTS)
    assert row["outcomes"]["blocked"] == counts["blocked"] > 0
    assert row["outcomes"]["failed"] == counts["failed_validation"] + counts[
        "failed_verification"]
    assert counts["failed_verification"] == len(run.traces(FaultCategory.SEMANTIC)) > 0
    assert row["tokens"]["input_total"] == run.summary.input_tokens


def test_token_usage_is_recorded_for_every_step(run: DemoRun) -> None:
    events = run.events.values()
    assert all(e.input_tokens > 0 and e.output_tokens > 0 for e in events)
    assert sum(e.input_tokens for e in events) == run.summary.input_tokens
    reasked = [e for e in events if e.attempts > 1]
    single = [e for e in events if e.attempts == 1]
    assert min(e.input_tokens for e in reasked) > min(e.input_tokens for e in single)


def test_second_run_appends_to_the_same_store(run: DemoRun, second_run: DemoSummary) -> None:
    with cl.open_store(run.url) as store:
        stored = {e.trace_id for e in store.events()}
    assert len(stored) == REQUESTS + 20
    assert set(run.events) <= stored
    assert {e.trace_id for e in second_run.ledger.entries} <= stored


def test_same_seed_gives_the_same_ledger(run: DemoRun, second_run: DemoSummary) -> None:
    first_20 = [e.key() for e in run.ledger.entries if e.request < 20]
    assert [e.key() for e in second_run.ledger.entries] == first_20


# -- the simulated model on its own ----------------------------------------------------------


def drive(seed: int, count: int) -> FaultLedger:
    """The model through a loop with the demo's validators and no executor: no EC2 needed."""
    model = SimulatedModel(seed, inventory=("i-prod",))
    loop = cl.Loop(
        model, task_type="t", validators=[plan_schema, no_destructive_actions],
        max_attempts=MAX_ATTEMPTS, store=None)
    for request in generate_requests(count, seed):
        loop.run(request)
    return model.ledger


def test_the_model_is_deterministic_per_seed() -> None:
    keys = [e.key() for e in drive(SEED, 100).entries]
    assert [e.key() for e in drive(SEED, 100).entries] == keys
    assert [e.key() for e in drive(SEED + 1, 100).entries] != keys


def test_the_model_fixes_malformed_proposals_only_when_re_asked() -> None:
    request = generate_requests(1, 0)[0]
    rates = FaultRates(malformed=1.0, fix_on_reask=1.0, semantic=0.0, destructive=0.0)
    model = SimulatedModel(0, rates=rates)
    first = cl.Attempt(number=1, trace_id="t", task_type="t")
    assert not plan_schema(model(request, first)).passed
    assert not plan_schema(model(request, first)).passed  # no feedback: still malformed
    retry = cl.Attempt(number=2, trace_id="t", task_type="t", feedback="fix the JSON")
    assert plan_schema(model(request, retry)).passed


def test_ledger_counts_list_every_kind_even_when_zero() -> None:
    ledger = FaultLedger([LedgerEntry(request=0, trace_id="a", attempt=1,
                                      kind=FaultKind.MISSING_TAG)])
    counts = ledger.counts()
    assert counts["semantic"] == 1 and counts["missing_tag"] == 1
    assert counts["malformed"] == 0 and counts["terminate_production"] == 0
    assert counts["requests"] == 1


# -- the plan validators -----------------------------------------------------------------------


def test_plan_schema_reports_every_bad_field_at_its_location() -> None:
    verdict = plan_schema(json.dumps({"action": "run_instances", "instance_type": 3,
                                      "tags": ["owner=x"], "count": 1}))
    assert not verdict.passed and not verdict.critical
    assert {i.location for i in verdict.issues} == {
        "plan.instance_type", "plan.tags", "plan.security_groups"}


def test_plan_schema_reports_json_syntax_errors() -> None:
    verdict = plan_schema('{"action": "run_instances",}')
    assert not verdict.passed
    assert [i.code for i in verdict.issues] == ["json_invalid"]


def test_destructive_actions_are_critical() -> None:
    verdict = no_destructive_actions(json.dumps(
        {"action": "terminate_instances", "instance_ids": ["i-1"]}))
    assert verdict.critical and verdict.issues[0].location == "plan.action"
    assert no_destructive_actions(json.dumps(generate_requests(1, 0)[0].correct_plan())).passed


# -- executor and verifier against the local EC2 API ----------------------------------------------


@pytest.fixture(scope="module")
def ec2() -> Iterator[tuple[Any, DemoEnvironment]]:
    with LocalEc2() as local:
        yield local.client, provision_environment(local.client, launches=20)


def request_for(groups: tuple[str, ...] = ("ssh", "web")) -> ProvisionRequest:
    return ProvisionRequest(index=0, instance_type="t3.small", security_groups=groups,
                            tags={"Name": "svc", "owner": "payments", "env": "dev"})


def test_verifier_passes_an_instance_launched_as_requested(
    ec2: tuple[Any, DemoEnvironment],
) -> None:
    client, env = ec2
    request = request_for()
    action = Ec2Executor(client, env)(json.dumps(request.correct_plan()))
    assert InstanceMatchesRequest(client, env)(request, action).passed


def test_verifier_reports_every_mismatch_at_once(ec2: tuple[Any, DemoEnvironment]) -> None:
    client, env = ec2
    request = request_for()
    plan = request.correct_plan() | {"instance_type": "m5.large", "security_groups": ["db"],
                                     "tags": {"Name": "svc", "owner": "search"}}
    action = Ec2Executor(client, env)(json.dumps(plan))

    verdict = InstanceMatchesRequest(client, env)(request, action)

    assert not verdict.passed and verdict.unknown is None
    assert sorted((i.location or "", i.code) for i in verdict.issues) == [
        ("instance.instance_type", "instance_type"),
        ("instance.security_groups", "security_group_missing"),
        ("instance.security_groups", "security_group_missing"),
        ("instance.security_groups", "security_group_unexpected"),
        ("instance.tags.env", "tag_missing"),
        ("instance.tags.owner", "tag_wrong"),
    ]


def test_verifier_cannot_tell_when_the_instance_cannot_be_read(
    ec2: tuple[Any, DemoEnvironment],
) -> None:
    client, env = ec2
    action = Action(call="run_instances", ids=("i-0123456789abcdef0",))
    verdict = InstanceMatchesRequest(client, env)(request_for(), action)
    assert not verdict.passed and verdict.unknown is not None


def test_executor_really_terminates_when_a_destructive_plan_gets_through(
    ec2: tuple[Any, DemoEnvironment],
) -> None:
    # what the loop's blocking protects: the executor does what a plan says
    client, env = ec2
    victim = env.production_instance_ids[:1]
    Ec2Executor(client, env)(json.dumps({"action": "terminate_instances",
                                         "instance_ids": list(victim)}))
    assert count_running(client, victim) == 0


# -- the command line ---------------------------------------------------------------------------


def test_cli_demo_prints_the_summary_as_json(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    result = CliRunner().invoke(main, ["demo", "--requests", "20", "--seed", "3",
                                       "--store", str(db), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["requests"] == 20 and data["seed"] == 3
    assert data["injected"]["requests"] == 20
    assert data["blocked"] == data["injected"]["destructive"]
    assert data["store"]["events_written"] == 20
    with cl.open_store(db) as store:
        assert store.count() == 20


def test_cli_demo_prints_a_table_and_how_to_see_the_report(tmp_path: Path) -> None:
    db = tmp_path / "cli.db"
    result = CliRunner().invoke(main, ["demo", "--requests", "5", "--store", str(db)])
    assert result.exit_code == 0, result.output
    assert "Caught by verification" in result.stdout
    assert "closedloop report --store" in result.stdout
    assert "closedloop traces list --task-type ec2.provision --store" in result.stdout


def test_cli_demo_prints_a_store_path_as_data(tmp_path: Path) -> None:
    db = tmp_path / "ev\x1b]0;t\x07.db"
    result = CliRunner().invoke(main, ["demo", "--requests", "1", "--store", str(db)])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout, result.stdout
    assert "closedloop traces list --task-type ec2.provision --store" in result.stdout


@pytest.mark.parametrize("count", ["0", "-3"])
def test_cli_rejects_a_non_positive_request_count(count: str) -> None:
    result = CliRunner().invoke(main, ["demo", "--requests", count])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: --requests must be at least 1, got {count}"


def test_cli_rejects_a_bad_store_url_in_one_line() -> None:
    result = CliRunner().invoke(main, ["demo", "--requests", "5", "--store", "mysql://x"])
    assert result.exit_code == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "unsupported store URL" in result.stderr


def test_cli_without_moto_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "moto.server", None)  # makes `import moto.server` fail
    result = CliRunner().invoke(main, ["demo", "--requests", "5"])
    assert result.exit_code == 2
    assert "pip install 'closedloop[demo]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_demo_rejects_a_non_positive_request_count() -> None:
    with pytest.raises(cl.ConfigError, match="positive integer"):
        run_demo(0)


@pytest.mark.parametrize("requests", [1, 9, 200, 249, 5000, MAX_LAUNCHES])
def test_the_subnet_has_an_address_for_every_instance_of_the_run(requests: int) -> None:
    subnet = ipaddress.IPv4Network(subnet_for(PRODUCTION_INSTANCES + requests))
    assert subnet.subnet_of(ipaddress.IPv4Network(VPC_CIDR))
    assert subnet.num_addresses - 5 >= PRODUCTION_INSTANCES + requests  # EC2 keeps 5


def test_the_local_ec2_api_gives_the_subnet_the_addresses_asked_for(
    ec2: tuple[Any, DemoEnvironment],
) -> None:
    client, _ = ec2
    # 249 more than the production instances: one more than a /24 has addresses for
    env = provision_environment(client, launches=249)
    (subnet,) = client.describe_subnets(SubnetIds=[env.subnet_id])["Subnets"]
    assert subnet["AvailableIpAddressCount"] >= 249


def test_run_demo_refuses_more_requests_than_its_subnet_holds() -> None:
    with pytest.raises(cl.ConfigError, match=f"at most {MAX_LAUNCHES} requests"):
        run_demo(MAX_LAUNCHES + 1)


_EXHAUST = """
import json
from closedloop.demo._ec2 import Ec2Executor, LocalEc2, provision_environment
plan = json.dumps({"action": "run_instances", "instance_type": "t3.micro",
                   "security_groups": ["web"], "tags": {"env": "dev"}, "count": 1})
outcomes = []
with LocalEc2() as ec2:
    execute = Ec2Executor(ec2.client, provision_environment(ec2.client, launches=8))
    for _ in range(12):
        try:
            outcomes.append(execute(plan).call)
        except Exception as exc:  # what the loop records as the step's executor error
            outcomes.append(type(exc).__name__)
print(json.dumps(outcomes))
"""


def test_launches_past_a_full_subnet_fail_without_flooding_stderr() -> None:
    # moto fails a launch that finds no address with a traceback, which werkzeug logged to
    # stderr (~70 lines a request, 300,000 lines in a 5000-request demo)
    out = subprocess.run([sys.executable, "-c", _EXHAUST], capture_output=True, text=True,
                         timeout=120, check=True)
    outcomes = json.loads(out.stdout)
    assert outcomes[:8] == ["run_instances"] * 8
    assert "run_instances" not in outcomes[8:]  # the subnet was full: no launch after it
    assert out.stderr == ""


# -- the quickstart leads somewhere: every command shows the demo's steps ----------------------


QUICK = 30  # seed 7: a few of each outcome, and missing tags among the semantic faults


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """``closedloop demo --json`` into a fresh store, as a new user runs it: (URL, summary)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('quick') / 'events.db'}"
    result = CliRunner().invoke(main, ["demo", "--requests", str(QUICK), "--store", url,
                                       "--json"])
    assert result.exit_code == 0, result.output
    return url, json.loads(result.stdout)


def cli_json(*args: str) -> Any:
    result = CliRunner().invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def demo_traces(url: str) -> set[str]:
    with cl.open_store(url) as store:
        return {e.trace_id for e in store.events()}


def test_the_demo_says_what_to_run_next(quick: tuple[str, dict[str, Any]]) -> None:
    url, summary = quick
    assert summary["traces"] == {"recorded": True, "scores_written": QUICK}
    commands = [line.split(" --store ")[0] for line in summary["next_steps"]]
    assert commands == [
        "closedloop report",
        "closedloop traces list --task-type ec2.provision",
        "closedloop replay --task-type ec2.provision --validator closedloop.demo:required_tags",
        "closedloop scores list --name plan_correct",
        "closedloop serve --metrics --from-start",
    ]
    assert all(line.endswith(f"--store {shlex.quote(url)}") for line in summary["next_steps"])


def test_traces_list_and_show_the_demo_steps(quick: tuple[str, dict[str, Any]]) -> None:
    url, _ = quick
    listed = cli_json("traces", "list", "--task-type", "ec2.provision", "--limit", "1000",
                      "--store", url)["traces"]
    assert {t["trace_id"] for t in listed} == demo_traces(url)
    shown = CliRunner().invoke(main, ["traces", "show", listed[0]["trace_id"], "--store", url])
    assert shown.exit_code == 0, shown.output
    for stage in ("closedloop.step", "closedloop.attempt", "invoke_agent provisioning-agent",
                  "closedloop.validate"):
        assert stage in shown.stdout, stage


def test_replay_replays_every_demo_proposal(quick: tuple[str, dict[str, Any]]) -> None:
    url, _ = quick
    truth = drive(SEED, QUICK).by_trace().values()
    missing_tag = sum(entries[-1].kind is FaultKind.MISSING_TAG for entries in truth)
    assert missing_tag >= 1
    report = cli_json("replay", "--task-type", "ec2.provision",
                      "--validator", "closedloop.demo:required_tags", "--store", url)
    assert (report["steps"], report["not_replayable"]) == (QUICK, 0)
    (check,) = report["checks"]
    assert (check["replayed"], check["crashed"]) == (QUICK, 0)
    # it catches exactly the verification failures due to a missing tag, and no success
    assert (check["caught_verification_failures"], check["blocked_successes"]) == (
        missing_tag, 0)


def test_scores_grade_every_demo_step(quick: tuple[str, dict[str, Any]]) -> None:
    url, summary = quick
    scores = cli_json("scores", "list", "--name", "plan_correct", "--store", url)
    assert {s["trace_id"] for s in scores} == demo_traces(url)
    assert {s["source"] for s in scores} == {"rule"}
    correct = sum(s["value"] == 1.0 for s in scores)
    assert correct == summary["expected"]["succeeded"]
    report = cli_json("report", "--store", url)
    assert "plan_correct" in json.dumps(report["scores"])


def test_serve_exposes_the_demo_steps_as_metrics(quick: tuple[str, dict[str, Any]]) -> None:
    url, summary = quick
    with subprocess.Popen(
            [sys.executable, "-m", "closedloop", "serve", "--metrics", "--from-start",
             "--port", "0", "--store", url], stderr=subprocess.PIPE, text=True) as server:
        try:
            assert server.stderr is not None
            found = re.search(r"127\.0\.0\.1:(\d+)/metrics", server.stderr.readline())
            assert found is not None
            runs = scrape_runs(int(found.group(1)), until=QUICK)
        finally:
            server.terminate()
    assert runs.get("succeeded") == summary["succeeded"]
    assert sum(runs.values()) == QUICK


def scrape_runs(port: int, *, until: int) -> dict[str, float]:
    """``closedloop_task_runs_total`` of the demo's task type by outcome, once ``until`` steps
    are counted (the server tails the store in the background) or after a minute."""
    runs: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while sum(runs.values()) < until and time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as page:
            text = page.read().decode()
        runs = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^closedloop_task_runs_total\{outcome="(\w+)",task_type="ec2.provision"\} (\S+)',
            text, re.MULTILINE)}
        time.sleep(0.1)
    return runs


def test_the_plan_validators_judge_replayed_data_as_they_judge_text() -> None:
    # `closedloop replay` hands recorded JSON back as data: same verdicts either way
    request = generate_requests(1, SEED)[0]
    plans: list[dict[str, Any]] = [
        request.correct_plan(),
        {**request.correct_plan(), "tags": []},
        {"action": "run_instances"},
        {"action": "terminate_instances", "instance_ids": ["i-prod"]},
    ]
    for plan in plans:
        for check in (plan_schema, no_destructive_actions, required_tags):
            assert check(plan) == check(json.dumps(plan)), (check.__name__, plan)
    assert not plan_schema(plans[1]).passed and not no_destructive_actions(plans[3]).passed


def test_required_tags_flags_each_missing_tag_of_a_launch() -> None:
    plan = generate_requests(1, SEED)[0].correct_plan()
    assert required_tags(plan).passed
    del plan["tags"]["owner"], plan["tags"]["env"]
    assert [i.location for i in required_tags(plan).issues] == ["plan.tags.owner",
                                                                 "plan.tags.env"]
    assert required_tags('{"action": "delete_security_group", "group": "web"}').passed
    assert required_tags("not json").passed  # plan_schema's to report


CORE_ONLY = ("opentelemetry", "prometheus_client", "redis", "boto3", "botocore", "moto",
             "jsonschema", "sqlglot", "hcl2", "httpx", "psycopg", "openai", "anthropic")


@pytest.mark.parametrize("command", [
    ["report"], ["status"], ["traces", "list"], ["traces", "show", "FIRST"],
    ["traces", "diff", "FIRST", "SECOND"], ["scores", "add", "FIRST", "helpful", "1"],
    ["scores", "list"],
    ["replay", "--task-type", "ec2.provision", "--validator", "closedloop.demo:required_tags"],
])
def test_the_commands_readme_lists_as_core_run_without_any_extra(
        quick: tuple[str, dict[str, Any]], command: list[str]) -> None:
    url, _ = quick
    first, second = sorted(demo_traces(url))[:2]
    command = [{"FIRST": first, "SECOND": second}.get(arg, arg) for arg in command]
    code = (f"import sys\nfor name in {CORE_ONLY!r}:\n    sys.modules[name] = None\n"
            f"from closedloop.cli import main\nmain({[*command, '--store', url]!r})")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


class ListBackend:
    """A user's own event backend: it holds events, and no spans."""

    url = "list://demo"

    def __init__(self) -> None:
        self.events: list[cl.StepEvent] = []

    def write_batch(self, events: Any) -> None:
        self.events.extend(events)

    def iter_events(self, query: Any) -> Iterator[cl.StepEvent]:
        return iter(list(self.events))

    def count(self) -> int:
        return len(self.events)

    def close(self) -> None:
        pass


def test_a_store_that_cannot_hold_spans_gets_the_events_only() -> None:
    backend = ListBackend()
    with cl.Store(backend) as store:
        summary = run_demo(3, SEED, store)
    assert (summary.traced, summary.scores_written, summary.events_written) == (False, 0, 3)
    assert len(backend.events) == 3


def test_a_demo_part_whose_extra_is_missing_names_the_install_command() -> None:
    code = ("import sys\nsys.modules['boto3'] = None\nimport closedloop.demo as d\n"
            "assert d.plan_schema.__name__ == 'plan_schema'  # needs pydantic only\n"
            "assert 'LocalEc2' in dir(d)\n"
            "from closedloop import ConfigError\n"
            "try:\n    d.LocalEc2\nexcept ConfigError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True)
    assert done.stdout == ("closedloop.demo.LocalEc2 needs boto3: "
                           "pip install 'closedloop[demo]'\n")


def test_an_approved_launch_passes_the_request_id_as_client_token(
    ec2: tuple[Any, DemoEnvironment],
) -> None:
    client, env = ec2
    plan = json.dumps(request_for().correct_plan())
    store = cl.open_store("memory://")
    loop = cl.Loop(lambda task, attempt: plan, task_type="ec2.provision",
                   executor=Ec2Executor(client, env), autonomy="approve", store=store,
                   guards=())
    request_id = loop.run({}).approval_id
    assert request_id is not None
    approvals.approve(request_id, by="alice", store=store)
    done = loop.run_approved()
    assert done is not None and done.result is not None
    [instance_id] = done.result.ids
    described = client.describe_instances(InstanceIds=[instance_id])
    assert described["Reservations"][0]["Instances"][0]["ClientToken"] == request_id
    # outside an approved execution there is no key, and no ClientToken is sent
    action = Ec2Executor(client, env)(plan)
    described = client.describe_instances(InstanceIds=list(action.ids))
    assert described["Reservations"][0]["Instances"][0].get("ClientToken") != request_id
    store.close()
