"""What the integration tests need from the machine, asked in one place.

A test that needs a program, a module or a service that is missing is skipped with the reason
and the fix; under ``CLOSEDLOOP_REQUIRE_SERVICES=1`` (CI: ``.ci/run`` sets it) it fails instead,
so that a run can never pass by skipping what it was meant to test.

Mark a test with ``@pytest.mark.requires("terraform", "psycopg")`` (checked before it runs: this
module is a pytest plugin, loaded by ``tests/conftest.py``), or call :func:`program`,
:func:`module` or :func:`unavailable` from a fixture.
"""

from __future__ import annotations

import importlib
import os
import shutil
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE_ENV = "CLOSEDLOOP_REQUIRE_SERVICES"

# name -> (executables that serve, in order of preference; how to get one)
PROGRAMS: dict[str, tuple[tuple[str, ...], str]] = {
    "terraform": (("terraform", "tofu"), "install Terraform >= 1.4 or OpenTofu on PATH"),
    "ruff": (("ruff",), "pip install -e '.[test]'"),
    "promtool": (("promtool",), "apt-get install prometheus"),
    "prometheus": (("prometheus",), "apt-get install prometheus"),
    "redis-server": (("redis-server",), "apt-get install redis-server"),
    "setpriv": (("setpriv",), "apt-get install util-linux"),
    "influxd": (("influxd",), "apt-get install influxdb"),
    "chromium": (("chromium",), "apt-get install chromium (Debian's; never Playwright's download)"),
}
# importable name -> how to get it
MODULES: dict[str, str] = {
    "psycopg": "pip install -e '.[test]' (the postgres extra)",
    "psycopg_pool": "pip install -e '.[test]' (the postgres extra)",
    "playwright": "pip install -e '.[test]'",
}


def required() -> bool:
    """True when missing services fail the run instead of skipping (CI)."""
    return os.environ.get(REQUIRE_ENV) == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip the current test with ``reason``, or fail it when services are required."""
    if required():
        pytest.fail(f"{reason} (required: {REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def _ruff_from_its_package() -> str | None:
    try:
        from ruff.__main__ import find_ruff_bin  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        return str(find_ruff_bin())
    except FileNotFoundError:
        return None


def program(name: str) -> str:
    """The path of the program ``name`` (a key of :data:`PROGRAMS`), or skip/fail the test."""
    names, fix = PROGRAMS[name]
    for candidate in names:
        path = shutil.which(candidate)
        if path is not None:
            return path
    if name == "ruff" and (path := _ruff_from_its_package()) is not None:
        return path
    unavailable(f"{' or '.join(names)} is not on PATH ({fix})")


def module(name: str) -> ModuleType:
    """The imported module ``name`` (a key of :data:`MODULES`), or skip/fail the test."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unavailable(f"{name} cannot be imported: {exc} ({MODULES[name]})")


def require(name: str) -> None:
    """Check one requirement named in a ``requires`` mark."""
    if name in PROGRAMS:
        program(name)
    elif name in MODULES:
        module(name)
    else:
        raise ValueError(f"unknown requirement {name!r}; add it to tests/_services.py")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "requires(*names): programs or modules the test needs (tests/_services.py); "
        "missing ones skip it, or fail it under CLOSEDLOOP_REQUIRE_SERVICES=1")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires"):
        for name in mark.args:
            require(name)
