"""Spans and scores in the embedded store: written by the exporter, read back by trace."""

from __future__ import annotations

import closedloop as cl
from closedloop.learn import score_summary
from closedloop.telemetry import (
    StoreExporter,
    Telemetry,
    record_score,
    span_store_for,
)


def _trace(pipeline: Telemetry, task: str = "t") -> str:
    labels = {"closedloop.task_type": task, "closedloop.outcome": "succeeded"}
    with pipeline.span("closedloop.step", **labels) as root, \
            pipeline.span("closedloop.attempt") as attempt:
        attempt.record.content = {"closedloop.proposal": "token sk-ant-" + "k" * 30}
    return root.record.trace_id_hex


def test_store_exporter_writes_a_readable_tree(store: cl.Store) -> None:
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    trace_id = _trace(pipeline)
    pipeline.shutdown()
    spans = span_store_for(store).trace(trace_id)
    assert [s.name for s in spans] == ["closedloop.step", "closedloop.attempt"]
    assert spans[1].parent_id == spans[0].span_id
    assert spans[0].attributes["closedloop.task_type"] == "t"


def test_stored_content_is_redacted(store: cl.Store) -> None:
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    trace_id = _trace(pipeline)
    pipeline.shutdown()
    attempt = span_store_for(store).trace(trace_id)[1]
    assert attempt.content == {"closedloop.proposal": "token [REDACTED:anthropic_key]"}


def test_traces_list_newest_first_and_filter_by_task_type(store: cl.Store) -> None:
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    first = _trace(pipeline, "a")
    second = _trace(pipeline, "b")
    pipeline.shutdown()
    spans = span_store_for(store)
    assert [t.trace_id for t in spans.traces().traces] == [second, first]
    (only,) = spans.traces(task_type="a").traces
    assert (only.trace_id, only.spans, only.outcome) == (first, 2, "succeeded")


def test_memory_stores_keep_spans_in_memory(memory_store: cl.Store) -> None:
    pipeline = Telemetry([StoreExporter(memory_store)], flush_interval=60.0)
    trace_id = _trace(pipeline)
    pipeline.shutdown()
    assert len(span_store_for(memory_store).trace(trace_id)) == 2


def test_scores_are_stored_and_read_back(store: cl.Store) -> None:
    trace_id = "ab" * 16
    record_score(trace_id, "satisfaction", 4, comment="fine", store=store, clock=lambda: 10.0)
    record_score(trace_id, "quality", "wrong_region", source="rule", store=store,
                 clock=lambda: 11.0)
    scores = span_store_for(store).scores(trace_id=trace_id)
    assert [(s.name, s.value, s.label, s.source) for s in scores] == [
        ("satisfaction", 4.0, None, "human"), ("quality", None, "wrong_region", "rule")]


def test_a_score_is_a_gen_ai_evaluation_event(store: cl.Store) -> None:
    score = record_score("ab" * 16, "quality", 0.5, comment="ok", source="model", store=store)
    event = score.to_event()
    assert event["name"] == "gen_ai.evaluation.result"
    assert event["attributes"]["gen_ai.evaluation.score.value"] == 0.5
    assert event["attributes"]["gen_ai.evaluation.explanation"] == "ok"


def test_malformed_scores_are_config_errors(store: cl.Store) -> None:
    import pytest

    with pytest.raises(cl.ConfigError, match="32 hex"):
        record_score("nope", "q", 1, store=store)
    with pytest.raises(cl.ConfigError, match="source"):
        record_score("ab" * 16, "q", 1, source="oracle", store=store)
    with pytest.raises(cl.ConfigError, match="finite"):
        record_score("ab" * 16, "q", float("nan"), store=store)


def test_score_summary_joins_scores_to_task_types(store: cl.Store) -> None:
    loop = cl.Loop(lambda task, attempt: task, task_type="echo", store=store)
    ok = loop.run(1)
    loop.run(2)
    store.flush()
    record_score(ok.trace_id, "satisfaction", 5, store=store, clock=lambda: 86400.0 * 3)
    record_score(ok.trace_id, "satisfaction", 3, store=store, clock=lambda: 86400.0 * 3)
    (echo,) = score_summary(store)
    assert (echo.steps, echo.success_rate, echo.mean("satisfaction")) == (2, 1.0, 4.0)
    assert echo.to_dict()["daily"] == {"1970-01-04": {"satisfaction": 4.0}}
