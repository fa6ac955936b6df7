"""The span pipeline: cheap recording, background export, bounds, and OpenTelemetry nesting."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import closedloop as cl
from closedloop.telemetry import (
    MemoryExporter,
    SpanRecord,
    StoreExporter,
    Telemetry,
    span_store_for,
)


def test_spans_reach_the_exporter_on_flush(captured: tuple[Telemetry, MemoryExporter]) -> None:
    pipeline, exporter = captured
    with pipeline.span("outer", answer=42), pipeline.span("inner"):
        pass
    assert pipeline.flush(5.0)
    spans = {s.name: s for s in exporter.finished()}
    assert spans["outer"].attributes == {"answer": 42}
    assert spans["inner"].parent_id == spans["outer"].span_id
    assert spans["inner"].trace_id == spans["outer"].trace_id


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter], max_queue=2, flush_interval=60.0)
    for i in range(5):
        pipeline.end_span(pipeline.start_span(f"s{i}"))
    assert pipeline.stats().dropped == 3
    pipeline.shutdown()
    assert [s.name for s in exporter.finished()] == ["s0", "s1"]


class Broken:
    def export(self, spans: Sequence[SpanRecord]) -> bool:
        raise RuntimeError("collector down")

    def force_flush(self, timeout: float = 10.0) -> bool:
        return True

    def shutdown(self) -> None:
        pass


def test_a_failing_exporter_is_counted_and_others_still_receive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = MemoryExporter()
    pipeline = Telemetry([Broken(), good], flush_interval=60.0)
    with caplog.at_level(logging.ERROR, "closedloop.telemetry"):
        pipeline.end_span(pipeline.start_span("s"))
        pipeline.flush(5.0)
    assert pipeline.stats().export_failures == {"Broken": 1}
    assert [s.name for s in good.finished()] == ["s"]
    assert "collector down" in caplog.text
    pipeline.shutdown()


def test_shutdown_exports_what_is_still_queued() -> None:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter], flush_interval=60.0)
    pipeline.end_span(pipeline.start_span("pending"))
    stats = pipeline.shutdown()
    assert [s.name for s in exporter.finished()] == ["pending"]
    assert stats.exported == 1


def test_user_spans_nest_under_closedloop_spans(
    captured: tuple[Telemetry, MemoryExporter],
    user_tracer: tuple[trace.Tracer, InMemorySpanExporter],
) -> None:
    pipeline, exporter = captured
    tracer, user_spans = user_tracer
    with pipeline.span("closedloop.stage"), tracer.start_as_current_span("user.work"):
        pass
    pipeline.flush(5.0)
    (ours,) = exporter.finished()
    (theirs,) = user_spans.get_finished_spans()
    assert theirs.parent is not None
    assert f"{theirs.parent.span_id:016x}" == ours.span_id
    assert f"{theirs.context.trace_id:032x}" == ours.trace_id


def test_attributes_set_on_the_current_span_land_on_closedloop_span(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured
    with pipeline.span("stage"):
        current = trace.get_current_span()
        current.set_attribute("user.key", "v")
        current.add_event("checkpoint", {"n": 1})
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.attributes["user.key"] == "v"
    assert span.events[0]["name"] == "checkpoint"


def test_an_exception_marks_the_span_as_error(captured: tuple[Telemetry, MemoryExporter]) -> None:
    pipeline, exporter = captured
    with pytest.raises(ValueError, match="bad"), pipeline.span("stage"):
        raise ValueError("bad")
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.status == 2
    assert span.attributes["error.type"] == "ValueError"


async def test_concurrent_tasks_keep_their_own_parents(
    captured: tuple[Telemetry, MemoryExporter],
) -> None:
    pipeline, exporter = captured

    async def work(name: str) -> None:
        with pipeline.span(name):
            await asyncio.sleep(0)
            with pipeline.span(f"{name}.child"):
                await asyncio.sleep(0)

    await asyncio.gather(work("a"), work("b"))
    pipeline.flush(5.0)
    spans = {s.name: s for s in exporter.finished()}
    for name in ("a", "b"):
        assert spans[f"{name}.child"].parent_id == spans[name].span_id
        assert spans[f"{name}.child"].trace_id == spans[name].trace_id
    assert spans["a"].trace_id != spans["b"].trace_id


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_exports_its_own_spans(store: cl.Store) -> None:
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    pipeline.end_span(pipeline.start_span("parent.before"))
    pipeline.flush(5.0)  # the parent's export thread is running when we fork
    pid = os.fork()
    if pid == 0:  # the child: a fresh queue and thread, flushed at exit
        code = 1
        try:
            pipeline.end_span(pipeline.start_span("child"))
            code = 0 if pipeline.shutdown().exported == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    pipeline.end_span(pipeline.start_span("parent.after"))
    pipeline.shutdown()
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(span_store_for(store).traces(limit=10).traces) == 3
