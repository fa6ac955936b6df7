"""Prometheus metrics derived from spans: names, labels, bounded cardinality, health counters."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

import closedloop as cl
from closedloop.telemetry import Metrics, StoreExporter, StoreTail, Telemetry, span_store_for


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def _observe(metrics: Metrics, name: str, attrs: dict[str, Any], duration: float = 0.5) -> None:
    metrics.observe(name, attrs, duration, error=False)


def test_steps_count_by_task_type_and_outcome(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    for outcome in ("succeeded", "succeeded", "failed"):
        _observe(m, "closedloop.step", {"closedloop.task_type": "t",
                                          "closedloop.outcome": outcome})
    assert value(registry, "closedloop_task_runs_total", task_type="t", outcome="succeeded") == 2
    assert value(registry, "closedloop_step_duration_seconds_count", task_type="t",
                 outcome="failed") == 1


def test_validation_failures_count_by_check_and_kind(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    _observe(m, "closedloop.validate", {"closedloop.task_type": "t", "closedloop.check": "c",
                                          "closedloop.verdict.passed": False})
    _observe(m, "closedloop.validate", {"closedloop.task_type": "t", "closedloop.check": "c",
                                          "closedloop.verdict.passed": True})
    _observe(m, "closedloop.verify", {"closedloop.task_type": "t", "closedloop.check": "v",
                                        "closedloop.verdict.passed": False,
                                        "closedloop.verdict.unknown": True})
    assert value(registry, "closedloop_validation_failures_total", task_type="t", check="c",
                 kind="failed") == 1
    assert value(registry, "closedloop_verification_failures_total", task_type="t", check="v",
                 kind="unknown") == 1


def test_reasks_count_attempts_after_the_first(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    for n in (1, 2, 3):
        _observe(m, "closedloop.attempt", {"closedloop.task_type": "t", "closedloop.attempt": n})
    assert value(registry, "closedloop_reasks_total", task_type="t") == 2


def test_model_calls_feed_the_gen_ai_metrics(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    _observe(m, "chat gpt-4o", {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o", "gen_ai.usage.input_tokens": 100,
        "gen_ai.usage.output_tokens": 20, "gen_ai.usage.cache_read.input_tokens": 60}, 1.5)
    labels = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai",
              "gen_ai_request_model": "gpt-4o"}
    assert value(registry, "gen_ai_client_operation_duration_seconds_sum", error_type="",
                 **labels) == 1.5
    assert value(registry, "gen_ai_client_token_usage_sum", gen_ai_token_type="input",
                 **labels) == 100
    assert value(registry, "closedloop_model_tokens_total", gen_ai_provider_name="openai",
                 gen_ai_request_model="gpt-4o", type="cache_read") == 60


def test_label_values_past_the_cap_become_other(registry: CollectorRegistry) -> None:
    m = Metrics(registry, max_label_values=2)
    for task in ("a", "b", "c", "d"):
        _observe(m, "closedloop.step", {"closedloop.task_type": task,
                                          "closedloop.outcome": "succeeded"})
    assert value(registry, "closedloop_task_runs_total", task_type="other",
                 outcome="succeeded") == 2
    assert value(registry, "closedloop_task_runs_total", task_type="a",
                 outcome="succeeded") == 1


def test_rate_limits_and_breaker_state_are_exposed(registry: CollectorRegistry) -> None:
    m = Metrics(registry)
    m.rate_limited("openai", 7.0)
    m.set_breaker_state("t", "halted")
    assert value(registry, "closedloop_rate_limited_total", key="openai") == 1
    assert value(registry, "closedloop_rate_limit_retry_after_seconds", key="openai") == 7.0
    assert value(registry, "closedloop_breaker_state", task_type="t",
                 closedloop_breaker_state="halted") == 1


def test_dropped_spans_are_exposed(registry: CollectorRegistry, store: cl.Store) -> None:
    m = Metrics(registry)
    pipeline = Telemetry([m], max_queue=1, flush_interval=60.0)
    m.watch(telemetry=pipeline, store=store)
    for _ in range(3):
        pipeline.end_span(pipeline.start_span("s"))
    assert value(registry, "closedloop_telemetry_spans_dropped_total") == 2
    assert value(registry, "closedloop_store_events_not_written_total", reason="lost") == 0
    pipeline.shutdown()


def test_a_store_tail_turns_other_processes_spans_into_metrics(
    registry: CollectorRegistry, store: cl.Store,
) -> None:
    tail = StoreTail(span_store_for(store), Metrics(registry))
    writer = Telemetry([StoreExporter(store)], flush_interval=60.0)
    with writer.span("closedloop.step", **{"closedloop.task_type": "t",
                                            "closedloop.outcome": "halted"}):
        pass
    writer.shutdown()
    assert tail.poll() == 1
    assert tail.poll() == 0
    assert value(registry, "closedloop_task_runs_total", task_type="t", outcome="halted") == 1


def test_exposition_names_follow_prometheus_conventions(registry: CollectorRegistry) -> None:
    Metrics(registry)
    text = generate_latest(registry).decode()
    for name in ("closedloop_task_runs_total", "closedloop_step_duration_seconds",
                 "gen_ai_client_operation_duration_seconds", "gen_ai_client_token_usage"):
        assert f"# TYPE {name.removesuffix('_total')}" in text


def test_halts_pauses_and_limiter_state_are_read_at_scrape_time(
    registry: CollectorRegistry,
) -> None:
    from closedloop.control import Backpressure, MemoryLedger, Stop, StopKind

    ledger = MemoryLedger()
    limiter = Backpressure()
    m = Metrics(registry)
    m.watch_control(ledger=ledger, backpressure=limiter)
    assert value(registry, "closedloop_breaker_state", task_type="deploy",
                 closedloop_breaker_state="halted") is None

    ledger.put(Stop(task_type="deploy", kind=StopKind.HALTED, at=0.0, until=None,
                    by="test", reason="verification failed 5 times in a row"))
    limiter.call("openai/gpt-4o", lambda: "ok")
    assert value(registry, "closedloop_breaker_state", task_type="deploy",
                 closedloop_breaker_state="halted") == 1
    assert value(registry, "closedloop_breaker_state", task_type="deploy",
                 closedloop_breaker_state="closed") == 0
    assert value(registry, "closedloop_circuit_breaker_state", key="openai/gpt-4o",
                 closedloop_circuit_breaker_state="closed") == 1
    assert value(registry, "closedloop_rate_limiter_available_ratio", key="openai/gpt-4o") == 1.0
    rate = value(registry, "closedloop_rate_limiter_rate", key="openai/gpt-4o")
    assert rate is not None and rate > 0
