"""Replay: today's checks run on the proposals and results recorded by traced steps."""

from __future__ import annotations

import json
from typing import Any

from click.testing import CliRunner
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import closedloop as cl
from closedloop.cli import main
from closedloop.learn import replay
from closedloop.telemetry import MemoryExporter, StoreExporter, Telemetry

REGIONS = {1: "eu-west-1", 2: "eu-west-1", 3: "us-east-1", 4: "mars-1", 5: "mars-2"}


def propose(task: int, attempt: cl.Attempt) -> dict[str, Any]:
    return {"id": task, "region": REGIONS[task]}


def provision(proposal: dict[str, Any]) -> dict[str, Any]:
    return {"region": "nowhere" if proposal["region"].startswith("mars") else proposal["region"]}


def landed(intent: int, result: dict[str, Any]) -> bool:
    return bool(result["region"] == REGIONS[intent])


def known_region(proposal: dict[str, Any]) -> str | None:
    """The new validator under test: it knows Mars is not a region, and distrusts us-east-1."""
    region = proposal["region"]
    return None if region.startswith("eu-") else f"unknown region {region}"


def record(store: cl.Store) -> None:
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    steps = cl.Loop(propose, task_type="provision", executor=provision, verifiers=[landed],
                    store=store, telemetry=pipeline)
    for task in REGIONS:
        steps.run(task)
    pipeline.shutdown()
    store.flush()


def test_a_new_validator_is_scored_against_recorded_outcomes(store: cl.Store) -> None:
    record(store)
    report = replay(store, "provision", validators=[("known_region", known_region)])
    (check,) = report.checks
    assert (report.steps, report.verification_failures, report.successes) == (5, 2, 3)
    assert (check.caught_verification_failures, check.blocked_successes) == (2, 1)
    assert report.sentences()[0].startswith(
        "new validator known_region would have caught 2 of the 2 verification failures, "
        "and blocked 1 proposals that succeeded")


def test_verifiers_are_replayed_on_recorded_results(store: cl.Store) -> None:
    record(store)
    report = replay(store, "provision", verifiers=[("landed", landed)])
    assert report.checks[0].flagged == 2


def test_the_replay_command_prints_the_summary(store: cl.Store) -> None:
    record(store)
    result = CliRunner().invoke(main, [
        "replay", "--task-type", "provision", "--store", store.url, "--json",
        "--validator", "telemetry.test_replay:known_region"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["checks"][0]["caught_verification_failures"] == 2


def test_steps_sharing_a_trace_are_each_replayed_with_their_own_proposal(
        store: cl.Store, user_tracer: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    # one user span (a request handler, a batch job) around all five steps: one trace
    tracer, _ = user_tracer
    with tracer.start_as_current_span("nightly.batch"):
        record(store)
    (trace_id,) = {e.trace_id for e in store.events()}
    report = replay(store, "provision", validators=[("known_region", known_region)],
                    verifiers=[("landed", landed)])
    validator, verifier = report.checks
    assert report.not_replayable == 0
    # the last proposal of the trace (mars-2) would be flagged five times over
    assert (validator.flagged, validator.caught_verification_failures,
            validator.blocked_successes) == (3, 2, 1)
    assert validator.flagged_traces == [trace_id] * 3
    assert (verifier.replayed, verifier.flagged) == (5, 2)


def test_a_step_whose_spans_are_missing_is_not_replayed_with_another_steps(
        store: cl.Store, user_tracer: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    tracer, _ = user_tracer
    to_store = Telemetry([StoreExporter(store)], flush_interval=60.0)
    elsewhere = Telemetry([MemoryExporter()], flush_interval=60.0)
    kept = cl.Loop(propose, task_type="provision", executor=provision, verifiers=[landed],
                   store=store, telemetry=to_store)
    lost = cl.Loop(propose, task_type="provision", executor=provision, verifiers=[landed],
                   store=store, telemetry=elsewhere)
    with tracer.start_as_current_span("batch"):
        kept.run(4)  # mars-1: the new validator flags it
        lost.run(1)  # its event is in the trace, its spans never reached the store
    to_store.shutdown()
    elsewhere.shutdown()
    store.flush()
    assert len({e.trace_id for e in store.events()}) == 1
    report = replay(store, "provision", validators=[("known_region", known_region)])
    # which event is which step cannot be told: neither is replayed, neither is guessed
    assert (report.steps, report.not_replayable, report.checks[0].flagged) == (2, 2, 0)


def test_an_event_whose_step_span_disagrees_with_it_is_not_replayed(
        store: cl.Store, user_tracer: tuple[trace.Tracer, InMemorySpanExporter]) -> None:
    # a wall clock that runs backwards orders the events against the steps' real order
    tracer, _ = user_tracer
    backwards = iter([200.0, 100.0])
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    steps = cl.Loop(propose, task_type="provision", executor=provision, verifiers=[landed],
                    store=store, telemetry=pipeline, wallclock=lambda: next(backwards))
    with tracer.start_as_current_span("batch"):
        steps.run(1)  # succeeds, recorded at t=200
        steps.run(4)  # fails verification, recorded at t=100: the first event of the trace
    pipeline.shutdown()
    store.flush()
    report = replay(store, "provision", validators=[("known_region", known_region)])
    # paired by order they would swap proposals; outcomes disagree, so neither is replayed
    assert (report.steps, report.not_replayable, report.checks[0].flagged) == (2, 2, 0)
