"""The ``closedloop`` command line: rich tables for people, ``--json`` for scripts.

Each command lives in its own module and registers itself on :data:`main`. A user mistake
(bad store URL, unreadable file, unknown flag value, empty store) exits non-zero with one
clear line on stderr, never a traceback.
"""

from __future__ import annotations

import sys

import click

from closedloop._errors import ClosedLoopError, ConfigError
from closedloop._version import __version__

__all__ = ["main"]


class _Group(click.Group):
    """Turns closedloop's own errors into one line and exit code 2 (usage) or 1."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except ClosedLoopError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2 if isinstance(exc, ConfigError) else 1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="closedloop")
def main() -> None:
    """closedloop: run AI agents as closed-loop, self-correcting production systems."""


def _register() -> None:
    # Each command module adds itself to `main`; imported here so `closedloop --help` lists all.
    from closedloop.cli import _commands  # noqa: F401


_register()
