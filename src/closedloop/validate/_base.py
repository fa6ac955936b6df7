"""What every built-in check shares: lazy optional imports, deadlines, bounded text.

A check is any callable returning a :class:`~closedloop.Verdict` with a ``name`` attribute; the
loop calls ``validator(proposal)`` and ``verifier(intent, result)``. Nothing here knows about
the loop, so every check is equally usable on its own.
"""

from __future__ import annotations

import asyncio
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
    """Shorten text quoted back into a message, so feedback stays small."""
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def as_text(proposal: object) -> str | None:
    """The proposal as text (``str``, or ``bytes`` decoded as UTF-8), or ``None`` if it is not."""
    if isinstance(proposal, str):
        return proposal
    if isinstance(proposal, bytes | bytearray):
        return bytes(proposal).decode("utf-8", errors="replace")
    return None


def not_text(proposal: object, what: str) -> Issue:
    """The issue for a proposal that should have been text."""
    return Issue(
        code="not_text",
        message=f"expected {what} as text, got a {type(proposal).__name__}; return the source text",
    )
