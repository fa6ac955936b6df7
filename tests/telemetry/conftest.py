"""Fixtures: a pipeline capturing spans in memory, and a user's own OpenTelemetry SDK tracer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from closedloop.telemetry import MemoryExporter, Telemetry


@pytest.fixture
def captured() -> Iterator[tuple[Telemetry, MemoryExporter]]:
    """A pipeline that exports only when flushed, into memory."""
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter], flush_interval=60.0)
    yield pipeline, exporter
    pipeline.shutdown()


@pytest.fixture
def user_tracer() -> Iterator[tuple[trace.Tracer, InMemorySpanExporter]]:
    """A user's own OpenTelemetry SDK tracer (not installed globally)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("user"), exporter
    provider.shutdown()
