"""Fuzzing the parsers' entry points: whatever the input, a verdict comes back, never a crash.

Besides text shaped like each language, hostile input: integers around and past Python's
4300-digit limit, nesting thousands deep, NUL and lone-surrogate characters, bytes that are
not UTF-8 — through every validator and through ``closedloop check``.
"""

from __future__ import annotations

import json
from typing import Any

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import closedloop as cl
from closedloop.cli import main
from closedloop.validate import (
    HclValidator,
    JsonSchemaValidator,
    MaxSize,
    PydanticValidator,
    PythonSyntax,
    RequiredTags,
    SqlSyntax,
    TerraformPlanValidator,
)
from closedloop.validate._structured import MAX_INT_DIGITS

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)

# Text that looks like the real thing often enough to get past the first character.
json_ish = st.text(alphabet='{}[]":,0123456789.-eE tfnrualse\n\\', max_size=80)
hcl_ish = st.text(alphabet='resource"aws_{}[]=#$.\n ()tag123<>EOF*/\\', max_size=80)
sql_ish = st.text(alphabet="SELECT FROMWHERE*(),;'\"0123456789abc=<>-\n", max_size=80)
python_ish = st.text(alphabet="def():\n \tifreturnx=1'\"\\#[]{}lambda", max_size=80)


def _is_verdict(value: object) -> None:
    assert isinstance(value, cl.Verdict)
    # always serialisable for the store and --json, and storable as UTF-8
    json.dumps(value.to_dict(), ensure_ascii=False).encode("utf-8")


@FUZZ
@given(st.one_of(json_ish, st.text(max_size=60), st.binary(max_size=60)))
def test_json_schema_never_crashes_on_text(text: str | bytes) -> None:
    _is_verdict(JsonSchemaValidator({"type": "object", "required": ["a"]})(text))


@FUZZ
@given(json_values)
def test_json_schema_never_crashes_on_values(doc: Any) -> None:
    _is_verdict(JsonSchemaValidator({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": {"type": "string"}})(doc))


@FUZZ
@given(st.one_of(json_ish, json_values))
def test_pydantic_never_crashes(doc: Any) -> None:
    _is_verdict(PydanticValidator(dict[str, list[int]])(doc))


@FUZZ
@given(st.one_of(python_ish, st.text(max_size=60)))
def test_python_syntax_never_crashes(source: str) -> None:
    _is_verdict(PythonSyntax()(source))


@FUZZ
@given(st.one_of(sql_ish, st.text(max_size=60)), st.sampled_from(["postgres", "sqlite"]))
def test_sql_syntax_never_crashes(sql: str, dialect: str) -> None:
    _is_verdict(SqlSyntax(dialect)(sql))


@FUZZ
@given(st.one_of(hcl_ish, st.text(max_size=60)))
def test_hcl_never_crashes(text: str) -> None:
    _is_verdict(HclValidator([RequiredTags(["Owner"])])(text))


plan_change = st.fixed_dictionaries({
    "address": st.text(max_size=10),
    "type": st.text(max_size=10),
    "change": st.fixed_dictionaries({
        "actions": st.lists(st.sampled_from(["create", "delete", "update", "no-op", "read",
                                             "forget", 3]), max_size=3),
        "after": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), json_values,
                                                      max_size=3)),
    }),
})
stream_message = st.fixed_dictionaries({
    "type": st.sampled_from(["planned_change", "resource_drift", "diagnostic", "version"]),
    "change": st.one_of(json_values, st.fixed_dictionaries({
        "resource": st.one_of(json_values, st.fixed_dictionaries({"addr": st.text()})),
        "action": st.sampled_from(["delete", "replace", "remove", "create", None]),
    })),
    "diagnostic": json_values,
})


