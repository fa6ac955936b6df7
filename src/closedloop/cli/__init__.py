"""The ``closedloop`` command line: rich tables for people, ``--json`` for scripts.

Each command lives in its own module and registers itself on :data:`main`. A user mistake
(bad store URL, unreadable file, unknown flag value, empty store) exits non-zero with one
clear line on stderr, never a traceback: 2 for a usage error, 1 when the command could not do
its work (including an optional dependency that is not installed: the line names the extra to
install), 130 when interrupted (Ctrl-C).
"""

from __future__ import annotations

import errno
import sys
from typing import Any

import click
from click.exceptions import NoArgsIsHelpError

from closedloop._errors import ClosedLoopError, ConfigError
from closedloop._version import __version__

__all__ = ["main"]


class _UsageLine(click.UsageError):
    """A usage error shown as one line (click's default adds the usage text and a hint)."""

    def show(self, file: Any = None) -> None:
        from closedloop.cli._common import literal

        message = self.format_message().rstrip(".")
        hint = f"; see `{self.ctx.command_path} --help`" if self.ctx is not None else ""
        click.echo(f"error: {literal(message)}{hint}", err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, (_UsageLine, NoArgsIsHelpError)):
        return exc
    return _UsageLine(exc.format_message(), exc.ctx)


# The optional dependencies, by top-level module, and the extra that installs each.
_EXTRAS = {"opentelemetry": "otel", "prometheus_client": "prometheus", "redis": "redis",
           "boto3": "aws", "botocore": "aws", "moto": "aws", "jsonschema": "validators",
           "sqlglot": "validators", "hcl2": "validators", "pydantic": "validators",
           "httpx": "http", "psycopg": "postgres", "openai": "openai",
           "anthropic": "anthropic", "starlette": "api", "uvicorn": "api"}
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""


def _missing_extra(exc: ImportError) -> str | None:
    """The extra that provides the module ``exc`` could not import, if it is one of ours."""
    return _EXTRAS.get((exc.name or "").partition(".")[0])


class _Group(click.Group):
    """Turns closedloop's own errors into one line and exit code 2 (usage) or 1.

    Usage errors (unknown option, bad flag value) keep click's exit code 2 but are shown
    as one line too. The command modules are imported when a command is first looked up,
    so ``closedloop --version`` imports none of them.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        _register()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        _register()
        return super().get_command(ctx, cmd_name)

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line(exc) from None
        except ClosedLoopError as exc:
            from closedloop.cli._common import literal

            click.echo(f"error: {literal(exc)}", err=True)
            sys.exit(2 if isinstance(exc, ConfigError) else 1)
        except ImportError as exc:
            extra = _missing_extra(exc)
            if extra is None:
                raise
            command = " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))
            click.echo(f"error: {command} needs the '{extra}' extra: pip install "
                       f"'closedloop[{extra}]' ({exc.name} is not installed)", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except OSError as exc:  # writing the output failed (full disk), or the system refused
            if exc.errno == errno.EPIPE:  # the reader went away (`| head`): click ends quietly
                raise
            from closedloop.cli._common import literal

            where = f": {exc.filename}" if exc.filename else ""
            click.echo(f"error: {literal(exc.strerror or exc)}{literal(where)}", err=True)
            sys.exit(1)

    # An optional dependency that is not installed names its extra (exit 1); Ctrl-C prints one
    # line and exits 130 (above). Subgroups (traces, scores) are of this class too.
    group_class = type

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """List each command with its whole first sentence, wrapped, never cut."""
        rows = [(name, cmd.get_short_help_str(limit=1_000))
                for name, cmd in ((n, self.get_command(ctx, n)) for n in self.list_commands(ctx))
                if cmd is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="closedloop")
def main() -> None:
    r"""closedloop: run AI agents as closed-loop, self-correcting production systems.

    Stored text (task types, messages, reasons, captured content) is printed as data: never
    read as markup, control characters shown escaped (\x1b); --json carries it raw. Exit
    codes: 0 done; 1 the command could not do its work, or found nothing; 2 usage error;
    130 interrupted (Ctrl-C). A missing optional dependency names the extra to install.
    """


def _register() -> None:
    # Each command module adds itself to `main` when imported (once; later calls are no-ops).
    from closedloop.cli import _commands  # noqa: F401
