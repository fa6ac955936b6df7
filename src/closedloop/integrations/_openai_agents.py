"""OpenAI Agents SDK adapter: guarded function tools, tool guardrails, tracing joined.

- :func:`agents_function_tool` makes an SDK ``FunctionTool`` of a guarded function
  (:func:`closedloop.tool`): each call the model makes is a closed-loop step; closedloop's
  feedback (invalid arguments, an outcome that did not match, a call not executed) is the
  tool's result the model reads, and a refusal (the run's budget spent, the run halted, too
  many invalid calls) stops ``Runner.run``: it raises the SDK's ``UserError`` whose
  ``__cause__`` is the :class:`~closedloop.ToolRefused` (the :class:`~closedloop.Run` ends
  as the refusal says, not in error).
- :func:`agents_input_guardrail` makes a tool *input* guardrail of closedloop validators, for
  the SDK's own ``@function_tool`` functions: each call's arguments are one closed-loop step
  (recorded, part of the open run); blocking issues reject the call with closedloop's
  feedback as the message to the model, a critical issue trips the guardrail (the SDK raises
  ``ToolInputGuardrailTripwireTriggered``). :func:`agents_output_guardrail` checks a tool's
  output with closedloop verifiers (``verifier(arguments, output)``), replacing a mismatching
  output with the differences.
- :class:`ClosedLoopTraceProcessor` (``agents.add_trace_processor(...)``) joins the traces:
  every SDK trace started inside a :class:`~closedloop.Run` carries ``closedloop.run_id`` in
  its metadata, and every SDK span with metadata (agent, response, generation spans) carries
  ``closedloop.run_id`` and, inside a closed-loop step, ``closedloop.step_id``.

The agent's model calls count against the open run when its client is instrumented:
``agents.set_default_openai_client(instrument_openai(AsyncOpenAI()))`` (the Responses API and
chat completions both are, ``Runner.run_streamed``'s streamed calls too: the SDK streams
through ``responses.with_streaming_response``, whose parsed stream the instrumentation reads).
See docs/frameworks.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from agents import FunctionTool, RunContextWrapper, function_tool
from agents.tool import default_tool_error_function
from agents.tool_guardrails import (
    ToolGuardrailFunctionOutput,
    ToolInputGuardrail,
    ToolInputGuardrailData,
    ToolOutputGuardrail,
    ToolOutputGuardrailData,
)
from agents.tracing import Span, Trace, TracingProcessor

from closedloop._errors import ConfigError, ToolRefused
from closedloop._events import ErrorType
from closedloop._verdict import Verdict, as_verdict
from closedloop.loop import DEFAULT, Attempt, Loop, current_run_id, current_step_id
from closedloop.runs import GuardedTool, tool

__all__ = [
    "ClosedLoopTraceProcessor",
    "agents_function_tool",
    "agents_input_guardrail",
    "agents_output_guardrail",
]


def _refusals_propagate(ctx: RunContextWrapper[Any], error: Exception) -> str:
    """The SDK's failure function, except that a closedloop refusal stops the agent."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ToolRefused):
            raise cause
        cause = cause.__cause__ or cause.__context__
    return default_tool_error_function(ctx, error)


def agents_function_tool(fn: Callable[..., Any], **options: Any) -> FunctionTool:
    """An Agents SDK ``FunctionTool`` of ``fn``, guarded by closedloop.

    ``fn`` is a function decorated with :func:`closedloop.tool` (or a plain function, guarded
    here with the :func:`closedloop.tool` options among ``options``); the other ``options``
    go to ``agents.function_tool`` (``tool_input_guardrails``, ``timeout``, ...). The tool
    keeps the function's name, docstring and signature. closedloop's
    :class:`~closedloop.ToolFeedback` is the tool's result the model reads; a
    :class:`~closedloop.ToolRefused` stops ``Runner.run`` (as the cause of the SDK's
    ``UserError``) instead of going to the model as an error message; the function's own
    exceptions go through ``failure_error_function`` (default: the SDK's) as usual.
    """
    guarded = getattr(fn, "closedloop_tool", None)
    sdk_options = {k: v for k, v in options.items() if k not in _GUARD_OPTIONS}
    guard_options = {k: v for k, v in options.items() if k in _GUARD_OPTIONS}
    if isinstance(guarded, GuardedTool):
        if guard_options:
            raise ConfigError(f"{guarded.name} is already a guarded tool: give "
                              f"{', '.join(sorted(guard_options))} to @closedloop.tool")
        func = fn
    else:
        func = tool(**guard_options)(fn)
    failure = sdk_options.pop("failure_error_function", default_tool_error_function)

    def on_failure(ctx: RunContextWrapper[Any], error: Exception) -> Any:
        _refusals_propagate(ctx, error)
        return failure(ctx, error) if failure is not None else None

    return function_tool(func, failure_error_function=on_failure, **sdk_options)


_GUARD_OPTIONS = frozenset({
    "name", "task_type", "description", "validators", "verifiers", "compensate",
    "verify_compensation", "autonomy", "approver", "irreversible", "risk", "approve_above",
    "max_invalid", "check_types", "labels", "store", "guards", "telemetry", "runtime"})


