r"""Helpers the commands share: the ``--store`` option, ``--since`` parsing, opening a store to
read it, and output for people (rich) and scripts (JSON).

Nothing here imports rich or the store at import time: ``closedloop --help`` imports every
command module for its summary line, and only a command that prints a table or opens a
store pays for them (BENCHMARKS.md, "Start-up").

Stored text is data. Task types, verdict messages, reasons and captured content come from
agents and users, so every command prints them literally: rich markup (``[red]``,
``[/bold]``) and emoji codes (``:smile:``) are never interpreted, and control characters
(ANSI escapes, ``\r``, NUL, bidirectional overrides) are shown escaped, Python style
(``\x1b[31m``, ``\r``, ``\x00``, ``\u202e``), never sent to the terminal. A backslash
already in the text is printed as it is. ``--json`` outputs carry the raw text.
"""


from __future__ import annotations

import functools
import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from closedloop.store import Store

    _ParamType = click.ParamType[float]  # generic in the stubs of click ≥ 8.2 only
else:
    _ParamType = click.ParamType

EXIT_NO_DATA = 1
"""Exit code when there is nothing to report: no store file, or no event in the window."""

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_DATE_LIKE = re.compile(r"\d{4}-\d")


def _default_store_url() -> str:
    from closedloop.store import default_store_url

    return default_store_url()


def store_option(f: F) -> F:
    """``--store URL``: the event store, default ``$CLOSEDLOOP_STORE`` or the user data file."""
    option = click.option(
        "--store",
        "store_url",
        metavar="URL",
        default=_default_store_url,
        show_default="$CLOSEDLOOP_STORE, else ~/.local/share/closedloop/closedloop.db",
        help="Event store: sqlite:///PATH, a file path, or memory://.",
    )
    return option(f)


class Since(_ParamType):
    """A point in time, given as an age (``30m``, ``24h``, ``7d``) or a date/ISO datetime.

    Ages count back from now; units are s, m, h, d, w. A date (``2026-11-01``) means its
    midnight; a datetime without a zone (``2026-11-01T08:30``) is read as UTC. Converts to
    Unix seconds.
    """

    name = "since"

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None
                ) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        age = _DURATION.fullmatch(text)
        try:
            if age is not None:
                moment = self._now() - float(age.group(1)) * _UNITS[age.group(2).lower()]
            else:
                parsed = datetime.fromisoformat(text)
                if parsed.tzinfo is None:
                    parsed = parsed.replace(tzinfo=UTC)
                moment = parsed.timestamp()
            iso(moment)  # representable as a date, so it can be shown back
        except (ValueError, OverflowError, OSError) as exc:
            if age is not None:
                self.fail(f"{text!r} is too far back", param, ctx)
            if _DATE_LIKE.match(text):
                self.fail(f"{text!r} is not a valid date or ISO datetime: {exc}", param, ctx)
            self.fail(f"{text!r} is neither an age (30m, 24h, 7d) nor a date or ISO datetime "
                      "(2026-11-01, 2026-11-01T08:30:00Z)", param, ctx)
        return moment


def describe_since(since: float | None) -> str:
    """``since 2026-11-01T08:30:00Z`` for a window start, or ``all time``."""
    if since is None:
        return "all time"
    return f"since {iso(since)}"


def iso(ts: float) -> str:
    """Unix seconds as an ISO-8601 UTC time to the second, ``...Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def open_store_to_read(url: str) -> Store:
    """Open an existing store read-only: never created, migrated or written.

    A malformed URL raises :class:`~closedloop.ConfigError` (exit 2); a missing or unreadable
    file, or one that is not a closedloop store, raises :class:`~closedloop.StoreError`
    (exit 1). A store on a read-only mount can be read.
    """
    from closedloop.store import open_store

    return open_store(url, read_only=True)


def open_store_to_write(url: str) -> Store:
    """Open an existing store to add to it (``scores add``); a missing file is an error."""
    from closedloop.store import open_store

    return open_store(url, create=False)


# C0 and C1 control characters (tab excepted), DEL, the Unicode line and paragraph
# separators, and the invisible bidirectional controls that can make text read differently
# from what it is ("Trojan Source").
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                      "\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def literal(value: object, *, newlines: bool = False) -> str:
    r"""``value`` as text that is safe to print: control characters shown escaped.

    With ``newlines`` a line break is kept (multi-line content); otherwise it is shown as
    ``\n`` too, so one stored value never spans, or forges, several output lines.
    """
    text = value if isinstance(value, str) else str(value)
    if newlines:
        return "\n".join(_CONTROL.sub(_escape, part) for part in text.split("\n"))
    return _CONTROL.sub(_escape, text)


def styled(value: object, style: str = "") -> Text:
    """Stored text as a rich :class:`~rich.text.Text`: printed literally, in ``style``."""
    from rich.text import Text

    return Text(literal(value), style=style)


def say(line: str, *, err: bool = False) -> None:
    """Echo one line that embeds stored text: control characters escaped, one line."""
    click.echo(literal(line), err=err)


def echo_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout, for scripts."""
    click.echo(json.dumps(data, indent=2, allow_nan=False))


def console(*, stderr: bool = False) -> Console:
    """A rich console on stdout (or stderr) that prints every string literally.

    Markup, emoji codes and highlighting are off (stored text is data); styles come from
    :class:`~rich.text.Text` objects (:func:`styled`). 120 columns wide when not a terminal
    (pipes, files, CI).
    """
    options: dict[str, Any] = {"markup": False, "emoji": False, "highlight": False,
                               "stderr": stderr}
    literal_console = _literal_console_class()
    out = literal_console(**options)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = literal_console(width=120, **options)
    return out


@functools.cache
def _literal_console_class() -> type[Console]:
    # Defined on first use, so that importing this module does not import rich.
    from collections.abc import Iterable

    from rich.console import Console, ConsoleOptions, RenderableType
    from rich.segment import Segment

    class _LiteralConsole(Console):
        """A console that never reads markup or emoji codes and escapes control characters.

        rich turns every ``str`` it is given (a table cell, a tree label, a title) into text
        through :meth:`render_str`; escaping there covers every printing command, including the
        ones that build their tables from plain strings. :meth:`render` escapes whatever is
        left (a :class:`~rich.text.Text` made from stored text by hand).
        """

        def render_str(self, text: str, **kwargs: Any) -> Text:
            return super().render_str(literal(text, newlines=True), **kwargs)

        def render(self, renderable: RenderableType, options: ConsoleOptions | None = None
                   ) -> Iterable[Segment]:
            # A safety net for Text built from stored text by hand: its control characters are
            # escaped here, after layout (so such a cell may overflow its column, never the
            # terminal). Escaping is idempotent, and rich's own control segments pass untouched.
            for segment in super().render(renderable, options):
                if segment.control or not _CONTROL.search(segment.text):
                    yield segment
                else:
                    yield Segment(literal(segment.text, newlines=True), segment.style)

    return _LiteralConsole
