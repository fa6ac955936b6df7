"""OpenAI's Responses API (``client.responses.create``, its stream and the ``responses.stream()``
helper), instrumented, talking HTTP to a local server in OpenAI's format."""

from __future__ import annotations

from typing import Any

import openai
import pytest

import closedloop as cl
from closedloop.integrations import instrument_openai
from closedloop.telemetry import MemoryExporter, Telemetry
from integrations._wire_server import Reply, WireServer

Spans = tuple[Telemetry, MemoryExporter]
USAGE = {"input_tokens": 40, "input_tokens_details": {"cached_tokens": 32},
         "output_tokens": 6, "output_tokens_details": {"reasoning_tokens": 0},
         "total_tokens": 46}


def response(text: str = "hello there", *, status: str = "completed",
             usage: dict[str, Any] | None = USAGE, **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status,
            "model": "gpt-4.1-2025-04-14", "parallel_tool_calls": True, "tool_choice": "auto",
            "tools": [], "output": [{
                "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}],
            "usage": usage, **extra}


def stream_events() -> list[tuple[str | None, Any]]:
    start = response(status="in_progress", usage=None, output=[])
    item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress",
            "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "part": part},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": "hello "},
        {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "delta": "there"},
        {"type": "response.output_text.done", "item_id": "msg_1", "output_index": 0,
         "content_index": 0, "text": "hello there"},
        {"type": "response.completed", "response": response()},
    ]
    return [(e["type"], {**e, "sequence_number": n}) for n, e in enumerate(events)]


def client(wire: WireServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{wire.url}/v1", api_key="test", max_retries=0)


def test_a_response_records_usage_cached_tokens_and_model(wire: WireServer,
                                                          spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=response()))
    c = instrument_openai(client(wire), telemetry=pipeline)
    got = c.responses.create(model="gpt-4.1", input="say hello", instructions="be brief",
                             max_output_tokens=64)
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert got.output_text == "hello there"
    assert wire.requests[0][0] == "/v1/responses"
    assert span.name == "chat gpt-4.1"
    assert span.attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1", "gen_ai.request.max_tokens": 64,
        "gen_ai.response.model": "gpt-4.1-2025-04-14", "gen_ai.response.id": "resp_1",
        "gen_ai.response.finish_reasons": ["completed"], "gen_ai.usage.input_tokens": 40,
        "gen_ai.usage.output_tokens": 6, "gen_ai.usage.cache_read.input_tokens": 32}
    assert span.content == {"gen_ai.input.messages": "say hello",
                            "gen_ai.system_instructions": "be brief",
                            "gen_ai.output.messages": "hello there"}


def test_an_incomplete_response_names_why(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=response(status="incomplete",
                                    incomplete_details={"reason": "max_output_tokens"})))
    c = instrument_openai(client(wire), telemetry=pipeline)
    c.responses.create(model="gpt-4.1", input="say hello")
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.attributes["gen_ai.response.finish_reasons"] == ["max_output_tokens"]


def test_usage_model_and_cache_reads_are_added_to_the_running_step(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(Reply(body=response()), Reply(events=stream_events()))
    c = instrument_openai(client(wire))

    def agent(task: str, attempt: cl.Attempt) -> str:
        c.responses.create(model="gpt-4.1", input=task)
        for _ in c.responses.create(model="gpt-4.1", input=task, stream=True):
            pass
        return task

    event = cl.Loop(agent, task_type="t", store=memory_store).run("x").event
    assert event is not None
    assert (event.input_tokens, event.output_tokens, event.cached_input_tokens) == (80, 12, 64)
    assert (event.model, event.provider) == ("gpt-4.1-2025-04-14", "openai")


def test_a_stream_passes_events_through_and_records_usage_at_its_end(
        wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=stream_events()))
    c = instrument_openai(client(wire), telemetry=pipeline)
    stream = c.responses.create(model="gpt-4.1", input="say hello", stream=True)
    kinds = [event.type for event in stream]
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert len(kinds) == 8
    assert span.attributes["gen_ai.usage.input_tokens"] == 40
    assert span.attributes["gen_ai.usage.cache_read.input_tokens"] == 32
    assert span.attributes["gen_ai.response.finish_reasons"] == ["completed"]
    assert span.content["gen_ai.output.messages"] == "hello there"


def test_the_stream_helper_is_recorded_once(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=stream_events()))
    c = instrument_openai(client(wire), telemetry=pipeline)
    with c.responses.stream(model="gpt-4.1", input="say hello") as stream:
        final = stream.get_final_response()
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert final.output_text == "hello there"
    a = span.attributes
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (40, 6)
    # the helper passes every parameter, most as a placeholder: only the given ones are kept
    assert "gen_ai.request.temperature" not in a
    assert span.content["gen_ai.input.messages"] == "say hello"
    assert "gen_ai.system_instructions" not in span.content


async def test_an_async_response_and_stream_count_against_the_runs_token_budget(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(Reply(body=response()), Reply(events=stream_events()))
    c = instrument_openai(openai.AsyncOpenAI(base_url=f"{wire.url}/v1", api_key="test",
                                             max_retries=0))
    step = cl.Loop(lambda task, attempt: task, task_type="t", store=memory_store, guards=())
    async with cl.Run(store=memory_store, max_tokens=50) as run:
        await c.responses.create(model="gpt-4.1", input="x")  # the agent's own call: 46
        assert (await step.arun(1)).ok
        async for _ in await c.responses.create(model="gpt-4.1", input="x", stream=True):
            pass
        refused = await step.arun(2)
    assert (run.input_tokens, run.output_tokens) == (80, 12)
    assert refused.outcome is cl.Outcome.BUDGET_EXCEEDED


def test_a_failed_response_call_is_an_error_span(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(status=400, body={"error": {"message": "bad input"}}))
    c = instrument_openai(client(wire), telemetry=pipeline)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="gpt-4.1", input="x")
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.attributes["error.type"] == "400"
    assert span.status == 2


def test_raw_and_streamed_responses_are_read_when_parsed(wire: WireServer,
                                                         memory_store: cl.Store) -> None:
    wire.script(Reply(body=response()), Reply(events=stream_events()))
    c = instrument_openai(client(wire))
    with cl.Run(store=memory_store) as run:  # model calls outside any step: the run's usage
        raw = c.responses.with_raw_response.create(model="gpt-4.1", input="x")
        assert raw.parse().output_text == "hello there"
        with c.responses.with_streaming_response.create(model="gpt-4.1", input="x",
                                                        stream=True) as streamed:
            kinds = [event.type for event in streamed.parse()]
    assert kinds[-1] == "response.completed"
    assert (run.input_tokens, run.output_tokens) == (80, 12)
