"""Store URLs for the contract suite: memory, a SQLite file, and a PostgreSQL schema of the
test's own (``closedloop_test_<hex>`` in database ``test``, dropped afterwards; no other
schema is ever touched). PostgreSQL missing skips, or fails under
``CLOSEDLOOP_REQUIRE_SERVICES=1``."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import _services

PG_URL = os.environ.get("CLOSEDLOOP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin() -> Any:
    psycopg = _services.module("psycopg")
    _services.module("psycopg_pool")
    try:
        return psycopg.connect(PG_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        _services.unavailable(f"PostgreSQL at {PG_URL} is unreachable: {exc}")


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """The name of a schema of this test's own; dropped (with everything in it) afterwards."""
    admin = _pg_admin()
    name = f"closedloop_test_{uuid.uuid4().hex[:12]}"
    yield name
    admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    admin.close()


@pytest.fixture
def pg_url(pg_schema: str) -> str:
    """A PostgreSQL store URL for this test's own schema."""
    return f"{PG_URL}?schema={pg_schema}"


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def any_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every backend: a fresh store URL of each kind."""
    return _url(request, tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Backends that outlive a process and are shared between processes."""
    return _url(request, tmp_path)


def _url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return str(request.getfixturevalue("pg_url"))
