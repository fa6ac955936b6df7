"""``closedloop check`` on inputs that used to break it: every one a verdict (exit 0/1) or one
line on stderr with exit 2, read with a bound whatever the input is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from closedloop.cli import main
from closedloop.validate import (
    HclValidator,
    JsonSchemaValidator,
    PythonSyntax,
    SqlSyntax,
    TerraformPlanValidator,
)

HUGE = "9" * 5000
PLAN = '{"format_version": "1.2", "planned_values": {}, "resource_changes": []}'


def run(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["check", *args], input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is never an answer
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def schema(tmp_path: Path) -> str:
    path = tmp_path / "schema.json"
    path.write_text('{"type": "object"}')
    return str(path)


def commands(schema: str) -> dict[str, list[str]]:
    return {"sql": ["sql"], "python": ["python"], "hcl": ["hcl"],
            "json-schema": ["json-schema", "--schema", schema],
            "terraform-plan": ["terraform-plan"]}


CAPS = {"sql": SqlSyntax.DEFAULT_MAX_BYTES, "python": PythonSyntax.DEFAULT_MAX_BYTES,
        "hcl": HclValidator.DEFAULT_MAX_BYTES,
        "json-schema": JsonSchemaValidator.DEFAULT_MAX_BYTES,
        "terraform-plan": TerraformPlanValidator.DEFAULT_MAX_BYTES}


@pytest.mark.parametrize("command", sorted(CAPS))
def test_a_device_is_read_only_up_to_the_cap(command: str, schema: str) -> None:
    code, out, err = run(*commands(schema)[command], "/dev/zero", "--json")
    (issue,) = json.loads(out)["issues"]
    assert (code, err, issue["code"]) == (1, "", "too_large")
    assert issue["location"] == "/dev/zero"
    assert f"over {CAPS[command]}-byte limit" in issue["message"]


@pytest.mark.parametrize("command", sorted(CAPS))
def test_stdin_over_the_cap_fails_as_too_large(command: str, schema: str) -> None:
    code, out, _ = run(*commands(schema)[command], "-", "--max-bytes", "100",
                       stdin=b"1" * 101)
    assert code == 1
    assert "too_large at -: input too large (over 100-byte limit)" in out


def test_a_file_over_the_cap_names_its_size_and_how_to_raise_the_cap(tmp_path: Path) -> None:
    big = tmp_path / "big.sql"
    big.write_text("SELECT 1;\n" * 30_000)
    code, out, _ = run("sql", str(big))
    assert code == 1
    assert (f"input too large (300000 bytes > {SqlSyntax.DEFAULT_MAX_BYTES}-byte limit); "
            "raise the limit "
            "with --max-bytes") in out
    assert run("sql", str(big), "--max-bytes", "300000")[0] == 0


def test_a_directory_is_a_usage_error(tmp_path: Path) -> None:
    code, out, err = run("python", str(tmp_path))
    assert (code, out) == (2, "")
    assert err == f"error: cannot read {tmp_path}: Is a directory\n"


def test_python_that_is_not_utf8_is_a_finding_not_a_crash(tmp_path: Path) -> None:
    source = tmp_path / "bad.py"
    source.write_bytes(b"x = '\xff'\n")
    code, out, _ = run("python", str(source))
    assert code == 1
    assert "not_utf8 at byte 5" in out


def test_sql_with_a_nul_character_fails(tmp_path: Path) -> None:
    query = tmp_path / "q.sql"
    query.write_bytes(b"SELECT 1;\x00")
    code, out, _ = run("sql", str(query))
    assert (code, "nul_character at line 1, column 10" in out) == (1, True)


def test_a_json_document_with_a_huge_integer_fails_with_its_location(schema: str) -> None:
    code, out, err = run("json-schema", "--schema", schema, "-", stdin=b'{"a": ' + HUGE.encode()
                         + b"}")
    assert (code, err) == (1, "")
    assert "json_number at line 1, column 7" in out


def test_a_json_document_nested_too_deeply_fails(schema: str) -> None:
    code, out, _ = run("json-schema", "--schema", schema, "-",
                       stdin=b"[" * 100_000 + b"]" * 100_000)
    assert (code, "json_depth" in out) == (1, True)


@pytest.mark.parametrize("content", ['{"type": ' + HUGE + "}", "[" * 100_000, '{"type": "obj'])
def test_an_unusable_schema_file_is_one_usage_line(tmp_path: Path, content: str) -> None:
    path = tmp_path / "schema.json"
    path.write_text(content)
    code, out, err = run("json-schema", "--schema", str(path), "-", stdin=b"{}")
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {path}: not usable JSON") and err.count("\n") == 1


@pytest.mark.parametrize("doc", ["{}", '{"type": "x"}', '{"format_version": "1.2"}',
                                 '{"hello": "world"}', "[]", '[{"type": "log"}]',
                                 '{"resource_changes": {}}'])
def test_json_that_is_not_a_terraform_plan_is_a_usage_error(tmp_path: Path, doc: str) -> None:
    path = tmp_path / "plan.json"
    path.write_text(doc)
    code, out, err = run("terraform-plan", str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"error: {path}: ") and err.count("\n") == 1


def test_a_plan_with_a_huge_integer_is_a_usage_error() -> None:
    code, out, err = run("terraform-plan", "-", stdin=PLAN[:-1].encode() + b', "n": '
                         + HUGE.encode() + b"}")
    assert (code, out) == (2, "")
    assert err == "error: -: plan JSON holds a number longer than 4300 digits\n"


def test_an_empty_show_json_plan_still_passes() -> None:
    assert run("terraform-plan", "-", stdin=PLAN.encode()) == (0, "PASS terraform_plan\n", "")


def test_an_endless_pipe_is_cut_at_the_cap_in_a_real_process() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    with open("/dev/zero", "rb") as zero:  # a device, as the process's stdin
        proc = subprocess.run(
            [sys.executable, "-c", "from closedloop.cli import main; main()",
             "check", "sql", "-", "--json"],
            stdin=zero, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["issues"][0]["code"] == "too_large"
