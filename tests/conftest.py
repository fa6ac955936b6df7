"""Shared fixtures: a fresh store per test and no process-wide default leaking between tests;
the ``requires`` mark (see ``_services.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import closedloop as cl

# the ``requires`` mark; pytester runs small pytest sessions to test that mark
pytest_plugins = ("_services", "pytester")


@pytest.fixture(autouse=True)
def _isolated_default_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test gets a fresh process runtime (store file, fault control, backpressure, no
    telemetry), never the user's."""
    monkeypatch.setenv("CLOSEDLOOP_STORE", f"sqlite:///{tmp_path / 'default.db'}")
    monkeypatch.delenv("CLOSEDLOOP_REDIS_URL", raising=False)
    cl.reset()
    yield
    cl.reset()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[cl.Store]:
    """A fresh SQLite store in the test's temporary folder."""
    s = cl.open_store(f"sqlite:///{tmp_path / 'events.db'}")
    yield s
    s.close()


@pytest.fixture
def memory_store() -> Iterator[cl.Store]:
    """A fresh in-memory store."""
    s = cl.open_store("memory://")
    yield s
    s.close()
