"""Chat-completions replies in OpenAI's wire format, for the framework adapters' tests."""

from __future__ import annotations

import json
from typing import Any

from integrations._wire_server import Reply

USAGE = {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}


def text_reply(content: str, *, model: str = "gpt-4o-2024-08-06") -> Reply:
    """A completion whose message is ``content``."""
    return Reply(body={
        "id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": content}}],
        "usage": USAGE})


def tool_reply(*calls: tuple[str, dict[str, Any]], model: str = "gpt-4o-2024-08-06",
               first_id: int = 1) -> Reply:
    """A completion that calls ``calls`` (``(tool name, arguments)``), ids call_1, call_2..."""
    tool_calls = [{"id": f"call_{n}", "type": "function",
                   "function": {"name": name, "arguments": json.dumps(args)}}
                  for n, (name, args) in enumerate(calls, start=first_id)]
    return Reply(body={
        "id": "chatcmpl-t", "object": "chat.completion", "created": 1, "model": model,
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                     "message": {"role": "assistant", "content": None,
                                 "tool_calls": tool_calls}}],
        "usage": USAGE})


def tool_results(request: dict[str, Any]) -> dict[str, str]:
    """The tool results a chat request sends back, by tool call id."""
    return {m["tool_call_id"]: m["content"] for m in request["messages"]
            if m.get("role") == "tool"}


def user_texts(request: dict[str, Any]) -> list[str]:
    """The user messages' texts of a chat request."""
    texts = []
    for m in request["messages"]:
        if m.get("role") != "user":
            continue
        content = m["content"]
        if isinstance(content, str):
            texts.append(content)
        else:
            texts += [part.get("text", "") for part in content]
    return texts


RESPONSES_USAGE: dict[str, Any] = {
    "input_tokens": 30, "input_tokens_details": {"cached_tokens": 10}, "output_tokens": 4,
    "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 34}


def _response(output: list[dict[str, Any]]) -> Reply:
    return Reply(body={
        "id": "resp_t", "object": "response", "created_at": 1, "status": "completed",
        "model": "gpt-4.1-2025-04-14", "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [], "output": output, "usage": RESPONSES_USAGE})


def response_text(text: str) -> Reply:
    """A Responses API response whose output is the message ``text``."""
    return _response([{"type": "message", "id": "msg_t", "role": "assistant",
                       "status": "completed",
                       "content": [{"type": "output_text", "text": text, "annotations": []}]}])


def response_calls(*calls: tuple[str, dict[str, Any]], first_id: int = 1) -> Reply:
    """A Responses API response calling ``calls`` (``(tool name, arguments)``)."""
    return _response([{"type": "function_call", "id": f"fc_{n}", "call_id": f"call_{n}",
                       "name": name, "arguments": json.dumps(args), "status": "completed"}
                      for n, (name, args) in enumerate(calls, start=first_id)])


def streamed(reply: Reply) -> Reply:
    """The Responses API response ``reply`` sent as a stream: ``response.created``, then each
    output item added and done, then ``response.completed`` carrying the whole response."""
    assert reply.body is not None
    whole = reply.body
    start = {**whole, "status": "in_progress", "output": [], "usage": None}
    events: list[dict[str, Any]] = [{"type": "response.created", "response": start}]
    for n, item in enumerate(whole["output"]):
        events += [{"type": "response.output_item.added", "output_index": n, "item": item},
                   {"type": "response.output_item.done", "output_index": n, "item": item}]
    events.append({"type": "response.completed", "response": whole})
    return Reply(events=[(e["type"], {**e, "sequence_number": n})
                         for n, e in enumerate(events)])


def call_outputs(request: dict[str, Any]) -> dict[str, str]:
    """The function-call outputs a Responses API request sends back, by call id."""
    return {item["call_id"]: item["output"] for item in request.get("input") or ()
            if isinstance(item, dict) and item.get("type") == "function_call_output"}
