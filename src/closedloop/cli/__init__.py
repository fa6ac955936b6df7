"""The ``closedloop`` command line: rich tables for people, ``--json`` for scripts.

Each command lives in its own module and registers itself on :data:`main`. A user mistake
(bad store URL, unreadable file, unknown flag value, empty store) exits non-zero with one
clear line on stderr, never a traceback.
"""

from __future__ import annotations

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
        message = self.format_message().rstrip(".")
        hint = f"; see `{self.ctx.command_path} --help`" if self.ctx is not None else ""
        click.echo(f"error: {message}{hint}", err=True)


def _one_line(exc: click.UsageError) -> click.UsageError:
    if isinstance(exc, (_UsageLine, NoArgsIsHelpError)):
        return exc
    return _UsageLine(exc.format_message(), exc.ctx)


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
            click.echo(f"error: {exc}", err=True)
            sys.exit(2 if isinstance(exc, ConfigError) else 1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="closedloop")
def main() -> None:
    """closedloop: run AI agents as closed-loop, self-correcting production systems."""


def _register() -> None:
    # Each command module adds itself to `main` when imported (once; later calls are no-ops).
    from closedloop.cli import _commands  # noqa: F401
