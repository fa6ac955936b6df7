"""Code: Python syntax (the compiler), Python lint (ruff), SQL syntax (sqlglot)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from closedloop._checks import (
    KiB,
    MiB,
    check_limit,
    clip,
    require,
    text_input,
)
from closedloop._errors import ConfigError
from closedloop._verdict import Issue, Severity, Verdict
from closedloop.validate._proc import check_policy, find_binary, missing, run_tool
from closedloop.validate._structured import MAX_ISSUES


def _at(line: int | None, column: int | None, filename: str | None = None) -> str | None:
    if not line:
        return filename
    where = f"line {line}" + (f", column {column}" if column else "")
    return f"{filename}:{where}" if filename else where


class PythonSyntax:
    """Compiles Python source (without running it): syntax errors with line and column.

    Compiling, not just parsing, also catches what ``ast.parse`` lets through, such as
    ``return`` outside a function. Compiler warnings (invalid escapes…) become warnings.
    Source over ``max_bytes`` (UTF-8) is an issue before the compiler sees it: CPython's
    compiler takes superlinear time on some inputs (thousands of identical functions).
    """

    DEFAULT_MAX_BYTES = 256 * KiB
    """Default ``max_bytes``: the worst input known at this size compiles in ~3 s (see
    BENCHMARKS.md, "Largest inputs"); far above what a model writes in one answer."""

    def __init__(self, *, filename: str = "<proposal>",
                 max_bytes: int | None = DEFAULT_MAX_BYTES, name: str = "python_syntax") -> None:
        self.filename = filename
        self.max_bytes = check_limit(max_bytes)
        self.name = name

    def __call__(self, proposal: object) -> Verdict:
        source = text_input(proposal, "Python source", self.max_bytes)
        if isinstance(source, Issue):
            return Verdict.fail(source, check=self.name)
        source = source.removeprefix("\ufeff")  # a UTF-8 BOM, valid at the start of a file
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                compile(source, self.filename, "exec", dont_inherit=True)
            except SyntaxError as exc:
                kind = type(exc).__name__
                issue = Issue(code="python_syntax", location=_at(exc.lineno, exc.offset),
                              message=f"{kind}: {clip(exc.msg or 'invalid syntax')}")
                return Verdict.fail(issue, check=self.name)
            except (ValueError, RecursionError, MemoryError) as exc:  # e.g. an over-long int
                reason = "nested too deeply" if not isinstance(exc, ValueError) else clip(str(exc))
                return Verdict.fail(Issue(code="python_syntax", message=reason), check=self.name)
        notes = tuple(
            Issue(code="python_warning", location=_at(w.lineno, None),
                  message=f"{w.category.__name__}: {clip(str(w.message))}",
                  severity=Severity.WARNING)
            for w in caught[:MAX_ISSUES]
        )
        return Verdict.ok(*notes, check=self.name)


def _ruff_binary() -> str | None:
    found = find_binary(["ruff"])
    if found:
        return found
    try:
        from ruff.__main__ import find_ruff_bin  # type: ignore[import-untyped]
    except ImportError:
        return None
    try:
        return str(find_ruff_bin())
    except FileNotFoundError:  # pragma: no cover - broken ruff install
        return None


class RuffLint:
    """Lints Python source with ruff (a subprocess, JSON output), rules configurable.

    ``select``/``ignore`` are ruff rule codes or prefixes (``["E", "F", "B"]``); by default
    ruff's own defaults apply. ``config`` points at a ``pyproject.toml``/``ruff.toml`` to use
    instead; without it, ruff runs ``--isolated`` so the caller's directory cannot change the
    rules. Findings are ``severity`` (``ERROR``: the model is asked to fix them).
    """

    DEFAULT_MAX_BYTES = 8 * MiB
    """Default ``max_bytes`` (ruff itself is fast; this bounds what is held and piped)."""

    def __init__(
        self,
        *,
        select: Sequence[str] | None = None,
        ignore: Sequence[str] = (),
        config: str | Path | None = None,
        severity: Severity = Severity.ERROR,
        timeout: float = 30.0,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        max_output: int = 1_000_000,
        binary: str | None = None,
        if_missing: str = "skip",
        name: str = "ruff",
    ) -> None:
        self.select = tuple(select) if select is not None else None
        self.ignore = tuple(ignore)
        self.config = config
        self.severity = severity
        self.timeout = timeout
        self.max_bytes = check_limit(max_bytes)
        self.max_output = max_output
        self.binary = binary
        self.if_missing = check_policy(if_missing)
        self.name = name

    def argv(self, binary: str) -> list[str]:
        """The ruff command line this check runs (source on stdin)."""
        argv = [binary, "check", "--output-format=json", "--no-cache", "--exit-zero",
                "--stdin-filename", "proposal.py"]
        argv += ["--config", str(self.config)] if self.config else ["--isolated"]
        if self.select is not None:
            argv += ["--select", ",".join(self.select)]
        if self.ignore:
            argv += ["--ignore", ",".join(self.ignore)]
        return [*argv, "-"]

    def __call__(self, proposal: object) -> Verdict:
        source = text_input(proposal, "Python source", self.max_bytes)
        if isinstance(source, Issue):
            return Verdict.fail(source, check=self.name)
        binary = self.binary or _ruff_binary()
        if binary is None:
            return missing("ruff", self.if_missing, self.name)
        out = run_tool(self.argv(binary), stdin=source, timeout=self.timeout,
                       max_output=self.max_output)
        if out.truncated:
            return Verdict.cannot_tell(f"ruff printed more than {self.max_output} bytes",
                                       check=self.name)
        try:
            findings: list[dict[str, Any]] = json.loads(out.stdout)
        except json.JSONDecodeError:
            return Verdict.cannot_tell(f"ruff failed (exit {out.returncode}): "
                                       f"{clip(out.stderr or out.stdout)}", check=self.name)
        issues = []
        for f in findings[:MAX_ISSUES]:
            loc = f.get("location") or {}
            code = f.get("code")
            issues.append(Issue(
                code=f"ruff_{code}" if code and code != "invalid-syntax" else "python_syntax",
                location=_at(loc.get("row"), loc.get("column")),
                message=clip(str(f.get("message", ""))),
                severity=self.severity if code != "invalid-syntax" else Severity.ERROR,
            ))
        return Verdict(issues=tuple(issues), check=self.name)


class SqlSyntax:
    """Parses SQL in a dialect (sqlglot): syntax errors with line and column.

    With ``forbid_destructive`` (the default), statements that destroy data — ``DROP``,
    ``TRUNCATE``, and ``DELETE``/``UPDATE`` without a ``WHERE`` — are critical issues: the
    step stops without re-ask, as for a Terraform plan that deletes resources. SQL over
    ``max_bytes`` (UTF-8) is an issue before sqlglot, a pure-Python parser, sees it.
    """

    DEFAULT_MAX_BYTES = 128 * KiB
    """Default ``max_bytes``: sqlglot needs up to ~15 µs and ~800 bytes of memory a byte on the
    worst inputs known (``1+1+…``, ``a.a.…``; see BENCHMARKS.md, "Largest inputs")."""

    def __init__(self, dialect: str = "postgres", *, forbid_destructive: bool = True,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, name: str = "") -> None:
        sqlglot = require("sqlglot")
        try:
            sqlglot.Dialect.get_or_raise(dialect)
        except ValueError as exc:
            raise ConfigError(f"unknown SQL dialect {dialect!r}: {clip(str(exc))}") from exc
        self.dialect = dialect
        self.forbid_destructive = forbid_destructive
        self.max_bytes = check_limit(max_bytes)
        self.name = name or f"sql:{dialect}"

    def __call__(self, proposal: object) -> Verdict:
        text = text_input(proposal, "SQL", self.max_bytes)
        if isinstance(text, Issue):
            return Verdict.fail(text, check=self.name)
        import sqlglot
        from sqlglot.errors import ParseError, SqlglotError

        try:
            statements = [s for s in sqlglot.parse(text, read=self.dialect) if s is not None]
        except ParseError as exc:
            issues = tuple(
                Issue(code="sql_syntax", location=_at(e.get("line"), e.get("col")),
                      message=clip(f"{e.get('description')} near {e.get('highlight')!r}"))
                for e in exc.errors[:MAX_ISSUES]
            ) or (Issue(code="sql_syntax", message=clip(str(exc))),)
            return Verdict(issues=issues, check=self.name)
        except SqlglotError as exc:  # tokenizer errors: unterminated strings and the like
            return Verdict.fail(Issue(code="sql_syntax", message=clip(str(exc))), check=self.name)
        except RecursionError:
            return Verdict.fail(Issue(code="sql_syntax", message="nested too deeply"),
                                check=self.name)
        if not statements:
            return Verdict.fail(Issue(code="sql_empty", message="no SQL statement found"),
                                check=self.name)
        if not self.forbid_destructive:
            return Verdict.ok(check=self.name)
        issues = tuple(i for n, s in enumerate(statements, 1) for i in _destructive(s, n))
        return Verdict(issues=issues, check=self.name)


def _destructive(statement: Any, number: int) -> list[Issue]:
    from sqlglot import exp

    where = f"statement {number}"
    if isinstance(statement, exp.Drop | exp.TruncateTable):
        if isinstance(statement, exp.Drop):
            kind = f"DROP {statement.args.get('kind') or ''}".strip()
        else:
            kind = "TRUNCATE"
        targets = statement.args.get("tables") or statement.expressions or [statement.this]
        what = ", ".join(t.sql() for t in targets if t is not None) or "?"
        return [Issue(code="sql_destructive", location=where, severity=Severity.CRITICAL,
                      message=f"{kind} {clip(what, 80)} destroys data; it needs human approval")]
    if isinstance(statement, exp.Delete | exp.Update) and not statement.args.get("where"):
        kind = "DELETE" if isinstance(statement, exp.Delete) else "UPDATE"
        return [Issue(code="sql_destructive", location=where, severity=Severity.CRITICAL,
                      message=f"{kind} without WHERE changes every row of the table")]
    return []

