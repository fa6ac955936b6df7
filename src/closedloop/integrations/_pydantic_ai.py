"""Pydantic AI adapter: guarded tools, closed-loop output validation, ``ModelRetry`` feedback.

- :func:`pydantic_ai_tool` makes a ``pydantic_ai.Tool`` of a guarded function
  (:func:`closedloop.tool`): each call the model makes is a closed-loop step; invalid
  arguments and an outcome that does not match the intent come back to the model as a
  ``ModelRetry`` carrying closedloop's feedback (the model corrects itself, within the tool's
  retries), a call that was not executed (suggest-only, awaiting approval, rejected, paused)
  as the tool's result, and a refusal (the run's budget spent, the run halted, too many
  invalid calls) raises :class:`~closedloop.ToolRefused`, which ends the agent's run.
- :func:`pydantic_ai_output_validator` makes an output validator
  (``agent.output_validator(...)``) of closedloop validators: each output the model returns
  is a closed-loop step (task type ``output``); blocking issues come back as a
  ``ModelRetry`` with the re-ask feedback, a critical one raises :class:`~closedloop.Blocked`.

The agent's own model calls count against the open :class:`~closedloop.Run` when its client is
instrumented: ``OpenAIChatModel(..., provider=OpenAIProvider(openai_client=
instrument_openai(AsyncOpenAI(...))))``. See docs/frameworks.md.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from pydantic_ai import ModelRetry, Tool

from closedloop._errors import ConfigError
from closedloop._events import ErrorType
from closedloop._verdict import render_feedback
from closedloop.loop import DEFAULT, Attempt, Loop, StepResult
from closedloop.runs import GuardedTool, ToolFeedback, tool

__all__ = ["pydantic_ai_output_validator", "pydantic_ai_tool", "retry_or_result"]

_RETRY = frozenset({ErrorType.VALIDATION.value, ErrorType.VERIFICATION.value,
                    ErrorType.VERIFICATION_UNKNOWN.value})


def retry_or_result(answer: Any) -> Any:
    """What a guarded tool answered, in Pydantic AI's terms: its result, or a ``ModelRetry``
    raised with closedloop's feedback when the model should correct its call (invalid
    arguments, an outcome that did not match). Feedback about a call that was not executed
    (approval, suggest-only, paused) or was blocked by a critical issue is the tool's result:
    retrying would not help."""
    if isinstance(answer, ToolFeedback) and answer.error_type in _RETRY:
        raise ModelRetry(str(answer))
    return answer


def _guarded(fn: Callable[..., Any], options: dict[str, Any]) -> tuple[Callable[..., Any],
                                                                      GuardedTool]:
    guarded = getattr(fn, "closedloop_tool", None)
    if isinstance(guarded, GuardedTool):
        if options:
            raise ConfigError(f"{guarded.name} is already a guarded tool: give the options to "
                              "@closedloop.tool, not here")
        return fn, guarded
    wrapped = tool(**options)(fn)
    return wrapped, wrapped.closedloop_tool  # type: ignore[attr-defined]


def pydantic_ai_tool(
    fn: Callable[..., Any],
    *,
    max_retries: int | None = None,
    **options: Any,
) -> Tool[Any]:
    """A ``pydantic_ai.Tool`` of ``fn``, guarded by closedloop.

    ``fn`` is a function decorated with :func:`closedloop.tool`, or a plain function guarded
    here with ``options`` (those of :func:`closedloop.tool`). The tool keeps the function's
    name, docstring and signature (Pydantic AI builds the JSON schema from them); it takes no
    ``RunContext``. ``max_retries`` (default: the guarded tool's ``max_invalid``) bounds the
    ``ModelRetry`` round trips Pydantic AI allows this tool.
    """
    func, guarded = _guarded(fn, options)
    wrapper: Callable[..., Any]
    if guarded.is_async:
        @functools.wraps(func)
        async def call_async(*args: Any, **kwargs: Any) -> Any:
            return retry_or_result(await func(*args, **kwargs))
        wrapper = call_async
    else:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            return retry_or_result(func(*args, **kwargs))
        wrapper = call
    return Tool(wrapper, takes_ctx=False, name=guarded.name,
                max_retries=guarded.max_invalid if max_retries is None else max_retries)


def _echo(output: Any, attempt: Attempt) -> Any:
    return output


def pydantic_ai_output_validator(
    *validators: Callable[..., Any],
    task_type: str = "output",
    store: Any = DEFAULT,
    guards: Any = DEFAULT,
    telemetry: Any = DEFAULT,
    labels: dict[str, str] | None = None,
) -> Callable[[Any], Awaitable[Any]]:
    """An output validator for ``agent.output_validator(...)`` running closedloop validators.

    Each output is one closed-loop step of ``task_type`` (recorded in ``store``; inside a
    :class:`~closedloop.Run`, part of it) whose proposal is the output and whose validators
    are ``validators`` (each ``validator(output)``, any verdict-like return, as for a
    :class:`~closedloop.Loop`). Blocking issues raise ``ModelRetry`` with closedloop's re-ask
    feedback (:func:`closedloop.render_feedback`); a critical issue raises
    :class:`~closedloop.Blocked` (no re-ask), a refusal of the step (the run's budget spent,
    the run or task type halted) its :class:`~closedloop.StepFailed`. The returned function
    has the step's loop as ``.loop``.
    """
    if not validators:
        raise ConfigError("pydantic_ai_output_validator needs at least one validator")
    loop = Loop(_echo, task_type=task_type, validators=validators, max_attempts=1,
                agent_id="pydantic_ai:output", store=store, guards=guards,
                telemetry=telemetry, labels=labels)

    async def validate_output(output: Any) -> Any:
        return output_answer(await loop.arun(output), output)

    validate_output.loop = loop  # type: ignore[attr-defined]
    return validate_output


def output_answer(result: StepResult[Any, Any], output: Any) -> Any:
    """The output when the step passed; else ``ModelRetry`` with the feedback, or a raise."""
    if result.ok:
        return output
    if result.error_type is ErrorType.VALIDATION:
        raise ModelRetry(render_feedback(result.validation))
    return result.raise_for_outcome()


def guarded_tools(fns: Iterable[Callable[..., Any]]) -> list[Tool[Any]]:
    """:func:`pydantic_ai_tool` of each guarded function (``Agent(tools=guarded_tools(...))``)."""
    return [pydantic_ai_tool(fn) for fn in fns]
