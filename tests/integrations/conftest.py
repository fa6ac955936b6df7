"""Fixtures: a local server in the providers' wire formats, and a span capture."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from closedloop.telemetry import MemoryExporter, Telemetry
from integrations._wire_server import WireServer


@pytest.fixture
def wire() -> Iterator[WireServer]:
    server = WireServer()
    yield server
    server.close()


@pytest.fixture
def spans() -> Iterator[tuple[Telemetry, MemoryExporter]]:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter], flush_interval=60.0)
    yield pipeline, exporter
    pipeline.shutdown()
