"""No input breaks a check: size caps, huge integers, deep nesting, bad UTF-8 and NUL
characters each give a verdict, and inside a loop an issue fed back to the model."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import closedloop as cl
from closedloop.validate import (
    HclValidator,
    JsonSchemaValidator,
    MaxSize,
    PlanFormatError,
    PydanticValidator,
    PythonSyntax,
    RuffLint,
    SqlSyntax,
    TerraformPlanValidator,
    load_plan,
    parse_json,
)

HUGE = "9" * 5000  # over Python's 4300-digit conversion limit

TEXT_CHECKS: dict[str, Callable[[int | None], Callable[[object], cl.Verdict]]] = {
    "python": lambda cap: PythonSyntax(max_bytes=cap),
    "sql": lambda cap: SqlSyntax(max_bytes=cap),
    "hcl": lambda cap: HclValidator(max_bytes=cap),
    "json_schema": lambda cap: JsonSchemaValidator({"type": "object"}, max_bytes=cap),
    "pydantic": lambda cap: PydanticValidator(dict[str, int], max_bytes=cap),
    "terraform_plan": lambda cap: TerraformPlanValidator(max_bytes=cap),
    "ruff": lambda cap: RuffLint(max_bytes=cap),
}
VALID = {"python": "x = 1\n", "sql": "SELECT 1", "hcl": 'locals {\n  a = 1\n}\n',
         "json_schema": '{"a": 1}', "pydantic": '{"a": 1}',
         "terraform_plan": '{"format_version": "1.2", "planned_values": {}}',
         "ruff": "x = 1\n"}


def where(issue: cl.Issue) -> str | None:
    """An issue's location without the file name HclValidator puts first."""
    return issue.location.removeprefix("main.tf:") if issue.location else None


def deep_list(depth: int) -> list[Any]:
    doc: list[Any] = []
    for _ in range(depth):
        doc = [doc]
    return doc


@pytest.fixture
def int_digits_limit() -> Iterator[Callable[[int], None]]:
    """Set sys.set_int_max_str_digits for one test, restored afterwards."""
    before = sys.get_int_max_str_digits()
    yield sys.set_int_max_str_digits
    sys.set_int_max_str_digits(before)


# --- the size cap -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(TEXT_CHECKS))
def test_a_proposal_over_the_cap_is_a_too_large_issue_naming_both_sizes(kind: str) -> None:
    check = TEXT_CHECKS[kind](10)
    text = VALID[kind] + " " * 20
    for proposal in (text, text.encode()):
        (issue,) = check(proposal).issues
        assert issue.code == "too_large"
        assert f"({len(text)} bytes > 10-byte limit)" in issue.message


@pytest.mark.parametrize("kind", sorted(TEXT_CHECKS))
def test_a_proposal_at_the_cap_is_checked(kind: str) -> None:
    text = VALID[kind]
    assert TEXT_CHECKS[kind](len(text.encode()))(text).passed


def test_the_cap_counts_utf8_bytes_not_characters() -> None:
    (issue,) = PythonSyntax(max_bytes=8)("x = 'é'\n").issues  # 8 characters, 9 bytes
    assert "(9 bytes > 8-byte limit)" in issue.message


@pytest.mark.parametrize("check", [PythonSyntax(), SqlSyntax(), HclValidator(),
                                   JsonSchemaValidator({}), PydanticValidator(int),
                                   TerraformPlanValidator(), RuffLint()],
                         ids=lambda c: type(c).__name__)
def test_every_parser_has_a_cap_by_default(check: Any) -> None:
    assert check.max_bytes == type(check).DEFAULT_MAX_BYTES <= 8 * 1024 * 1024
    (issue,) = check(b" " * (check.max_bytes + 1)).issues
    assert issue.code == "too_large"


def test_the_cap_can_be_lifted_with_none() -> None:
    big = " " * (JsonSchemaValidator.DEFAULT_MAX_BYTES + 1) + "1"
    assert JsonSchemaValidator({}, max_bytes=None)(big).passed


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_a_nonsense_cap_is_a_config_error(bad: Any) -> None:
    with pytest.raises(cl.ConfigError):
        SqlSyntax(max_bytes=bad)


