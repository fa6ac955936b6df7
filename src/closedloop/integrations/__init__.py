"""Instrumentation for the official ``openai`` and ``anthropic`` Python SDKs.

``instrument_openai(client)`` wraps the client's ``chat.completions.create`` and
``responses.create`` (OpenAI's Responses API; its ``responses.stream()`` helper goes through
it), ``instrument_anthropic(client)`` its ``messages.create`` and the ``messages.stream()``
helper (sync or async client, streaming included):
each call records a GenAI span (``chat <model>``, child of the current span — inside a loop
step, of the agent's span) with model, finish reasons, token usage and cached tokens, and adds
the tokens to :func:`closedloop.current_attempt`. Every HTTP 429 the SDK receives (including
those it retries itself) is reported to ``on_rate_limited(key, retry_after_s)``.

Framework adapters (docs/frameworks.md), each imported on first use so that importing
closedloop never imports a framework: :func:`pydantic_ai_tool` and
:func:`pydantic_ai_output_validator` (Pydantic AI); :func:`agents_function_tool`,
:func:`agents_input_guardrail`, :func:`agents_output_guardrail` and
:class:`ClosedLoopTraceProcessor` (OpenAI Agents SDK); :func:`langgraph_node` (LangGraph).

Not yet instrumented: embeddings, the Realtime/WebSocket APIs, Anthropic's beta namespace
(``client.beta.messages``) and ``with_raw_response`` calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from closedloop.integrations import _common
from closedloop.integrations._anthropic import AnthropicProvider
from closedloop.integrations._common import ModelCall, RateLimitHook, retry_after_seconds
from closedloop.integrations._openai import OpenAIProvider, OpenAIResponsesProvider

if TYPE_CHECKING:
    from closedloop.integrations._langgraph import NodeOutcome, langgraph_node
    from closedloop.integrations._openai_agents import (
        ClosedLoopTraceProcessor,
        agents_function_tool,
        agents_input_guardrail,
        agents_output_guardrail,
    )
    from closedloop.integrations._pydantic_ai import (
        pydantic_ai_output_validator,
        pydantic_ai_tool,
    )
    from closedloop.telemetry import Telemetry

__all__ = [
    "AnthropicProvider",
    "ClosedLoopTraceProcessor",
    "ModelCall",
    "NodeOutcome",
    "OpenAIProvider",
    "OpenAIResponsesProvider",
    "RateLimitHook",
    "agents_function_tool",
    "agents_input_guardrail",
    "agents_output_guardrail",
    "instrument_anthropic",
    "instrument_openai",
    "langgraph_node",
    "pydantic_ai_output_validator",
    "pydantic_ai_tool",
    "retry_after_seconds",
]

# the framework adapters: imported (with their framework) when first used
_ADAPTERS = {
    "._langgraph": ("NodeOutcome", "langgraph_node"),
    "._openai_agents": ("ClosedLoopTraceProcessor", "agents_function_tool",
                        "agents_input_guardrail", "agents_output_guardrail"),
    "._pydantic_ai": ("pydantic_ai_output_validator", "pydantic_ai_tool"),
}

if not TYPE_CHECKING:
    from closedloop._lazy import lazy_exports as _lazy_exports

    __getattr__, __dir__ = _lazy_exports(__name__, _ADAPTERS)


def instrument_openai(
    client: Any,
    *,
    telemetry: Telemetry | None = None,
    on_rate_limited: RateLimitHook | None = None,
    capture_content: bool = True,
) -> Any:
    """Instrument an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client in place; returns it.

    ``telemetry`` is the pipeline spans go to (default: the current step's, else the process
    default; with none, usage is still added to the current attempt). Captured content is
    redacted per destination by the pipeline's exporters. Instrumenting twice is harmless.
    """
    completions = client.chat.completions
    completions.create = _common.wrap_create(completions.create, OpenAIProvider(), "chat",
                                             telemetry, capture_content)
    responses = getattr(client, "responses", None)
    if responses is not None:
        responses.create = _common.wrap_create(responses.create, OpenAIResponsesProvider(),
                                               "chat", telemetry, capture_content)
    if on_rate_limited is not None:
        _common.install_rate_limit_hook(client, "openai", on_rate_limited)
    return client


def instrument_anthropic(
    client: Any,
    *,
    telemetry: Telemetry | None = None,
    on_rate_limited: RateLimitHook | None = None,
    capture_content: bool = True,
) -> Any:
    """Instrument an ``anthropic.Anthropic`` or ``anthropic.AsyncAnthropic`` client in place."""
    messages = client.messages
    provider = AnthropicProvider()
    messages.create = _common.wrap_create(messages.create, provider, "chat", telemetry,
                                          capture_content)
    messages.stream = _common.wrap_stream_helper(messages.stream, provider, "chat", telemetry,
                                                 capture_content)
    if on_rate_limited is not None:
        _common.install_rate_limit_hook(client, "anthropic", on_rate_limited)
    return client
