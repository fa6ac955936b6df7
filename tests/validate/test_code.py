"""Python syntax, ruff lint and SQL syntax checks: true positives and negatives."""

from __future__ import annotations

import pytest

import closedloop as cl
from closedloop.validate import PythonSyntax, RuffLint, SqlSyntax

needs_ruff = pytest.mark.requires("ruff")


def test_valid_python_passes() -> None:
    assert PythonSyntax()("def f(x):\n    return x + 1\n").passed


def test_python_syntax_error_is_located() -> None:
    (issue,) = PythonSyntax()("def f(x):\n    return (x +\n").issues
    assert issue.code == "python_syntax"
    assert issue.location is not None
    assert issue.location.startswith("line 2")


def test_compile_time_errors_are_caught_not_just_parse_errors() -> None:
    (issue,) = PythonSyntax()("return 1\n").issues
    assert "'return' outside function" in issue.message


def test_indentation_errors_name_their_kind() -> None:
    (issue,) = PythonSyntax()("if True:\nx = 1\n").issues
    assert issue.message.startswith("IndentationError")


def test_null_bytes_are_an_issue_not_a_crash() -> None:
    assert not PythonSyntax()("x = 1\0").passed


def test_compiler_warnings_are_warnings() -> None:
    verdict = PythonSyntax()("x = '\\d'\n")
    assert verdict.passed
    assert [i.code for i in verdict.issues] == ["python_warning"]


def test_proposal_that_is_not_text_fails() -> None:
    assert [i.code for i in PythonSyntax()(42).issues] == ["not_text"]


@needs_ruff
def test_ruff_reports_selected_rules_with_location() -> None:
    verdict = RuffLint(select=["F"])("import os\n\nx = undefined_name\n")
    assert {(i.code, i.location) for i in verdict.issues} == {
        ("ruff_F401", "line 1, column 8"),
        ("ruff_F821", "line 3, column 5"),
    }


@needs_ruff
def test_ruff_clean_code_passes() -> None:
    assert RuffLint(select=["F", "E"])("import os\n\nprint(os.sep)\n").passed


@needs_ruff
def test_ruff_ignored_rules_are_not_reported() -> None:
    assert RuffLint(select=["F"], ignore=["F401"])("import os\n").passed


@needs_ruff
def test_ruff_findings_can_be_warnings() -> None:
    verdict = RuffLint(select=["F"], severity=cl.Severity.WARNING)("import os\n")
    assert verdict.passed
    assert [i.code for i in verdict.issues] == ["ruff_F401"]


@needs_ruff
def test_ruff_syntax_errors_always_block() -> None:
    verdict = RuffLint(select=["F"], severity=cl.Severity.WARNING)("def f(:\n")
    assert not verdict.passed
    assert {i.code for i in verdict.issues} == {"python_syntax"}


def test_an_explicit_binary_that_does_not_exist_raises() -> None:
    with pytest.raises(FileNotFoundError):
        RuffLint(binary="/nonexistent/ruff")("x = 1\n")


def test_missing_ruff_is_a_recorded_skip_or_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr("closedloop.validate._code._ruff_binary", lambda: None)
    skipped = RuffLint()("x = 1\n")
    assert skipped.passed
    assert [i.code for i in skipped.issues] == ["skipped"]
    unknown = RuffLint(if_missing="unknown")("x = 1\n")
    assert not unknown.passed
    assert unknown.unknown is not None
    assert "ruff not found" in unknown.unknown


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, name FROM users WHERE id = 1",
        "INSERT INTO t (a, b) VALUES (1, 'x')",
        "UPDATE t SET a = 1 WHERE id = 2; DELETE FROM t WHERE id = 3",
        "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)",
    ],
)
def test_valid_sql_passes(dialect: str, sql: str) -> None:
    assert SqlSyntax(dialect)(sql).passed


@pytest.mark.parametrize("dialect", ["postgres", "sqlite"])
@pytest.mark.parametrize(
    ("sql", "location"),
    [
        ("SELEC * FROM t", "line 1, column 12"),
        ("SELECT * FROM", "line 1, column 13"),
        ("SELECT a FROM t\nWHERE", "line 2, column 5"),
        ("SELECT (1", "line 1, column 9"),
    ],
)
def test_sql_syntax_errors_are_located(dialect: str, sql: str, location: str) -> None:
    issues = SqlSyntax(dialect)(sql).issues
    assert issues
    assert issues[0].code == "sql_syntax"
    assert issues[0].location == location


def test_postgres_only_syntax_is_dialect_specific() -> None:
    sql = "SELECT * FROM t WHERE tags @> ARRAY['a']"
    assert SqlSyntax("postgres")(sql).passed


def test_unterminated_string_is_an_issue() -> None:
    assert [i.code for i in SqlSyntax()("SELECT 'abc").issues] == ["sql_syntax"]


def test_empty_sql_fails() -> None:
    assert [i.code for i in SqlSyntax()("  -- nothing\n").issues] == ["sql_empty"]


@pytest.mark.parametrize(
    "sql",
    ["DROP TABLE users", "TRUNCATE TABLE users", "DELETE FROM users", "UPDATE users SET a = 1"],
)
def test_destructive_sql_is_critical(sql: str) -> None:
    verdict = SqlSyntax()(sql)
    assert verdict.critical
    assert [i.code for i in verdict.issues] == ["sql_destructive"]


def test_destructive_sql_can_be_allowed() -> None:
    assert SqlSyntax(forbid_destructive=False)("DROP TABLE users").passed


def test_unknown_dialect_is_a_config_error() -> None:
    with pytest.raises(cl.ConfigError, match="unknown SQL dialect"):
        SqlSyntax("no-such-sql")
