"""Reading the official ``anthropic`` SDK's messages: usage, cache reads, model, stop reason."""

from __future__ import annotations

from typing import Any

from closedloop.integrations._common import ModelCall, given


class AnthropicProvider:
    """``messages.create`` responses and stream events (``gen_ai.provider.name=anthropic``).

    As the GenAI conventions ask, ``gen_ai.usage.input_tokens`` includes cached input:
    Anthropic's ``input_tokens`` plus cache reads plus cache writes.
    """

    name = "anthropic"

    def _usage(self, call: ModelCall, usage: Any, *, with_input: bool = True) -> None:
        if usage is None:
            return
        cache_read = getattr(usage, "cache_read_input_tokens", None) or 0
        cache_write = getattr(usage, "cache_creation_input_tokens", None) or 0
        input_tokens = ((getattr(usage, "input_tokens", None) or 0) + cache_read + cache_write
                        if with_input else 0)
        call.add_usage(input_tokens, getattr(usage, "output_tokens", None) or 0,
                       cache_read if with_input else 0, cache_write if with_input else 0)

    def on_response(self, call: ModelCall, response: Any) -> None:
        call.response_model = getattr(response, "model", None)
        call.response_id = getattr(response, "id", None)
        self._usage(call, getattr(response, "usage", None))
        if getattr(response, "stop_reason", None):
            call.finish_reasons.append(str(response.stop_reason))
        if call.output_parts is not None:
            call.output_parts.extend(block.text for block in response.content or ()
                                     if getattr(block, "type", None) == "text")

    def on_chunk(self, call: ModelCall, chunk: Any) -> None:
        kind = getattr(chunk, "type", None)
        if kind == "message_start":
            message = chunk.message
            call.response_model = message.model
            call.response_id = message.id
            self._usage(call, message.usage)
        elif kind == "message_delta":
            # message_delta carries the cumulative output count; input came with message_start
            usage = getattr(chunk, "usage", None)
            if usage is not None and usage.output_tokens:
                call.output_tokens = usage.output_tokens
            if chunk.delta.stop_reason:
                call.finish_reasons.append(str(chunk.delta.stop_reason))
        elif kind == "content_block_delta" and call.output_parts is not None:
            text = getattr(chunk.delta, "text", None)
            if text:
                call.output_parts.append(text)

    def request_content(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        content: dict[str, Any] = {"gen_ai.input.messages": kwargs.get("messages")}
        if given(kwargs.get("system")):
            content["gen_ai.system_instructions"] = kwargs["system"]
        return content