@FUZZ
@given(st.one_of(
    json_ish,
    json_values,
    st.fixed_dictionaries({"format_version": st.just("1.2"),
                           "resource_changes": st.one_of(json_values, st.lists(plan_change)),
                           "resource_drift": st.one_of(json_values, st.lists(plan_change))}),
    st.lists(stream_message, max_size=5),
    st.lists(stream_message, max_size=5).map(lambda ms: "\n".join(map(json.dumps, ms))),
))
def test_plan_scan_never_crashes(plan: Any) -> None:
    _is_verdict(TerraformPlanValidator([RequiredTags(["Owner"])])(plan))


# --- hostile input ------------------------------------------------------------------------

HOSTILE = settings(max_examples=60, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

long_number = st.integers(MAX_INT_DIGITS - 2, MAX_INT_DIGITS + 3000).map(lambda n: "9" * n)
deep = st.tuples(st.integers(1, 3000), st.sampled_from(["[]", "{}", "()"])).map(
    lambda d: d[1][0] * d[0] + d[1][1] * d[0])
deep_object = st.integers(1, 3000).map(lambda d: '{"a": ' * d + "1" + "}" * d)
odd_character = st.sampled_from(["\x00", "\ud800", "\udfff", "\ufeff", "\x1b[31m"])
hostile_piece = st.one_of(long_number, deep, deep_object, odd_character)
bad_bytes = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\xf4\x90\x80\x80"])


def _splice(base: str, piece: str, where: float) -> str:
    at = int(len(base) * where)
    return base[:at] + piece + base[at:]


hostile_text = st.builds(_splice, st.one_of(json_ish, sql_ish, python_ish, hcl_ish, st.just("")),
                         hostile_piece, st.floats(0, 1))
hostile_bytes = st.builds(
    lambda text, junk, where: _splice(text, "\x00", where).encode(
        "utf-8", errors="surrogatepass").replace(b"\x00", junk),
    hostile_text, bad_bytes, st.floats(0, 1))
hostile = st.one_of(hostile_text, hostile_bytes)


def _deep_value(depth: int) -> Any:
    value: Any = 1
    for n in range(depth):
        value = [value] if n % 2 else {"a": value}
    return value


hostile_values = st.one_of(
    st.integers(MAX_INT_DIGITS - 2, MAX_INT_DIGITS + 3000).map(lambda n: 10**n),
    st.integers(1, 5000).map(_deep_value),
)

CHECKS: list[Any] = [
    JsonSchemaValidator({"type": "object", "properties": {"a": {"type": "integer",
                                                                "multipleOf": 0.5}}}),
    PydanticValidator(dict[str, list[int]]),
    PythonSyntax(),
    SqlSyntax("postgres"),
    HclValidator([RequiredTags(["Owner"])]),
    TerraformPlanValidator([RequiredTags(["Owner"])]),
    MaxSize(1000),
]


@HOSTILE
@given(hostile, st.sampled_from(CHECKS))
def test_hostile_text_is_a_verdict(proposal: str | bytes, check: Any) -> None:
    _is_verdict(check(proposal))


@HOSTILE
@given(hostile_values, st.sampled_from([c for c in CHECKS if c.name != "python_syntax"]))
def test_hostile_parsed_documents_are_a_verdict(doc: Any, check: Any) -> None:
    _is_verdict(check(doc))


@HOSTILE
@given(hostile, st.sampled_from([["json-schema", "--schema", "SCHEMA"], ["terraform-plan"],
                                 ["sql"], ["python"], ["hcl"]]))
def test_check_cli_answers_hostile_input_with_a_verdict_or_one_line(
        tmp_path_factory: Any, payload: str | bytes, command: list[str]) -> None:
    schema = tmp_path_factory.mktemp("schema") / "s.json"
    schema.write_text('{"type": "object"}')
    data = payload if isinstance(payload, bytes) else payload.encode("utf-8", "surrogatepass")
    args = [str(schema) if a == "SCHEMA" else a for a in command]
    result = CliRunner().invoke(main, ["check", *args, "-", "--json"], input=data)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (0, 1, 2)
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    else:
        assert json.loads(result.stdout)["check"]
