"""JSON Schema, Pydantic, JSON parse errors and size limits: true positives and negatives."""

from __future__ import annotations

import json

import pydantic
import pytest

import closedloop as cl
from closedloop.validate import JsonSchemaValidator, MaxSize, PydanticValidator, parse_json

SCHEMA = {
    "type": "object",
    "required": ["instance_type", "count"],
    "properties": {
        "instance_type": {"type": "string", "enum": ["t3.micro", "t3.small"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 10},
        "owner": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}


def test_valid_document_passes() -> None:
    verdict = JsonSchemaValidator(SCHEMA)({"instance_type": "t3.micro", "count": 2})
    assert verdict.passed
    assert verdict.issues == ()


def test_valid_json_text_passes() -> None:
    assert JsonSchemaValidator(SCHEMA)('{"instance_type": "t3.small", "count": 10}').passed


def test_every_violation_is_reported_with_its_json_path() -> None:
    verdict = JsonSchemaValidator(SCHEMA)(
        {"instance_type": "m5.large", "count": 0, "tags": ["a", 3], "extra": 1}
    )
    assert not verdict.passed
    found = {(i.code, i.location) for i in verdict.issues}
    assert found == {
        ("schema_enum", "$.instance_type"),
        ("schema_minimum", "$.count"),
        ("schema_type", "$.tags[1]"),
        ("schema_additionalProperties", "$"),
    }


def test_missing_required_property_is_reported() -> None:
    verdict = JsonSchemaValidator(SCHEMA)({"count": 1})
    assert [i.code for i in verdict.issues] == ["schema_required"]
    assert "instance_type" in verdict.issues[0].message


def test_formats_are_checked_by_default() -> None:
    doc = {"instance_type": "t3.micro", "count": 1, "owner": "not-an-email"}
    assert [i.code for i in JsonSchemaValidator(SCHEMA)(doc).issues] == ["schema_format"]
    assert JsonSchemaValidator(SCHEMA, check_formats=False)(doc).passed


def test_draft_2020_12_is_the_default() -> None:
    schema = {"type": "array", "prefixItems": [{"type": "integer"}], "items": False}
    check = JsonSchemaValidator(schema)
    assert check([1]).passed
    assert not check([1, 2]).passed


def test_malformed_json_is_located_by_line_and_column() -> None:
    verdict = JsonSchemaValidator(SCHEMA)('{\n  "count": 1,\n  "instance_type": t3\n}')
    (issue,) = verdict.issues
    assert issue.code == "json_syntax"
    assert issue.location == "line 3, column 20"


def test_malformed_json_in_bytes_is_located() -> None:
    _, issue = parse_json(b'{"a": [1, 2,]}')
    assert issue is not None
    assert issue.location == "line 1, column 13"


def test_invalid_schema_is_a_config_error_at_construction() -> None:
    with pytest.raises(cl.ConfigError, match="invalid JSON Schema"):
        JsonSchemaValidator({"type": "not-a-type"})


def test_oversized_text_fails_before_parsing() -> None:
    verdict = JsonSchemaValidator(SCHEMA, max_bytes=10)('{"count": 1, "instance_type": "t3.micro"}')
    assert [i.code for i in verdict.issues] == ["too_large"]


def test_max_size_counts_utf8_bytes() -> None:
    check = MaxSize(4)
    assert check("abcd").passed
    assert not check("abcé").passed  # 5 bytes in UTF-8


def test_max_size_measures_structured_output_as_compact_json() -> None:
    doc = {"a": "x" * 10}
    assert MaxSize(len(json.dumps(doc, separators=(",", ":"))))(doc).passed
    assert not MaxSize(10)(doc).passed


def test_max_size_rejects_a_nonpositive_limit() -> None:
    with pytest.raises(cl.ConfigError):
        MaxSize(0)


class Server(pydantic.BaseModel):
    name: str
    cpus: int = pydantic.Field(gt=0)
    ports: list[int] = []


def test_pydantic_valid_model_passes() -> None:
    assert PydanticValidator(Server)('{"name": "web", "cpus": 2, "ports": [80]}').passed


def test_pydantic_errors_are_located_and_do_not_echo_input() -> None:
    verdict = PydanticValidator(Server)({"name": "web", "cpus": -1, "ports": [80, "secret-x"]})
    found = {(i.code, i.location) for i in verdict.issues}
    assert found == {("pydantic_greater_than", "$.cpus"), ("pydantic_int_parsing", "$.ports[1]")}
    assert "secret-x" not in json.dumps(verdict.to_dict())


def test_pydantic_malformed_json_is_located() -> None:
    (issue,) = PydanticValidator(Server)('{"name": "web",\n "cpus": }').issues
    assert (issue.code, issue.location) == ("json_syntax", "line 2, column 10")


def test_pydantic_accepts_plain_types() -> None:
    check = PydanticValidator(list[int])
    assert check("[1, 2]").passed
    assert check.name == "pydantic:list"
    assert not check('["a"]').passed


def test_schema_validator_rerenders_as_model_feedback() -> None:
    verdict = JsonSchemaValidator(SCHEMA)({"instance_type": "t3.micro"})
    feedback = cl.render_feedback([verdict])
    assert "json_schema: [error] schema_required at $: 'count' is a required property" in feedback
