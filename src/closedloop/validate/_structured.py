"""Structured output: JSON parse errors by line and column, JSON Schema, Pydantic, size limits."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from closedloop._errors import ConfigError
from closedloop._verdict import Issue, Verdict
from closedloop.validate._base import as_text, clip, require

MAX_ISSUES = 20
"""At most this many issues per verdict: more would drown the model's re-ask feedback."""


def json_path(parts: Iterable[object]) -> str:
    """``("a", 0, "b")`` → ``$.a[0].b``, the location format of every structured check."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            out += f".{text}" if text.isidentifier() else f"[{json.dumps(text)}]"
    return out


def parse_json(text: str | bytes) -> tuple[Any, Issue | None]:
    """Parse JSON text; on failure, an issue located by line and column (1-based)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, Issue(
            code="json_syntax",
            location=f"line {exc.lineno}, column {exc.colno}",
            message=f"invalid JSON: {exc.msg}; return one valid JSON document and nothing else",
        )
    except (UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not UTF-8 text"
        return None, Issue(code="json_syntax", message=f"invalid JSON: {reason}")


def _size(proposal: object) -> int:
    if isinstance(proposal, bytes | bytearray):
        return len(proposal)
    if isinstance(proposal, str):
        return len(proposal.encode("utf-8", errors="replace"))
    return len(json.dumps(proposal, default=str, separators=(",", ":")).encode())


def _size_issue(size: int, max_bytes: int) -> Issue:
    return Issue(
        code="too_large",
        message=f"output is {size} bytes, over the limit of {max_bytes} bytes; make it shorter",
    )


class MaxSize:
    """Fails a proposal larger than ``max_bytes`` (UTF-8 text, or its compact JSON form)."""

    def __init__(self, max_bytes: int, *, name: str = "max_size") -> None:
        if max_bytes < 1:
            raise ConfigError(f"max_bytes must be ≥ 1, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.name = name

    def __call__(self, proposal: object) -> Verdict:
        size = _size(proposal)
        if size > self.max_bytes:
            return Verdict.fail(_size_issue(size, self.max_bytes), check=self.name)
        return Verdict.ok(check=self.name)


def _load(proposal: object, max_bytes: int | None) -> tuple[Any, Issue | None]:
    """Text is size-checked then parsed; anything else is taken as an already-parsed document."""
    text = as_text(proposal) if isinstance(proposal, bytes | bytearray) else proposal
    if not isinstance(text, str):
        return proposal, None
    if max_bytes is not None and (size := _size(text)) > max_bytes:
        return None, _size_issue(size, max_bytes)
    return parse_json(text)


class JsonSchemaValidator:
    """Validates a JSON document (text or parsed) against a JSON Schema.

    Draft 2020-12 unless the schema names another with ``$schema``. The schema itself is
    checked once, here, so a broken schema is a :class:`~closedloop.ConfigError` at start-up
    rather than a failure on every proposal. Every violation is reported (up to
    :data:`MAX_ISSUES`), located by JSON path (``$.items[0].name``).
    """

    def __init__(
        self,
        schema: Mapping[str, Any] | bool,
        *,
        max_bytes: int | None = None,
        check_formats: bool = True,
        name: str = "json_schema",
    ) -> None:
        jsonschema = require("jsonschema")
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            where = json_path(exc.path)
            raise ConfigError(f"invalid JSON Schema at {where}: {clip(exc.message)}") from exc
        checker = cls.FORMAT_CHECKER if check_formats else None
        self._validator = cls(schema, format_checker=checker)
        self.schema = schema
        self.max_bytes = max_bytes
        self.name = name

    def __call__(self, proposal: object) -> Verdict:
        doc, problem = _load(proposal, self.max_bytes)
        if problem is not None:
            return Verdict.fail(problem, check=self.name)
        issues: list[Issue] = []
        for error in self._validator.iter_errors(doc):
            issues.append(Issue(
                code=f"schema_{error.validator}",
                location=error.json_path,
                message=clip(error.message),
            ))
            if len(issues) >= MAX_ISSUES:
                break
        issues.sort(key=lambda i: i.location or "")
        return Verdict(issues=tuple(issues), check=self.name)


class PydanticValidator:
    """Validates a JSON document (text or parsed) against a Pydantic model or type.

    ``model`` is a ``BaseModel`` subclass or any type a ``pydantic.TypeAdapter`` accepts.
    """

    def __init__(self, model: Any, *, max_bytes: int | None = None, name: str = "") -> None:
        pydantic = require("pydantic")
        try:
            self._adapter = pydantic.TypeAdapter(model)
        except pydantic.PydanticUserError as exc:  # pragma: no cover - depends on the model
            raise ConfigError(f"pydantic cannot validate {model!r}: {exc}") from exc
        self._error = pydantic.ValidationError
        self.model = model
        self.max_bytes = max_bytes
        self.name = name or f"pydantic:{getattr(model, '__name__', repr(model))}"

    def __call__(self, proposal: object) -> Verdict:
        doc, problem = _load(proposal, self.max_bytes)
        if problem is not None:
            return Verdict.fail(problem, check=self.name)
        try:
            self._adapter.validate_python(doc)
        except self._error as exc:
            issues = tuple(
                Issue(code=f"pydantic_{e['type']}", location=json_path(e["loc"]),
                      message=clip(e["msg"]))
                for e in exc.errors(include_url=False, include_input=False)[:MAX_ISSUES]
            )
            return Verdict(issues=issues, check=self.name)
        return Verdict.ok(check=self.name)
