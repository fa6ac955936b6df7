"""``closedloop check …``: every built-in validator as a command, for CI and for people.

Exit codes: 0 when nothing blocks (warnings allowed), 1 when something blocks (including a
check that could not tell), 2 on a usage error — an unreadable file, a malformed schema or
plan. A file whose parsing *is* the check (JSON document, Python, SQL, HCL) is not a usage
error when malformed: its syntax error is the finding, located by line and column.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from closedloop._errors import ConfigError
from closedloop._verdict import Severity, Verdict
from closedloop.cli import main
from closedloop.cli._common import echo_json

F = TypeVar("F", bound=Callable[..., Any])

_STYLE = {Severity.WARNING: "yellow", Severity.ERROR: "red", Severity.CRITICAL: "red"}


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read {path}: {reason}") from exc


def _report(verdict: Verdict, as_json: bool) -> None:
    if as_json:
        echo_json(verdict.to_dict())
    else:
        if verdict.unknown is not None:
            head = click.style("UNKNOWN", fg="red", bold=True)
        elif verdict.passed:
            head = click.style("PASS", fg="green", bold=True)
        else:
            head = click.style("FAIL", fg="red", bold=True)
        click.echo(f"{head} {verdict.check}")
        from closedloop.cli._common import literal  # messages quote inputs: printed literally

        if verdict.unknown is not None:
            click.echo(f"  could not check: {literal(verdict.unknown)}")
        for issue in verdict.issues:
            click.echo("  " + click.style(literal(issue.render()), fg=_STYLE[issue.severity]))
    sys.exit(0 if verdict.passed else 1)


def _json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the verdict as JSON for scripts.")(f)


def _policy_options(f: F) -> F:
    options = [
        click.option("--require-tag", "require_tags", multiple=True, metavar="KEY[=VALUE]",
                     help="A tag every resource must carry (repeatable)."),
        click.option("--tag-types", multiple=True, metavar="GLOB", default=("*",),
                     show_default=True, help="Resource types --require-tag applies to."),
        click.option("--forbid-type", "forbid_types", multiple=True, metavar="GLOB",
                     help="A resource type that may not be used (repeatable)."),
        click.option("--allow-instance-type", "instance_types", multiple=True, metavar="TYPE",
                     help="Allowed instance types; any other is reported (repeatable)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _rules(require_tags: tuple[str, ...], tag_types: tuple[str, ...],
           forbid_types: tuple[str, ...], instance_types: tuple[str, ...]) -> list[Any]:
    from closedloop.validate import AllowedInstanceTypes, ForbiddenResourceTypes, RequiredTags

    rules: list[Any] = []
    if require_tags:
        tags: dict[str, str | None] = {}
        for spec in require_tags:
            key, sep, value = spec.partition("=")
            tags[key] = value if sep else None
        rules.append(RequiredTags(tags, resource_types=tag_types))
    if forbid_types:
        rules.append(ForbiddenResourceTypes(forbid_types))
    if instance_types:
        rules.append(AllowedInstanceTypes(instance_types))
    return rules


@main.group()
def check() -> None:
    """Run a built-in validator on a file ("-" reads stdin).

    Exit 0 when nothing blocks, 1 when something does, 2 on a usage error.
    """


@check.command("terraform-plan")
@click.argument("plan", metavar="PLAN.json|-")
@click.option("--allow-destroy", multiple=True, metavar="GLOB",
              help="Addresses that may be deleted or replaced (reported as warnings).")
@_policy_options
@_json_option
def terraform_plan(plan: str, allow_destroy: tuple[str, ...], as_json: bool,
                   **policy: Any) -> None:
    """Scan a plan for destructive changes: `terraform show -json` or `plan -json` output."""
    from closedloop.validate import PlanFormatError, TerraformPlanValidator, load_plan

    try:
        loaded = load_plan(_read(plan))
    except PlanFormatError as exc:
        raise ConfigError(f"{plan}: {exc}") from exc
    validator = TerraformPlanValidator(_rules(**policy), allow_destroy=allow_destroy)
    _report(validator.scan(loaded), as_json)


@check.command("json-schema")
@click.option("--schema", "schema_path", required=True, metavar="SCHEMA.json",
              help="The JSON Schema (draft 2020-12 unless it says otherwise).")
@click.argument("document", metavar="DOC.json|-")
@click.option("--max-bytes", type=click.IntRange(min=1), help="Fail documents larger than this.")
@_json_option
def json_schema(schema_path: str, document: str, max_bytes: int | None, as_json: bool) -> None:
    """Validate a JSON document against a JSON Schema."""
    from closedloop.validate import JsonSchemaValidator

    try:
        schema = json.loads(_read(schema_path))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{schema_path}: not JSON (line {exc.lineno}, column {exc.colno}): "
                          f"{exc.msg}") from exc
    if not isinstance(schema, dict | bool):
        raise ConfigError(f"{schema_path}: a JSON Schema is an object or a boolean")
    _report(JsonSchemaValidator(schema, max_bytes=max_bytes)(_read(document)), as_json)


@check.command("python")
@click.argument("file", metavar="FILE.py|-")
@click.option("--lint/--no-lint", default=False, help="Also lint with ruff.")
@click.option("--select", multiple=True, metavar="RULE", help="ruff rules to apply.")
@click.option("--ignore", multiple=True, metavar="RULE", help="ruff rules to skip.")
@_json_option
def python(file: str, lint: bool, select: tuple[str, ...], ignore: tuple[str, ...],
           as_json: bool) -> None:
    """Check Python syntax (compiled, never run), optionally ruff lint."""
    from closedloop.validate import PythonSyntax, RuffLint

    source = _read(file)
    verdict = PythonSyntax(filename=file)(source)
    if lint and verdict.passed:
        linted = RuffLint(select=select or None, ignore=ignore)(source)
        verdict = Verdict(issues=verdict.issues + linted.issues, unknown=linted.unknown,
                          check="python_syntax+ruff")
    _report(verdict, as_json)


@check.command("sql")
@click.argument("file", metavar="FILE.sql|-")
@click.option("--dialect", default="postgres", show_default=True,
              help="SQL dialect: postgres, sqlite, mysql, … (any sqlglot dialect).")
@click.option("--allow-destructive", is_flag=True,
              help="Do not report DROP, TRUNCATE, or DELETE/UPDATE without WHERE.")
@_json_option
def sql(file: str, dialect: str, allow_destructive: bool, as_json: bool) -> None:
    """Check SQL syntax in a dialect, and flag statements that destroy data."""
    from closedloop.validate import SqlSyntax

    check_ = SqlSyntax(dialect, forbid_destructive=not allow_destructive)
    _report(check_(_read(file)), as_json)


@check.command("hcl")
@click.argument("files", nargs=-1, required=True, metavar="FILE.tf...")
@_policy_options
@_json_option
def hcl(files: tuple[str, ...], as_json: bool, **policy: Any) -> None:
    """Parse Terraform HCL files (one module) and apply policy rules."""
    from closedloop.validate import HclValidator

    texts = {("stdin.tf" if f == "-" else Path(f).name): _read(f) for f in files}
    _report(HclValidator(_rules(**policy))(texts), as_json)


@check.command("terraform")
@click.argument("files", nargs=-1, required=True, metavar="FILE.tf...")
@click.option("--plan", "with_plan", is_flag=True,
              help="Also run `plan -json` and scan it for destructive changes.")
@click.option("--state", type=click.Path(exists=True, dir_okay=False),
              help="A terraform.tfstate to plan against.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=300.0, show_default=True,
              help="Seconds the whole terraform run may take before it is stopped.")
@click.option("--require-binary", is_flag=True,
              help="Fail (exit 1) when no terraform/tofu is on PATH, instead of skipping.")
@_json_option
def terraform(files: tuple[str, ...], *, with_plan: bool, state: str | None, timeout: float,
              require_binary: bool, as_json: bool) -> None:
    """Run terraform (or tofu) `validate -json` on the files, in a fresh temporary directory."""
    from closedloop.validate import TerraformCli

    texts = {("stdin.tf" if f == "-" else Path(f).name): _read(f) for f in files}
    check_ = TerraformCli(plan=with_plan, state=state, timeout=timeout,
                          if_missing="unknown" if require_binary else "skip")
    _report(check_(texts), as_json)
