"""Reading the official ``openai`` SDK's chat completions and Responses API: usage, cache,
model, finish reasons."""

from __future__ import annotations

from typing import Any

from closedloop.integrations._common import ModelCall, given


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


class OpenAIResponsesProvider:
    """``responses.create`` responses and stream events (``gen_ai.provider.name=openai``).

    Usage comes with the response (a stream: with its last event, ``response.completed``,
    ``response.incomplete`` or ``response.failed``); ``input_tokens`` includes the cached
    ones (``input_tokens_details.cached_tokens``). The finish reason is the response's
    ``status`` (``completed``, ``failed``), or why it is incomplete (``max_output_tokens``,
    ``content_filter``).
    """

    name = "openai"

    def _usage(self, call: ModelCall, usage: Any) -> None:
        if usage is None:
            return
        details = getattr(usage, "input_tokens_details", None)
        cached = getattr(details, "cached_tokens", None) or 0
        call.add_usage(getattr(usage, "input_tokens", None) or 0,
                       getattr(usage, "output_tokens", None) or 0, cached)

    def _final(self, call: ModelCall, response: Any) -> None:
        call.response_model = getattr(response, "model", None) or call.response_model
        call.response_id = getattr(response, "id", None) or call.response_id
        self._usage(call, getattr(response, "usage", None))
        incomplete = getattr(response, "incomplete_details", None)
        reason = getattr(incomplete, "reason", None) or getattr(response, "status", None)
        if reason:
            call.finish_reasons.append(str(reason))

    def on_response(self, call: ModelCall, response: Any) -> None:
        self._final(call, response)
        if call.output_parts is not None:
            text = getattr(response, "output_text", None)
            if isinstance(text, str) and text:
                call.output_parts.append(text)

    def on_chunk(self, call: ModelCall, chunk: Any) -> None:
        kind = getattr(chunk, "type", None)
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self._final(call, chunk.response)
        elif kind in ("response.created", "response.in_progress"):
            response = chunk.response
            call.response_model = call.response_model or getattr(response, "model", None)
            call.response_id = call.response_id or getattr(response, "id", None)
        elif kind == "response.output_text.delta" and call.output_parts is not None:
            delta = getattr(chunk, "delta", None)
            if delta:
                call.output_parts.append(delta)

    def request_content(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        text = kwargs.get("input")
        content: dict[str, Any] = {"gen_ai.input.messages": text if given(text) else None}
        if given(kwargs.get("instructions")):
            content["gen_ai.system_instructions"] = kwargs["instructions"]
        return content
