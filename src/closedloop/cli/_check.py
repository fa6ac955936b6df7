"""``closedloop check …``: every built-in validator as a command, for CI and for people.

Exit codes: 0 when nothing blocks (warnings allowed), 1 when something blocks (including a
check that could not tell), 2 on a usage error — an unreadable file, a malformed schema, JSON
that is not a Terraform plan. A file whose parsing *is* the check (JSON document, Python, SQL,
HCL) is not a usage error when malformed: its syntax error is the finding, located by line and
column, and so is text that is not UTF-8 or holds a NUL character.

Every input is read with a bound: at most ``--max-bytes`` + 1 bytes, whatever it is (a file,
a pipe, ``/dev/zero``); a larger one fails the check as ``too_large`` without being parsed,
so a check's time and memory stay bounded (BENCHMARKS.md, "Largest inputs").
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from closedloop._errors import ConfigError
from closedloop.cli import main
from closedloop.cli._common import echo_json, literal

if TYPE_CHECKING:
    from closedloop._verdict import Verdict

# The validators are imported by the command that runs one, so that `closedloop --help` does
# not load them. Their DEFAULT_MAX_BYTES, spelled out for the same reason (a test checks that
# each command's default is its validator's):
_KiB, _MiB = 1024, 1024 * 1024
_MAX_BYTES = {"terraform-plan": 8 * _MiB, "json-schema": 1 * _MiB, "python": 256 * _KiB,
              "sql": 128 * _KiB, "hcl": 128 * _KiB, "terraform": 8 * _MiB}
_AUX_MAX_BYTES = 8 * _MiB  # a schema file

F = TypeVar("F", bound=Callable[..., Any])

_STYLE = {"WARNING": "yellow", "ERROR": "red", "CRITICAL": "red"}  # by Severity name


class _TooLarge(Exception):
    """An input over its cap (``size``: its exact size, when known without reading it)."""

    def __init__(self, path: str, size: int | None, limit: int) -> None:
        super().__init__(path)
        self.path, self.size, self.limit = path, size, limit


def _read(path: str, limit: int) -> bytes:
    """The bytes of ``path`` ("-": stdin), never more than ``limit`` + 1 of them read.

    A regular file's size is known before reading; a device or pipe is read up to the cap.
    Raises :class:`_TooLarge` past ``limit``, :class:`ConfigError` if unreadable.
    """
    try:
        if path == "-":
            data = click.get_binary_stream("stdin").read(limit + 1)
        else:
            with open(path, "rb") as file:
                info = os.fstat(file.fileno())
                if stat.S_ISDIR(info.st_mode):
                    raise IsADirectoryError(21, "Is a directory")
                if stat.S_ISREG(info.st_mode) and info.st_size > limit:
                    raise _TooLarge(path, info.st_size, limit)
                data = file.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise _TooLarge(path, None, limit)
    return data


def _inputs(paths: tuple[str, ...], limit: int, check_name: str, as_json: bool,
            ) -> dict[str, bytes]:
    """Read the checked files (each capped); an input over the cap fails the check."""
    try:
        return {path: _read(path, limit) for path in paths}
    except _TooLarge as exc:
        from dataclasses import replace

        from closedloop._checks import too_large
        from closedloop._verdict import Verdict

        issue = too_large(exc.size, exc.limit, "raise the limit with --max-bytes to check it")
        _report(Verdict.fail(replace(issue, location=exc.path), check=check_name), as_json)


def _aux_json(path: str) -> Any:
    """A JSON file that configures a check (a schema): any problem is a usage error."""
    from closedloop.validate import parse_json

    try:
        data = _read(path, _AUX_MAX_BYTES)
    except _TooLarge:
        raise ConfigError(f"{path}: larger than {_AUX_MAX_BYTES} bytes") from None
    doc, problem = parse_json(data)
    if problem is not None:
        where = f" ({problem.location})" if problem.location else ""
        raise ConfigError(f"{path}: not usable JSON{where}: "
                          f"{problem.message.removeprefix('invalid JSON: ')}")
    return doc


def _max_bytes_option(command: str) -> Callable[[F], F]:
    return click.option("--max-bytes", type=click.IntRange(min=1), default=_MAX_BYTES[command],
                        show_default=True, metavar="N",
                        help="Largest input checked (in bytes); a larger one fails.")


def _report(verdict: Verdict, as_json: bool) -> NoReturn:
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
        # messages quote the inputs: printed literally
        if verdict.unknown is not None:
            click.echo(f"  could not check: {literal(verdict.unknown)}")
        for issue in verdict.issues:
            click.echo("  " + click.style(literal(issue.render()), fg=_STYLE[issue.severity.name]))
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
@_max_bytes_option("terraform-plan")
@_json_option
def terraform_plan(plan: str, allow_destroy: tuple[str, ...], max_bytes: int, as_json: bool,
                   **policy: Any) -> None:
    """Scan a plan for destructive changes: `terraform show -json` or `plan -json` output.

    JSON that is neither is a usage error (exit 2), never a pass.
    """
    from closedloop.validate import PlanFormatError, TerraformPlanValidator, load_plan

    validator = TerraformPlanValidator(_rules(**policy), allow_destroy=allow_destroy,
                                       max_bytes=max_bytes)
    text = _inputs((plan,), max_bytes, validator.name, as_json)[plan]
    try:
        loaded = load_plan(text)
    except PlanFormatError as exc:
        raise ConfigError(f"{plan}: {exc}") from exc
    _report(validator.scan(loaded), as_json)


@check.command("json-schema")
@click.option("--schema", "schema_path", required=True, metavar="SCHEMA.json",
              help="The JSON Schema (draft 2020-12 unless it says otherwise).")
@click.argument("document", metavar="DOC.json|-")
@_max_bytes_option("json-schema")
@_json_option
def json_schema(schema_path: str, document: str, max_bytes: int, as_json: bool) -> None:
    """Validate a JSON document against a JSON Schema."""
    from closedloop.validate import JsonSchemaValidator

    schema = _aux_json(schema_path)
    if not isinstance(schema, dict | bool):
        raise ConfigError(f"{schema_path}: a JSON Schema is an object or a boolean")
    validator = JsonSchemaValidator(schema, max_bytes=max_bytes)
    _report(validator(_inputs((document,), max_bytes, validator.name, as_json)[document]),
            as_json)


@check.command("python")
@click.argument("file", metavar="FILE.py|-")
@click.option("--lint/--no-lint", default=False, help="Also lint with ruff.")
@click.option("--select", multiple=True, metavar="RULE", help="ruff rules to apply.")
@click.option("--ignore", multiple=True, metavar="RULE", help="ruff rules to skip.")
@_max_bytes_option("python")
@_json_option
def python(file: str, *, lint: bool, select: tuple[str, ...], ignore: tuple[str, ...],
           max_bytes: int, as_json: bool) -> None:
    """Check Python syntax (compiled, never run), optionally ruff lint."""
    from closedloop._verdict import Verdict
    from closedloop.validate import PythonSyntax, RuffLint

    syntax = PythonSyntax(filename=file, max_bytes=max_bytes)
    source = _inputs((file,), max_bytes, syntax.name, as_json)[file]
    verdict = syntax(source)
    if lint and verdict.passed:
        linted = RuffLint(select=select or None, ignore=ignore, max_bytes=max_bytes)(source)
        verdict = Verdict(issues=verdict.issues + linted.issues, unknown=linted.unknown,
                          check="python_syntax+ruff")
    _report(verdict, as_json)


@check.command("sql")
@click.argument("file", metavar="FILE.sql|-")
@click.option("--dialect", default="postgres", show_default=True,
              help="SQL dialect: postgres, sqlite, mysql, … (any sqlglot dialect).")
@click.option("--allow-destructive", is_flag=True,
              help="Do not report DROP, TRUNCATE, or DELETE/UPDATE without WHERE.")
@_max_bytes_option("sql")
@_json_option
def sql(file: str, dialect: str, allow_destructive: bool, max_bytes: int,
        as_json: bool) -> None:
    """Check SQL syntax in a dialect, and flag statements that destroy data."""
    from closedloop.validate import SqlSyntax

    check_ = SqlSyntax(dialect, forbid_destructive=not allow_destructive, max_bytes=max_bytes)
    _report(check_(_inputs((file,), max_bytes, check_.name, as_json)[file]), as_json)


@check.command("hcl")
@click.argument("files", nargs=-1, required=True, metavar="FILE.tf...")
@_policy_options
@_max_bytes_option("hcl")
@_json_option
def hcl(files: tuple[str, ...], max_bytes: int, as_json: bool, **policy: Any) -> None:
    """Parse Terraform HCL files (one module) and apply policy rules.

    --max-bytes caps the files' total size.
    """
    from closedloop.validate import HclValidator

    check_ = HclValidator(_rules(**policy), max_bytes=max_bytes)
    _report(check_(_named(_inputs(files, max_bytes, check_.name, as_json))), as_json)


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
@_max_bytes_option("terraform")
@_json_option
def terraform(files: tuple[str, ...], *, with_plan: bool, state: str | None, timeout: float,
              require_binary: bool, max_bytes: int, as_json: bool) -> None:
    """Run terraform (or tofu) `validate -json` on the files, in a fresh temporary directory."""
    from closedloop.validate import TerraformCli

    check_ = TerraformCli(plan=with_plan, state=state, timeout=timeout, max_bytes=max_bytes,
                          if_missing="unknown" if require_binary else "skip")
    _report(check_(_named(_inputs(files, max_bytes, check_.name, as_json))), as_json)


def _named(inputs: dict[str, bytes]) -> dict[str, bytes]:
    """Module files by their base name, as terraform sees them ("-" is ``stdin.tf``)."""
    return {("stdin.tf" if path == "-" else Path(path).name): data
            for path, data in inputs.items()}
