"""The test suite's own contract: a missing program, module or service skips a test, and fails
it under ``CLOSEDLOOP_REQUIRE_SERVICES=1``, so that CI can never pass by skipping."""

from __future__ import annotations

import sys

import pytest

_MARKED = """
import pytest

@pytest.mark.requires("terraform")
def test_needs_terraform():
    pass

@pytest.mark.requires("psycopg")
def test_needs_psycopg():
    pass

@pytest.mark.requires("ruff")
def test_needs_ruff():
    pass
"""


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """An inner pytest session with the ``requires`` mark (no asyncio or hypothesis: unused)."""
    return pytester.runpytest("-p", "_services", "-p", "no:asyncio", "-p", "no:hypothesispytest",
                              *args)


@pytest.fixture
def bare_machine(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A machine with no terraform, ruff or psycopg: an empty PATH and psycopg unimportable."""
    monkeypatch.setenv("PATH", str(pytester.path))
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` raises ImportError
    monkeypatch.setitem(sys.modules, "ruff.__main__", None)  # ruff's own package has no binary
    pytester.makepyfile(_MARKED)
    return pytester


def test_a_missing_program_or_module_skips_with_the_fix(
    bare_machine: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLOSEDLOOP_REQUIRE_SERVICES", raising=False)
    result = run(bare_machine, "-rs")
    result.assert_outcomes(skipped=3)
    result.stdout.fnmatch_lines([
        "*terraform or tofu is not on PATH (install Terraform*",
        "*psycopg cannot be imported*pip install*",
        "*ruff is not on PATH (pip install*",
    ])


def test_a_missing_program_or_module_fails_when_services_are_required(
    bare_machine: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOSEDLOOP_REQUIRE_SERVICES", "1")
    result = run(bare_machine)
    result.assert_outcomes(errors=3)
    result.stdout.fnmatch_lines(["*required: CLOSEDLOOP_REQUIRE_SERVICES=1*"])


def test_a_present_program_runs_the_test(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = pytester.path / "bin"
    fake.mkdir()
    terraform = fake / "terraform"
    terraform.write_text("#!/bin/sh\n")
    terraform.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake))
    monkeypatch.setenv("CLOSEDLOOP_REQUIRE_SERVICES", "1")
    pytester.makepyfile("""
import pytest

@pytest.mark.requires("terraform")
def test_needs_terraform():
    pass
""")
    run(pytester).assert_outcomes(passed=1)


def test_an_unknown_requirement_is_a_mistake_in_the_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
import pytest

@pytest.mark.requires("teraform")
def test_typo():
    pass
""")
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown requirement 'teraform'*"])
