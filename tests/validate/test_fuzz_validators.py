"""Fuzzing the parsers' entry points: whatever the input, a verdict comes back, never a crash."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import closedloop as cl
from closedloop.validate import (
    HclValidator,
    JsonSchemaValidator,
    PydanticValidator,
    PythonSyntax,
    RequiredTags,
    SqlSyntax,
    TerraformPlanValidator,
)

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
    json.dumps(value.to_dict())  # always serialisable for the store and --json


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
