"""``closedloop check …``: readable verdicts or JSON, exit 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from closedloop.cli import main

DATA = Path(__file__).parent.parent / "data" / "terraform"


def run(*args: str, stdin: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["check", *args], input=stdin)
    return result.exit_code, result.stdout, result.stderr


def test_destructive_plan_exits_1_with_a_readable_verdict() -> None:
    code, out, _ = run("terraform-plan", str(DATA / "delete.json"))
    assert code == 1
    assert out.splitlines()[0] == "FAIL terraform_plan"
    assert "[critical] tf_delete at random_pet.example" in out


def test_safe_plan_exits_0() -> None:
    code, out, _ = run("terraform-plan", str(DATA / "update.json"))
    assert (code, out) == (0, "PASS terraform_plan\n")


def test_plan_from_stdin_in_the_streaming_format() -> None:
    line = {"type": "planned_change",
            "change": {"resource": {"addr": "aws_instance.web"}, "action": "replace"}}
    code, out, _ = run("terraform-plan", "-", "--json", stdin=json.dumps(line) + "\n")
    assert code == 1
    assert json.loads(out)["issues"][0]["code"] == "tf_replace"


def test_allow_destroy_turns_the_exit_to_0() -> None:
    code, _, _ = run("terraform-plan", str(DATA / "delete.json"), "--allow-destroy", "random_*")
    assert code == 0


def test_json_output_is_the_verdict() -> None:
    code, out, _ = run("terraform-plan", str(DATA / "sensitive-replace.json"), "--json")
    doc = json.loads(out)
    assert (code, doc["check"], doc["passed"]) == (1, "terraform_plan", False)
    assert "hxk5iA==" not in out


def test_malformed_plan_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    code, out, err = run("terraform-plan", str(bad))
    assert (code, out) == (2, "")
    assert err.startswith("error: ") and "line 1 is not JSON" in err
    assert "Traceback" not in err


def test_unreadable_file_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run("python", str(tmp_path / "missing.py"))
    assert code == 2
    assert err == f"error: cannot read {tmp_path / 'missing.py'}: No such file or directory\n"


def test_json_schema_document_checked(tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object", "required": ["name"]}')
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text('{"name": "x"}')
    bad.write_text("{}")
    assert run("json-schema", "--schema", str(schema), str(good))[0] == 0
    code, out, _ = run("json-schema", "--schema", str(schema), str(bad))
    assert code == 1
    assert "schema_required" in out


def test_malformed_document_is_a_located_finding(tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    code, out, _ = run("json-schema", "--schema", str(schema), "-", stdin='{\n "a": }')
    assert code == 1
    assert "json_syntax at line 2, column 7" in out


def test_malformed_schema_is_a_usage_error(tmp_path: Path) -> None:
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "nope"}')
    code, _, err = run("json-schema", "--schema", str(schema), "-", stdin="{}")
    assert code == 2
    assert "invalid JSON Schema" in err


def test_python_syntax_error_exits_1(tmp_path: Path) -> None:
    src = tmp_path / "bad.py"
    src.write_text("def f(:\n")
    code, out, _ = run("python", str(src))
    assert code == 1
    assert "python_syntax at line 1" in out


@pytest.mark.requires("ruff")
def test_python_lint_findings_exit_1(tmp_path: Path) -> None:
    src = tmp_path / "lint.py"
    src.write_text("import os\n")
    assert run("python", str(src))[0] == 0
    code, out, _ = run("python", str(src), "--lint", "--select", "F")
    assert code == 1
    assert "ruff_F401" in out


def test_sql_dialect_and_destructive_statements(tmp_path: Path) -> None:
    q = tmp_path / "q.sql"
    q.write_text("SELECT 1;\nDROP TABLE users;\n")
    code, out, _ = run("sql", "--dialect", "sqlite", str(q))
    assert code == 1
    assert "sql_destructive" in out
    assert run("sql", "--dialect", "sqlite", "--allow-destructive", str(q))[0] == 0


def test_unknown_sql_dialect_is_a_usage_error() -> None:
    assert run("sql", "--dialect", "nosuch", "-", stdin="SELECT 1")[0] == 2


def test_hcl_policy_options(tmp_path: Path) -> None:
    tf = tmp_path / "main.tf"
    tf.write_text('resource "aws_instance" "w" {\n  instance_type = "m5.large"\n}\n')
    code, out, _ = run("hcl", str(tf), "--require-tag", "Owner",
                       "--allow-instance-type", "t3.micro")
    assert code == 1
    assert "tf_missing_tag at aws_instance.w" in out
    assert "tf_instance_type at aws_instance.w" in out


def test_hcl_syntax_error_names_the_file(tmp_path: Path) -> None:
    tf = tmp_path / "net.tf"
    tf.write_text('resource "a" "b" {\n')
    code, out, _ = run("hcl", str(tf))
    assert code == 1
    assert "hcl_syntax at net.tf:line" in out


@pytest.mark.requires("terraform")
def test_terraform_validate_from_the_shell(tmp_path: Path) -> None:
    tf = tmp_path / "main.tf"
    tf.write_text('resource "terraform_data" "x" {\n  inputt = 1\n}\n')
    code, out, _ = run("terraform", str(tf))
    assert code == 1
    assert "tf_diagnostic at main.tf:line 2" in out


def test_terraform_without_a_binary_skips_unless_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    tf = tmp_path / "main.tf"
    tf.write_text('resource "terraform_data" "x" {}\n')
    code, out, _ = run("terraform", str(tf))
    assert code == 0
    assert "skipped" in out
    code, out, _ = run("terraform", str(tf), "--require-binary")
    assert code == 1
    assert out.startswith("UNKNOWN terraform")
