"""Structured output: JSON parse errors by line and column, JSON Schema, Pydantic, size limits."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from closedloop._checks import (
    MiB,
    check_limit,
    clip,
    require,
    text_size,
    too_large,
    where,
)
from closedloop._errors import ConfigError
from closedloop._verdict import Issue, Verdict

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


MAX_INT_DIGITS = 4300
"""Longest integer a JSON document may hold (Python's own default limit, enforced here
whatever ``sys.set_int_max_str_digits`` says: converting longer ones costs quadratic time)."""

_LONG_NUMBER = re.compile(rf"-?[0-9]{{{MAX_INT_DIGITS + 1},}}")


class _NumberTooLong(ValueError):
    pass


def _parse_int(digits: str) -> int:
    if len(digits) - digits.startswith("-") > MAX_INT_DIGITS:
        raise _NumberTooLong(digits[:20])
    return int(digits)


def _locate_long_number(text: str | bytes) -> str | None:
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    found = _LONG_NUMBER.search(text)
    return None if found is None else where(text, found.start())


def load_json(text: str | bytes) -> Any:
    """``json.loads`` that refuses integers over :data:`MAX_INT_DIGITS` digits (``ValueError``)
    whatever the interpreter's limit, so a number cannot cost quadratic time."""
    return json.loads(text, parse_int=_parse_int)


def parse_json(text: str | bytes) -> tuple[Any, Issue | None]:
    """Parse JSON text; on failure, an issue located by line and column (1-based).

    Never raises for bad input: malformed JSON, text that is not UTF-8, nesting deeper than the
    parser's recursion limit and integers over :data:`MAX_INT_DIGITS` digits are issues.
    """
    try:
        return load_json(text), None
    except json.JSONDecodeError as exc:
        return None, Issue(
            code="json_syntax",
            location=f"line {exc.lineno}, column {exc.colno}",
            message=f"invalid JSON: {exc.msg}; return one valid JSON document and nothing else",
        )
    except UnicodeDecodeError:
        return None, Issue(code="json_syntax", message="invalid JSON: not UTF-8 text")
    except RecursionError:
        return None, depth_issue()
    except ValueError:  # an integer over our limit, or under a lower one set in sys
        return None, number_issue(_locate_long_number(text))


def depth_issue() -> Issue:
    """The issue for a document nested deeper than Python can parse or walk."""
    return Issue(code="json_depth",
                 message="JSON nested too deeply; flatten the document")


def number_issue(location: str | None = None) -> Issue:
    """The issue for a number too long to convert or compare."""
    return Issue(code="json_number", location=location,
                 message=f"a number longer than {MAX_INT_DIGITS} digits; write such values "
                         "as strings")


def _size(proposal: object) -> int:
    if isinstance(proposal, str | bytes | bytearray):
        return text_size(proposal)
    return len(json.dumps(proposal, default=str, separators=(",", ":")).encode())


class MaxSize:
    """Fails a proposal larger than ``max_bytes`` (UTF-8 text, or its compact JSON form)."""

    def __init__(self, max_bytes: int, *, name: str = "max_size") -> None:
        if max_bytes < 1:
            raise ConfigError(f"max_bytes must be ≥ 1, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.name = name

    def __call__(self, proposal: object) -> Verdict:
        try:
            size = _size(proposal)
        except RecursionError:
            return Verdict.fail(depth_issue(), check=self.name)
        except ValueError:  # an integer too long to print
            return Verdict.fail(number_issue(), check=self.name)
        if size > self.max_bytes:
            return Verdict.fail(too_large(size, self.max_bytes), check=self.name)
        return Verdict.ok(check=self.name)


def _load(proposal: object, max_bytes: int | None) -> tuple[Any, Issue | None]:
    """Text is size-checked then parsed; anything else is taken as an already-parsed document."""
    if not isinstance(proposal, str | bytes | bytearray):
        return proposal, None
    text = bytes(proposal) if isinstance(proposal, bytearray) else proposal
    if max_bytes is not None and (size := _size(text)) > max_bytes:
        return None, too_large(size, max_bytes)
    return parse_json(text)


class JsonSchemaValidator:
    """Validates a JSON document (text or parsed) against a JSON Schema.

    Draft 2020-12 unless the schema names another with ``$schema``. The schema itself is
    checked once, here, so a broken schema is a :class:`~closedloop.ConfigError` at start-up
    rather than a failure on every proposal. Every violation is reported (up to
    :data:`MAX_ISSUES`), located by JSON path (``$.items[0].name``). JSON text over
    ``max_bytes`` is an issue before it is parsed.
    """

    DEFAULT_MAX_BYTES = 1 * MiB
    """Default ``max_bytes``: validation walks every value in Python, 5-15 µs each with a
    simple schema; the densest 1 MiB document (``[[],[],…]``) holds 350,000 of them (see
    BENCHMARKS.md, "Largest inputs"). Far above what a model writes in one answer."""

    def __init__(
        self,
        schema: Mapping[str, Any] | bool,
        *,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
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
        self.max_bytes = check_limit(max_bytes)
        self.name = name

    def __call__(self, proposal: object) -> Verdict:
        doc, problem = _load(proposal, self.max_bytes)
        if problem is not None:
            return Verdict.fail(problem, check=self.name)
        issues: list[Issue] = []
        try:
            for error in self._validator.iter_errors(doc):
                issues.append(Issue(
                    code=f"schema_{error.validator}",
                    location=error.json_path,
                    message=clip(error.message),
                ))
                if len(issues) >= MAX_ISSUES:
                    break
        except RecursionError:  # a parsed document deeper than the validator can walk
            return Verdict.fail(depth_issue(), check=self.name)
        except (OverflowError, ValueError):  # a huge integer against a float bound, say
            return Verdict.fail(number_issue(), check=self.name)
        issues.sort(key=lambda i: i.location or "")
        return Verdict(issues=tuple(issues), check=self.name)


class PydanticValidator:
    """Validates a JSON document (text or parsed) against a Pydantic model or type.

    ``model`` is a ``BaseModel`` subclass or any type a ``pydantic.TypeAdapter`` accepts.
    JSON text over ``max_bytes`` is an issue before it is parsed.
    """

    DEFAULT_MAX_BYTES = 1 * MiB
    """Default ``max_bytes``, as for :class:`JsonSchemaValidator`."""

    def __init__(self, model: Any, *, max_bytes: int | None = DEFAULT_MAX_BYTES,
                 name: str = "") -> None:
        pydantic = require("pydantic")
        try:
            self._adapter = pydantic.TypeAdapter(model)
        except pydantic.PydanticUserError as exc:  # pragma: no cover - depends on the model
            raise ConfigError(f"pydantic cannot validate {model!r}: {exc}") from exc
        self._error = pydantic.ValidationError
        self.model = model
        self.max_bytes = check_limit(max_bytes)
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
        except RecursionError:
            return Verdict.fail(depth_issue(), check=self.name)
        except (OverflowError, ValueError):
            return Verdict.fail(number_issue(), check=self.name)
        return Verdict.ok(check=self.name)