def test_hcl_caps_the_whole_module_not_each_file() -> None:
    files = {"a.tf": 'locals {\n  a = 1\n}\n', "b.tf": 'locals {\n  b = 1\n}\n'}
    assert HclValidator(max_bytes=len(files["a.tf"]))(files).issues[0].code == "too_large"


# --- text that is not text ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["python", "sql", "hcl", "ruff"])
def test_bytes_that_are_not_utf8_are_an_issue_with_their_offset(kind: str) -> None:
    (issue,) = TEXT_CHECKS[kind](None)(b"x = '\xff'\n").issues
    assert (issue.code, where(issue)) == ("not_utf8", "byte 5")
    assert "0xff" in issue.message


@pytest.mark.parametrize("kind", ["python", "sql", "hcl", "ruff"])
def test_a_lone_surrogate_is_an_issue_not_an_encoding_crash(kind: str) -> None:
    (issue,) = TEXT_CHECKS[kind](None)("x = 1\ny = '\ud800'\n").issues
    assert (issue.code, where(issue)) == ("not_utf8", "line 2, column 6")


@pytest.mark.parametrize("kind", ["python", "sql", "hcl", "ruff"])
def test_a_nul_character_is_located(kind: str) -> None:
    (issue,) = TEXT_CHECKS[kind](None)("x = 1\nSELECT\x00 1\n").issues
    assert (issue.code, where(issue)) == ("nul_character", "line 2, column 7")


def test_python_source_may_start_with_a_utf8_bom_as_files_may() -> None:
    assert PythonSyntax()(b"\xef\xbb\xbfx = 1\n").passed


def test_hcl_names_the_file_that_is_not_utf8() -> None:
    files = {"a.tf": b'locals {\n  a = 1\n}\n', "b.tf": b"\xc3("}
    (issue,) = HclValidator()(files).issues
    assert (issue.code, issue.location) == ("not_utf8", "b.tf:byte 0")


# --- JSON: numbers and nesting ------------------------------------------------------------


def test_a_json_integer_over_4300_digits_is_a_located_issue() -> None:
    _, issue = parse_json('{"a": 1,\n "b": ' + HUGE + "}")
    assert issue is not None
    assert (issue.code, issue.location) == ("json_number", "line 2, column 7")


def test_huge_integers_are_refused_whatever_the_interpreter_limit(
        int_digits_limit: Callable[[int], None]) -> None:
    int_digits_limit(0)  # unlimited: the parser itself would take quadratic time
    assert [i.code for i in JsonSchemaValidator({})("9" * 200_000).issues] == ["json_number"]


def test_a_lower_interpreter_limit_is_an_issue_not_a_crash(
        int_digits_limit: Callable[[int], None]) -> None:
    int_digits_limit(640)
    assert [i.code for i in JsonSchemaValidator({})("9" * 1000).issues] == ["json_number"]


def test_a_4300_digit_integer_is_still_a_number() -> None:
    assert JsonSchemaValidator({"type": "integer"})("9" * 4300).passed


@pytest.mark.parametrize("check", [JsonSchemaValidator({"type": "array"}),
                                   PydanticValidator(list[Any])])
def test_json_nested_too_deeply_to_parse_is_an_issue(check: Callable[[object], cl.Verdict],
                                                     ) -> None:
    (issue,) = check("[" * 100_000 + "]" * 100_000).issues
    assert issue.code == "json_depth"


def test_a_parsed_document_too_deep_to_walk_is_an_issue() -> None:
    schema = {"type": "array", "items": {"$ref": "#"}}
    (issue,) = JsonSchemaValidator(schema)(deep_list(5000)).issues
    assert issue.code == "json_depth"


def test_a_huge_integer_against_a_float_bound_is_an_issue() -> None:
    (issue,) = JsonSchemaValidator({"multipleOf": 0.1})(10**5000).issues
    assert issue.code == "json_number"


