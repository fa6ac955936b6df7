"""Start-up stays light: optional backends are imported only when a name that needs them is used.

Each check runs a fresh interpreter (the modules a process has imported are the behaviour);
the start-up times themselves are measured by ``bench/startup.py``, never here.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

import closedloop
from closedloop import control, telemetry

HEAVY = ("redis", "opentelemetry", "prometheus_client", "boto3", "moto", "jsonschema",
         "sqlglot", "pydantic", "httpx")


def _imported_after(code: str) -> set[str]:
    """The top-level packages of HEAVY that a fresh interpreter holds after running ``code``."""
    loaded = "{m.split('.')[0] for m in sys.modules}"
    probe = f"{code}\nimport sys, json\nprint(json.dumps(sorted({loaded} & {set(HEAVY)!r})))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                         text=True)
    return set(json.loads(out.stdout.splitlines()[-1]))


@pytest.mark.parametrize("code", [
    "import closedloop",
    "import closedloop.control",
    "import closedloop.telemetry",
    "from closedloop import Loop, Verdict, open_store",
    "from closedloop.control import Backpressure, FaultControl, default_fault_control",
])
def test_importing_the_package_imports_no_optional_backend(code: str) -> None:
    assert _imported_after(code) == set()


def test_the_version_imports_no_command_and_no_backend() -> None:
    code = ("import sys\nfrom closedloop.cli import main\n"
            "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            "assert 'closedloop.cli._commands' not in sys.modules, 'commands were imported'\n"
            "assert 'rich' not in sys.modules, 'rich was imported'")
    assert _imported_after(code) == set()


def test_the_help_lists_every_command_without_a_backend() -> None:
    out = subprocess.run([sys.executable, "-m", "closedloop", "--help"], check=True,
                         capture_output=True, text=True).stdout
    for command in ("check", "demo", "replay", "report", "resume", "scores", "serve", "status",
                    "traces"):
        assert f"\n  {command} " in out, command
    assert _imported_after("from closedloop.cli import main\n"
                           "try:\n    main(['--help'])\nexcept SystemExit:\n    pass") == set()


def test_python_dash_m_runs_the_command() -> None:
    out = subprocess.run([sys.executable, "-m", "closedloop", "--version"], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == f"closedloop, version {closedloop.__version__}"


def test_a_backend_is_imported_when_its_name_is_used() -> None:
    assert _imported_after("from closedloop.control import RedisRates") >= {"redis"}
    assert _imported_after("import closedloop.telemetry as t\nt.Metrics") >= {
        "prometheus_client"}


@pytest.mark.parametrize("package", [closedloop, control, telemetry])
def test_every_lazy_name_is_the_member_of_its_module(package: ModuleType) -> None:
    # the names a package re-exports resolve, and to the very object their module defines
    for name in package.__all__:
        value = getattr(package, name)
        module = getattr(value, "__module__", None)
        if isinstance(module, str) and module.startswith("closedloop."):
            assert getattr(importlib.import_module(module), name, value) is value, name


def test_a_missing_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'Lop'"):
        _ = closedloop.Lop  # type: ignore[attr-defined]
    with pytest.raises(AttributeError, match="has no attribute '_private'"):
        _ = control._private  # type: ignore[attr-defined]


def test_a_subpackage_is_reached_by_attribute() -> None:
    code = ("import closedloop\nassert closedloop.validate.__name__ == 'closedloop.validate'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_reading_traces_back_needs_no_opentelemetry() -> None:
    from closedloop.learn import _diff
    from closedloop.telemetry import _span

    assert _diff.STATUS_ERROR == _span.STATUS_ERROR
    assert _imported_after("import closedloop.learn._diff") == set()


def test_the_help_loads_no_printing_library_and_no_loop_layer() -> None:
    # --help imports every command module for its summary line; rich, the validators, the
    # learning layer, the store and the control ledger load only when a command runs
    code = ("import sys\nfrom closedloop.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print([m for m in sys.modules if m.split('.')[0] in ('rich', 'asyncio') or "
            "m in ('closedloop.validate', 'closedloop.learn', 'closedloop.store', "
            "'closedloop.control._ledger', 'closedloop.telemetry')])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True)
    assert json.loads(out.stdout.splitlines()[-1].replace("'", '"')) == []


def test_the_defaults_the_commands_spell_out_are_their_layers_own() -> None:
    # the CLI repeats a few constants so that --help need not import their modules
    from closedloop import learn, validate
    from closedloop.cli import _check, _control, _report
    from closedloop.control import _ledger

    validators: dict[str, Any] = {"terraform-plan": validate.TerraformPlanValidator,
                  "json-schema": validate.JsonSchemaValidator, "python": validate.PythonSyntax,
                  "sql": validate.SqlSyntax, "hcl": validate.HclValidator,
                  "terraform": validate.TerraformCli}
    assert set(validators) == set(_check.check.commands)
    for name, validator in validators.items():
        [max_bytes] = [p for p in _check.check.commands[name].params if p.name == "max_bytes"]
        assert max_bytes.default == validator.DEFAULT_MAX_BYTES, name
    assert _report.DEFAULT_TOP_ERRORS == learn.DEFAULT_TOP_ERRORS
    assert _report.DEFAULT_TOP_MESSAGES == learn.DEFAULT_TOP_MESSAGES
    assert _control._REDIS_ENV == _ledger.REDIS_ENV
