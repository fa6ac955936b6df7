"""A loop step traced: one span per stage, OpenTelemetry nesting both ways, metrics, store."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest

import closedloop as cl
from closedloop.telemetry import (
    MemoryExporter,
    Metrics,
    StoredSpan,
    StoreExporter,
    StoreTail,
    Telemetry,
    set_default_telemetry,
    span_store_for,
)
from closedloop.telemetry._span import current_parent


def agent(task: int, attempt: cl.Attempt) -> int:
    attempt.record_usage(100, 20)
    return abs(task) if attempt.number > 1 else task


def positive(value: int) -> str | None:
    return None if value > 0 else f"{value} is not positive"


def double(value: int) -> int:
    return value * 2


def doubled(intent: int, result: int) -> bool:
    return result == 2 * abs(intent)


def loop(pipeline: Telemetry, store: cl.Store | None = None, **kw: Any) -> cl.Loop:
    options: dict[str, Any] = {"validators": [positive], "executor": double,
                               "verifiers": [doubled], "store": store, **kw}
    return cl.Loop(agent, task_type="deploy", telemetry=pipeline, **options)


def tree(exporter: MemoryExporter) -> dict[str, list[StoredSpan]]:
    out: dict[str, list[StoredSpan]] = {}
    for s in exporter.finished():
        out.setdefault(s.name, []).append(s)
    return out


def test_a_step_has_one_span_per_stage(captured: tuple[Telemetry, MemoryExporter]) -> None:
    pipeline, exporter = captured
    result = loop(pipeline).run(3)
    pipeline.flush(5.0)
    spans = tree(exporter)
    (root,) = spans["closedloop.step"]
    (attempt,) = spans["closedloop.attempt"]
    (agent_span,) = spans["invoke_agent agent"]
    assert root.trace_id == result.trace_id
    assert root.attributes["closedloop.outcome"] == "succeeded"
    assert root.attributes["closedloop.usage.input_tokens"] == 100
    assert attempt.parent_id == root.span_id
    assert agent_span.parent_id == attempt.span_id
    assert agent_span.attributes["gen_ai.usage.output_tokens"] == 20
    assert spans["closedloop.validate"][0].parent_id == attempt.span_id
    assert spans["closedloop.act"][0].parent_id == root.span_id
    assert spans["closedloop.verify"][0].attributes["closedloop.verdict.passed"] is True


def test_a_reask_is_a_second_attempt_with_its_feedback(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured
    loop(pipeline).run(-3)
    pipeline.flush(5.0)
    spans = tree(exporter)
    assert [a.attributes["closedloop.attempt"] for a in spans["closedloop.attempt"]] == [1, 2]
    first, second = spans["closedloop.validate"]
    assert first.attributes["closedloop.verdict.passed"] is False
    assert first.attributes["closedloop.verdict.issues"] == ["invalid"]
    assert second.attributes["closedloop.verdict.passed"] is True
    retry = spans["invoke_agent agent"][1]
    assert "-3 is not positive" in retry.content["closedloop.feedback"]
    assert retry.content["closedloop.proposal"] == "3"
    # each model call span carries its own attempt's tokens; the step carries the total
    assert [a.attributes["gen_ai.usage.input_tokens"] for a in spans["invoke_agent agent"]] == [
        100, 100]
    assert spans["closedloop.step"][0].attributes["closedloop.usage.input_tokens"] == 200


def test_user_spans_in_hooks_nest_under_the_stage(
    captured: tuple[Telemetry, MemoryExporter],
    user_tracer: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    pipeline, exporter = captured
    tracer, user_spans = user_tracer

    def traced_agent(task: int, attempt: cl.Attempt) -> int:
        with tracer.start_as_current_span("llm.call"):
            return task

    def traced_executor(value: int) -> int:
        with tracer.start_as_current_span("cloud.api"):
            return value * 2

    cl.Loop(traced_agent, task_type="t", executor=traced_executor, store=None,
            telemetry=pipeline, agent_id="traced_agent").run(1)
    pipeline.flush(5.0)
    ours = {s.name: s for s in exporter.finished()}
    theirs = {s.name: s for s in user_spans.get_finished_spans()}
    llm, api = theirs["llm.call"], theirs["cloud.api"]
    assert llm.parent is not None and api.parent is not None
    assert f"{llm.parent.span_id:016x}" == ours["invoke_agent traced_agent"].span_id
    assert f"{api.parent.span_id:016x}" == ours["closedloop.act"].span_id
    assert f"{llm.context.trace_id:032x}" == ours["closedloop.step"].trace_id


def test_a_step_inside_a_user_span_joins_its_trace(
    captured: tuple[Telemetry, MemoryExporter],
    user_tracer: tuple[trace.Tracer, InMemorySpanExporter],
    memory_store: cl.Store,
) -> None:
    pipeline, exporter = captured
    tracer, _ = user_tracer
    with tracer.start_as_current_span("http.request") as request:
        result = loop(pipeline, memory_store).run(2)
    pipeline.flush(5.0)
    memory_store.flush()
    (root,) = tree(exporter)["closedloop.step"]
    user_trace = f"{request.get_span_context().trace_id:032x}"
    assert result.trace_id == user_trace == root.trace_id
    assert root.parent_id == f"{request.get_span_context().span_id:016x}"
    assert next(memory_store.events()).trace_id == user_trace


async def test_concurrent_async_steps_keep_separate_traces(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured

    async def slow_agent(task: int, attempt: cl.Attempt) -> int:
        await asyncio.sleep(0.001 * task)
        return task

    async def check(value: int) -> None:
        await asyncio.sleep(0)

    traced = cl.Loop(slow_agent, task_type="t", validators=[check], store=None,
                     telemetry=pipeline)
    results = await asyncio.gather(*(traced.arun(n) for n in (3, 1, 2)))
    pipeline.flush(5.0)
    by_id = {s.span_id: s for s in exporter.finished()}
    for result in results:
        mine = [s for s in by_id.values() if s.trace_id == result.trace_id]
        assert len(mine) == 4  # step, attempt, agent, validator
        for s in mine:
            assert s.parent_id is None or by_id[s.parent_id].trace_id == result.trace_id


def test_an_agent_exception_marks_the_spans_and_propagates(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured

    def broken(task: int, attempt: cl.Attempt) -> int:
        raise RuntimeError("model down")

    with pytest.raises(RuntimeError, match="model down"):
        cl.Loop(broken, task_type="t", store=None, telemetry=pipeline, agent_id="broken").run(1)
    pipeline.flush(5.0)
    spans = {s.name: s for s in exporter.finished()}
    assert spans["invoke_agent broken"].attributes["error.type"] == "RuntimeError"
    assert spans["closedloop.step"].status == 2
    assert spans["closedloop.step"].attributes["closedloop.outcome"] == "error"


def test_a_crashed_check_marks_its_span_and_the_step_as_errors(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured

    def schema(value: int) -> None:
        raise KeyError("schema")

    cl.Loop(agent, task_type="t", validators=[schema], store=None, telemetry=pipeline).run(1)
    pipeline.flush(5.0)
    spans = {s.name: s for s in exporter.finished()}
    check, step = spans["closedloop.validate"], spans["closedloop.step"]
    assert (check.status, check.attributes["error.type"]) == (2, "KeyError")
    assert step.status == 2  # no exception left the step, yet it ended in error
    assert step.attributes["closedloop.error_type"] == "validator_error"
    assert "KeyError" in (step.status_message or "")


def test_one_function_as_validator_and_verifier_gets_each_stages_span(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured

    def nonzero(*values: int) -> bool:
        return all(values)

    cl.Loop(agent, task_type="t", validators=[nonzero], executor=double, verifiers=[nonzero],
            store=None, telemetry=pipeline).run(3)
    pipeline.flush(5.0)
    spans = tree(exporter)
    (attempt,), (root,) = spans["closedloop.attempt"], spans["closedloop.step"]
    (validate,), (verify,) = spans["closedloop.validate"], spans["closedloop.verify"]
    assert validate.parent_id == attempt.span_id
    assert verify.parent_id == root.span_id
    assert validate.attributes["closedloop.check"] == verify.attributes["closedloop.check"]


def test_one_function_as_agent_and_executor_is_traced_as_both(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured

    def echo(value: int, attempt: cl.Attempt | None = None) -> int:
        return value

    result = cl.Loop(echo, task_type="t", executor=echo, store=None, telemetry=pipeline).run(5)
    pipeline.flush(5.0)
    spans = tree(exporter)
    assert result.ok and result.result == 5
    assert len(spans[f"invoke_agent {echo.__qualname__}"]) == 1
    (act,) = spans["closedloop.act"]
    assert act.content["closedloop.result"] == "5"


def test_a_rejection_at_the_gate_is_recorded(captured: tuple[Telemetry, MemoryExporter]) -> None:
    pipeline, exporter = captured
    result = loop(pipeline, autonomy="approve", approver=lambda task, proposal: False).run(1)
    pipeline.flush(5.0)
    spans = tree(exporter)
    assert result.outcome is cl.Outcome.REJECTED
    assert spans["closedloop.gate"][0].attributes["closedloop.gate"] == "rejected"
    assert "closedloop.act" not in spans


def test_loops_use_the_default_pipeline_once_configured(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured
    previous = set_default_telemetry(pipeline)
    try:
        cl.Loop(agent, task_type="t", store=None).run(1)
    finally:
        set_default_telemetry(previous)
    pipeline.flush(5.0)
    assert "closedloop.step" in tree(exporter)


def test_no_telemetry_records_no_span(captured: tuple[Telemetry, MemoryExporter]) -> None:
    pipeline, exporter = captured
    set_default_telemetry(pipeline)
    try:
        cl.Loop(agent, task_type="t", store=None, telemetry=None).run(1)
    finally:
        set_default_telemetry(None)
    pipeline.flush(5.0)
    assert exporter.finished() == []


def test_steps_feed_the_prometheus_metrics() -> None:
    registry = CollectorRegistry()
    pipeline = Telemetry([Metrics(registry)], flush_interval=60.0)
    traced = loop(pipeline)
    traced.run(2)
    traced.run(-2)
    pipeline.shutdown()
    assert registry.get_sample_value("closedloop_task_runs_total",
                                     {"task_type": "deploy", "outcome": "succeeded"}) == 2
    assert registry.get_sample_value("closedloop_reasks_total", {"task_type": "deploy"}) == 1
    assert registry.get_sample_value(
        "closedloop_validation_failures_total",
        {"task_type": "deploy", "check": "positive", "kind": "failed"}) == 1
    assert registry.get_sample_value("closedloop_tokens_total",
                                     {"task_type": "deploy", "type": "input"}) == 300


def _failure_lines(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines()
                  if line.startswith("closedloop_") and "failures_total{" in line)


def schema(value: int) -> None:
    raise KeyError("schema")


def nonsense(value: int) -> int:
    return 42


def describe(intent: int, result: int) -> None:
    raise TimeoutError("describe_instances")


def unreachable(intent: int, result: int) -> cl.Verdict:
    return cl.Verdict.cannot_tell("endpoint unreachable")


def test_crashed_checks_are_counted_as_crashed_in_the_metrics() -> None:
    registry = CollectorRegistry()
    pipeline = Telemetry([Metrics(registry)], flush_interval=60.0)
    crashed_validator = cl.Loop(agent, task_type="deploy", validators=[schema], store=None,
                                telemetry=pipeline).run(1)
    bad_return = cl.Loop(agent, task_type="deploy", validators=[nonsense], store=None,
                         telemetry=pipeline).run(1)
    # the verifier after the crashed one still runs, and is counted on its own
    crashed_verifier = loop(pipeline, verifiers=[describe, unreachable]).run(1)
    pipeline.shutdown()

    assert crashed_validator.error_type is cl.ErrorType.VALIDATOR_ERROR
    assert bad_return.error_type is cl.ErrorType.VALIDATOR_ERROR
    assert crashed_verifier.error_type is cl.ErrorType.VERIFIER_ERROR
    assert _failure_lines(registry) == [
        'closedloop_validation_failures_total{check="nonsense",kind="crashed",'
        'task_type="deploy"} 1.0',
        'closedloop_validation_failures_total{check="schema",kind="crashed",'
        'task_type="deploy"} 1.0',
        'closedloop_verification_failures_total{check="describe",kind="crashed",'
        'task_type="deploy"} 1.0',
        'closedloop_verification_failures_total{check="unreachable",kind="unknown",'
        'task_type="deploy"} 1.0',
    ]


def test_a_crashed_check_read_back_from_the_store_is_counted_as_crashed(store: cl.Store) -> None:
    registry = CollectorRegistry()
    tail = StoreTail(span_store_for(store), Metrics(registry))  # as `closedloop serve` does
    writer = Telemetry([StoreExporter(store)], flush_interval=60.0)
    cl.Loop(agent, task_type="deploy", validators=[schema], store=None, telemetry=writer).run(1)
    writer.shutdown()
    tail.poll()
    assert _failure_lines(registry) == [
        'closedloop_validation_failures_total{check="schema",kind="crashed",'
        'task_type="deploy"} 1.0']


def test_a_check_returning_an_iterator_of_issues_fails_with_tracing_on() -> None:
    def issues(value: int) -> Iterator[str]:
        yield f"{value} is odd"

    pipeline = Telemetry([Metrics(CollectorRegistry())], flush_interval=60.0)
    result = cl.Loop(agent, task_type="deploy", validators=[issues], store=None,
                     telemetry=pipeline, max_attempts=1).run(1)
    pipeline.shutdown()
    assert result.error_type is cl.ErrorType.VALIDATION
    assert "1 is odd" in (result.error_message or "")


def test_an_async_hook_under_run_closes_the_step_span(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured

    async def async_agent(task: int, attempt: cl.Attempt) -> int:
        return task

    with pytest.raises(cl.ConfigError, match="arun"):
        cl.Loop(async_agent, task_type="t", store=None, telemetry=pipeline).run(1)
    pipeline.flush(5.0)
    spans = {s.name.split(" ")[0]: s for s in exporter.finished()}
    assert spans["closedloop.step"].attributes["error.type"] == "abandoned"
    # every span of the step ended and was exported, and none is left as the current span
    assert set(spans) == {"closedloop.step", "closedloop.attempt", "invoke_agent"}
    assert current_parent() == (0, 0, None)