def test_max_size_of_unprintable_documents_is_an_issue() -> None:
    assert [i.code for i in MaxSize(10)(10**5000).issues] == ["json_number"]
    assert [i.code for i in MaxSize(10)(deep_list(5000)).issues] == ["json_depth"]


def test_bytes_json_that_is_not_utf8_is_an_issue() -> None:
    (issue,) = JsonSchemaValidator({})(b'{"a": "\xff"}').issues
    assert issue.code == "json_syntax"


# --- Terraform plans ----------------------------------------------------------------------


@pytest.mark.parametrize("text", ['{"a": ' + HUGE + "}",
                                  '{"type": "version", "n": ' + HUGE + "}",
                                  "[" * 100_000 + "]" * 100_000,
                                  b'{"format_version": "\xff"}',
                                  '{"type": "version"}\n{"n": ' + HUGE + "}\n"])
def test_unparseable_plans_are_a_format_error(text: str | bytes) -> None:
    with pytest.raises(PlanFormatError):
        load_plan(text)
    assert [i.code for i in TerraformPlanValidator()(text).issues] == ["plan_format"]


@pytest.mark.parametrize("doc", [{}, {"type": "something"}, {"format_version": "1.2"},
                                 {"resource_changes": "all of them"},
                                 [{"type": "log"}], [{"change": {}}], []])
def test_json_that_is_not_a_terraform_plan_is_a_format_error(doc: Any) -> None:
    with pytest.raises(PlanFormatError, match=r'not a Terraform|no "type"'):
        load_plan(json.dumps(doc))
    with pytest.raises(PlanFormatError):
        load_plan(doc)


def test_a_parsed_plan_with_unprintable_values_is_still_scanned() -> None:
    plan = {"resource_changes": [{"address": 10**5000, "deposed": 10**5000,
                                  "change": {"actions": ["delete"]}}]}
    (issue,) = TerraformPlanValidator()(plan).issues
    assert (issue.code, issue.location) == ("tf_delete", "<16610-bit integer>")


# --- inside a loop: issues fed back, never a crashed validator ----------------------------


@pytest.mark.parametrize(("validator", "bad", "good"), [
    (JsonSchemaValidator({"type": "object"}), '{"id": ' + HUGE + "}", '{"id": "' + HUGE + '"}'),
    (JsonSchemaValidator({"type": "array"}), "[" * 50_000 + "]" * 50_000, "[[]]"),
    (SqlSyntax(), b"SELECT '\xff'", b"SELECT 1"),
    (PythonSyntax(), "x = 1\x00", "x = 1"),
    (SqlSyntax(max_bytes=100), "SELECT " + "1, " * 100 + "1", "SELECT 1"),
    (TerraformPlanValidator(), '{"format_version": "1.2", "n": ' + HUGE + "}",
     '{"format_version": "1.2", "planned_values": {}}'),
    (JsonSchemaValidator({"properties": {"n": {"multipleOf": 0.5}}}), {"n": 10**5000},
     {"n": 1}),
    (JsonSchemaValidator({"items": {"$ref": "#"}}), deep_list(5000), [[]]),
], ids=["huge-int", "deep", "not-utf8", "nul", "too-large", "plan-huge-int", "parsed-huge-int",
        "parsed-deep"])
def test_a_breaking_proposal_is_fed_back_to_the_model(memory_store: cl.Store, validator: Any,
                                                      bad: object, good: object) -> None:
    feedback: list[str | None] = []

    def agent(task: str, attempt: cl.Attempt) -> object:
        feedback.append(attempt.feedback)
        return bad if attempt.number == 1 else good

    result = cl.Loop(agent, task_type="bounds", store=memory_store, validators=[validator],
                     max_attempts=2).run("go")
    assert result.outcome is cl.Outcome.SUCCEEDED
    assert result.attempts == 2
    assert feedback[1] is not None
    assert validator.name in feedback[1]