def _arguments(data: ToolInputGuardrailData) -> dict[str, Any]:
    try:
        parsed = json.loads(data.context.tool_arguments or "{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _echo(arguments: Any, attempt: Attempt) -> Any:
    return arguments


def agents_input_guardrail(
    *validators: Callable[..., Any],
    task_type: str | None = None,
    store: Any = DEFAULT,
    guards: Any = DEFAULT,
    telemetry: Any = DEFAULT,
    labels: dict[str, str] | None = None,
) -> ToolInputGuardrail[Any]:
    """A tool input guardrail (``function_tool(tool_input_guardrails=[...])``) running
    closedloop validators on each call's arguments (``validator(arguments: dict)``).

    Each call is one closed-loop step of ``task_type`` (default ``"tool_arguments"``; give
    one per tool to tell them apart), recorded in ``store`` and part of the open run.
    Blocking issues: ``reject_content`` with closedloop's feedback (the model reads it
    instead of a result and corrects its call); a critical issue or a refused step:
    ``raise_exception`` (the SDK raises ``ToolInputGuardrailTripwireTriggered``), with the
    step's result as ``output_info``.
    """
    if not validators:
        raise ConfigError("agents_input_guardrail needs at least one validator")
    loop = Loop(_echo, task_type=task_type or "tool_arguments", validators=validators,
                max_attempts=1, agent_id="openai_agents:tool_input", store=store,
                guards=guards, telemetry=telemetry, labels=labels)

    async def closedloop_arguments(data: ToolInputGuardrailData) -> ToolGuardrailFunctionOutput:
        result = await loop.arun(_arguments(data))
        if result.ok:
            return ToolGuardrailFunctionOutput.allow(output_info=result)
        if result.error_type is ErrorType.VALIDATION:
            name = data.context.tool_name
            lines = [f"closedloop: {name} was not called: its arguments are invalid."]
            lines += [f"- {v.check or 'check'}: {i.render()}" for v in result.validation
                      for i in v.blocking_issues]
            lines.append(f"Fix the arguments and call {name} again.")
            return ToolGuardrailFunctionOutput.reject_content("\n".join(lines),
                                                              output_info=result)
        return ToolGuardrailFunctionOutput.raise_exception(output_info=result)

    guardrail = ToolInputGuardrail[Any](guardrail_function=closedloop_arguments,
                                        name="closedloop")
    guardrail.loop = loop  # type: ignore[attr-defined]
    return guardrail


def agents_output_guardrail(*verifiers: Callable[..., Any]) -> ToolOutputGuardrail[Any]:
    """A tool output guardrail running closedloop verifiers (``verifier(arguments, output)``,
    any verdict-like return) on each call's output. A mismatch (or a verifier that could not
    tell) replaces the output with the differences (``reject_content``); a critical issue
    trips the guardrail."""
    if not verifiers:
        raise ConfigError("agents_output_guardrail needs at least one verifier")

    def closedloop_outcome(data: ToolOutputGuardrailData) -> ToolGuardrailFunctionOutput:
        arguments = _arguments(data)
        verdicts: list[Verdict] = [
            as_verdict(v(arguments, data.output), getattr(v, "__name__", "verifier"))
            for v in verifiers]
        failing = [v for v in verdicts if not v.passed]
        if not failing:
            return ToolGuardrailFunctionOutput.allow(output_info=verdicts)
        if any(i.severity.name == "CRITICAL" for v in failing for i in v.issues):
            return ToolGuardrailFunctionOutput.raise_exception(output_info=verdicts)
        lines = [f"closedloop: {data.context.tool_name} ran, but its outcome does not match "
                 "the intent:"]
        for v in failing:
            if v.unknown is not None:
                lines.append(f"- {v.check}: could not check the outcome: {v.unknown}")
            lines += [f"- {v.check}: {i.render()}" for i in v.blocking_issues]
        return ToolGuardrailFunctionOutput.reject_content("\n".join(lines),
                                                          output_info=verdicts)

    return ToolOutputGuardrail[Any](guardrail_function=closedloop_outcome, name="closedloop")


class ClosedLoopTraceProcessor(TracingProcessor):
    """Joins the Agents SDK's traces to closedloop's runs and steps.

    Add it with ``agents.add_trace_processor(ClosedLoopTraceProcessor())`` (next to the SDK's
    exporter) or ``set_trace_processors([...])``. It exports nothing itself: it writes
    ``closedloop.run_id`` into the metadata of every SDK trace started inside a
    :class:`~closedloop.Run`, and ``closedloop.run_id`` / ``closedloop.step_id`` into the
    metadata of every SDK span that has metadata (agent, response, generation spans) started
    inside a run / a closed-loop step, so that whatever the SDK's traces go to names the
    closedloop run (``closedloop runs show RUN_ID``) and step.
    """

    def on_trace_start(self, trace: Trace) -> None:
        run_id = current_run_id()
        if run_id is None:
            return
        metadata = getattr(trace, "metadata", None)
        if metadata is None:
            try:
                trace.metadata = metadata = {}  # type: ignore[attr-defined]
            except AttributeError:  # a no-op trace (tracing disabled)
                return
        if isinstance(metadata, dict):
            metadata.setdefault("closedloop.run_id", run_id)

    def on_trace_end(self, trace: Trace) -> None:
        return None

    def on_span_start(self, span: Span[Any]) -> None:
        run_id, step_id = current_run_id(), current_step_id()
        if run_id is None and step_id is None:
            return
        data = span.span_data
        if not hasattr(data, "metadata"):
            return
        metadata = data.metadata
        if metadata is None:
            data.metadata = metadata = {}
        if not isinstance(metadata, dict):
            return
        if run_id is not None:
            metadata.setdefault("closedloop.run_id", run_id)
        if step_id is not None:
            metadata.setdefault("closedloop.step_id", step_id)

    def on_span_end(self, span: Span[Any]) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def force_flush(self) -> None:
        return None
