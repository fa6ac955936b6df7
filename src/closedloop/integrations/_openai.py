"""Reading the official ``openai`` SDK's chat completions: usage, cache, model, finish reasons."""

from __future__ import annotations

from typing import Any

from closedloop.integrations._common import ModelCall


class OpenAIProvider:
    """``chat.completions.create`` responses and stream chunks (``gen_ai.provider.name=openai``).

    A stream reports usage only when the request asks for it with
    ``stream_options={"include_usage": True}``; closedloop does not add it on its own, because
    the extra usage-only chunk (with no choices) would surprise code that reads
    ``chunk.choices[0]``.
    """

    name = "openai"

    def _usage(self, call: ModelCall, usage: Any) -> None:
        if usage is None:
            return
        details = getattr(usage, "prompt_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) or 0
        call.add_usage(usage.prompt_tokens or 0, usage.completion_tokens or 0, cached)

    def on_response(self, call: ModelCall, response: Any) -> None:
        call.response_model = getattr(response, "model", None)
        call.response_id = getattr(response, "id", None)
        self._usage(call, getattr(response, "usage", None))
        for choice in getattr(response, "choices", None) or ():
            if choice.finish_reason:
                call.finish_reasons.append(str(choice.finish_reason))
            if call.output_parts is not None and choice.message.content:
                call.output_parts.append(choice.message.content)

    def on_chunk(self, call: ModelCall, chunk: Any) -> None:
        call.response_model = call.response_model or getattr(chunk, "model", None)
        call.response_id = call.response_id or getattr(chunk, "id", None)
        self._usage(call, getattr(chunk, "usage", None))
        for choice in getattr(chunk, "choices", None) or ():
            if choice.finish_reason:
                call.finish_reasons.append(str(choice.finish_reason))
            delta = getattr(choice, "delta", None)
            if call.output_parts is not None and delta is not None and delta.content:
                call.output_parts.append(delta.content)

    def request_content(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"gen_ai.input.messages": kwargs.get("messages")}
