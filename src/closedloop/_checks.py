"""What every built-in check shares: lazy optional imports, deadlines, bounded text.

A check is any callable returning a :class:`~closedloop.Verdict` with a ``name`` attribute; the
loop calls ``validator(proposal)`` and ``verifier(intent, result)``. Nothing here knows about
the loop, so every check is equally usable on its own. The validators
(:mod:`closedloop.validate`), the verifiers (:mod:`closedloop.verify`) and ``closedloop check``
share it, so it sits at the top of the package rather than inside one of them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, ParamSpec, TypeVar

from closedloop._errors import CheckTimeout, ConfigError
from closedloop._verdict import Issue

P = ParamSpec("P")
R = TypeVar("R")

_EXTRA_OF = {
    "jsonschema": "validators",
    "pydantic": "validators",
    "hcl2": "validators",
    "sqlglot": "validators",
    "httpx": "http",
    "boto3": "aws",
    "psycopg": "postgres",
}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or say which extra to install (a :class:`ConfigError`)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".", 1)[0]
        extra = _EXTRA_OF.get(top, "validators")
        raise ConfigError(
            f"{top} is not installed; install it with: pip install 'closedloop[{extra}]'"
        ) from exc


def with_timeout(check: Callable[P, R], seconds: float, *, name: str | None = None) -> (
    Callable[P, R]
):
    """Run ``check`` under a deadline; past it, raise :class:`CheckTimeout`.

    An ``async def`` check is awaited under :func:`asyncio.wait_for` (and cancelled at the
    deadline). A plain check runs in a daemon thread; a Python thread cannot be killed, so a
    timed-out plain check is abandoned (it finishes, or not, in the background). Checks that
    start external programs (terraform, ruff) enforce their own deadline and kill the process.
    """
    if seconds <= 0:
        raise ConfigError(f"timeout must be > 0 seconds, got {seconds!r}")
    label = name or getattr(check, "name", None) or getattr(check, "__qualname__", "check")
    message = f"check {label} did not finish within {seconds:g} s"
    target_fn: Any = getattr(check, "__call__", check)  # noqa: B004 - objects with async __call__

    if inspect.iscoroutinefunction(check) or inspect.iscoroutinefunction(target_fn):

        @functools.wraps(check)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            import asyncio  # already loaded when awaited; not at import (CLI start-up)

            try:
                return await asyncio.wait_for(check(*args, **kwargs), seconds)  # type: ignore[arg-type]
            except TimeoutError:
                raise CheckTimeout(message) from None

        run_async.name = label  # type: ignore[attr-defined]
        return run_async  # type: ignore[return-value]

    @functools.wraps(check)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        box: list[Any] = []

        def target() -> None:
            try:
                box.append((True, check(*args, **kwargs)))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box.append((False, exc))

        thread = threading.Thread(target=target, name=f"closedloop-check-{label}", daemon=True)
        thread.start()
        thread.join(seconds)
        if not box:
            raise CheckTimeout(message)
        ok, value = box[0]
        if ok:
            result: R = value
            return result
        raise value

    run.name = label  # type: ignore[attr-defined]
    return run


def clip(text: str, limit: int = 300) -> str:
    """Shorten text quoted back into a message, so feedback stays small.

    The text is redacted first: a secret cut short may no longer match a redaction rule,
    so cutting first could leave part of it in the message for good.
    """
    from closedloop._redact import redact_text  # only when quoting a value

    text = redact_text(text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


KiB = 1024
MiB = 1024 * KiB


def check_limit(max_bytes: int | None) -> int | None:
    """Validate a ``max_bytes`` option (``None``: no cap)."""
    if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 1):
        raise ConfigError(f"max_bytes must be an integer >= 1 or None, got {max_bytes!r}")
    return max_bytes


def text_size(text: str | bytes | bytearray) -> int:
    """The size of ``text`` in UTF-8 (bytes: their number), without encoding ASCII text."""
    if not isinstance(text, str):
        return len(text)
    return len(text) if text.isascii() else len(text.encode("utf-8", errors="surrogatepass"))


def too_large(size: int | None, max_bytes: int, advice: str = "make it shorter") -> Issue:
    """The issue for an input over its cap (``size`` ``None``: unknown, larger than the cap)."""
    got = f"{size} bytes > {max_bytes}" if size is not None else f"over {max_bytes}"
    return Issue(code="too_large", message=f"input too large ({got}-byte limit); {advice}")


def where(text: str, index: int) -> str:
    """``"line L, column C"`` (1-based) of ``text[index]``, as issues locate it."""
    line = text.count("\n", 0, index) + 1
    column = index - text.rfind("\n", 0, index)
    return f"line {line}, column {column}"


def text_input(proposal: object, what: str, max_bytes: int | None) -> str | Issue:
    """The proposal as checkable text, or the issue that stops it before any parser runs.

    Bytes must be UTF-8 and text valid Unicode (no lone surrogates); NUL characters are
    refused (no source language here takes them, and C-based tools cut the text there);
    anything larger than ``max_bytes`` in UTF-8 is refused before it is decoded or parsed,
    so a parser's cost stays bounded whatever the model returns.
    """
    if isinstance(proposal, bytes | bytearray):
        data = bytes(proposal)
        if max_bytes is not None and len(data) > max_bytes:
            return too_large(len(data), max_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            return Issue(code="not_utf8", location=f"byte {exc.start}",
                         message=f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                                 f"offset {exc.start}); return UTF-8 text")
    elif isinstance(proposal, str):
        text = proposal
        if max_bytes is not None and len(text) > max_bytes:  # ≥ 1 byte a character
            return too_large(text_size(text), max_bytes)
        if not text.isascii():
            try:
                size = len(text.encode("utf-8"))
            except UnicodeEncodeError as exc:
                return Issue(code="not_utf8", location=where(text, exc.start),
                             message=f"{what} holds a lone surrogate (U+{ord(text[exc.start]):04X}"
                                     "), which is not valid Unicode text; return UTF-8 text")
            if max_bytes is not None and size > max_bytes:
                return too_large(size, max_bytes)
    else:
        return not_text(proposal, what)
    nul = text.find("\x00")
    if nul >= 0:
        return Issue(code="nul_character", location=where(text, nul),
                     message=f"{what} holds a NUL character; remove it")
    return text


def short(value: object, limit: int) -> str:
    """``str(value)`` cut to ``limit`` characters, for any value: an integer too long to print
    (Python refuses over 4300 digits) or a value nested too deeply is named, not printed.

    Text that must be cut is redacted first (a secret cut short may no longer match a
    redaction rule); text that fits is returned whole, for the redaction of whatever
    stores or exports it, so the scan of a plan pays nothing for its many short values.
    """
    if isinstance(value, int) and value.bit_length() > 4096:
        return f"<{value.bit_length()}-bit integer>"[:limit]
    try:
        text = str(value)
    except (ValueError, RecursionError):
        text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    from closedloop._redact import redact_text  # only when quoting a value

    return redact_text(text)[:limit]


def not_text(proposal: object, what: str) -> Issue:
    """The issue for a proposal that should have been text."""
    return Issue(
        code="not_text",
        message=f"expected {what} as text, got a {type(proposal).__name__}; return the source text",
    )
