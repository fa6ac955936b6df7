"""The official openai SDK, instrumented, talking HTTP to a local server in OpenAI's format."""

from __future__ import annotations

from typing import Any

import openai
import pytest

import closedloop as cl
from closedloop.integrations import instrument_openai
from closedloop.telemetry import MemoryExporter, Telemetry
from integrations._wire_server import Reply, WireServer

Spans = tuple[Telemetry, MemoryExporter]
MESSAGES = [{"role": "user", "content": "my key is sk-proj-" + "Q" * 40}]


def completion(content: str = "hi") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
                      "prompt_tokens_details": {"cached_tokens": 8}}}


def chunk(**fields: Any) -> Any:
    return {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini-2024-07-18", "choices": [], **fields}


STREAM: list[tuple[str | None, Any]] = [
    (None, chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": "he"},
                           "finish_reason": None}])),
    (None, chunk(choices=[{"index": 0, "delta": {"content": "llo"}, "finish_reason": "stop"}])),
    (None, chunk(usage={"prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32})),
    (None, "[DONE]"),
]


def client(wire: WireServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{wire.url}/v1", api_key="test", max_retries=0, **kw)


def test_a_completion_records_a_gen_ai_span(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=completion()))
    c = instrument_openai(client(wire), telemetry=pipeline)
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.2)
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.name == "chat gpt-4o"
    assert span.kind == 2
    assert span.attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4o", "gen_ai.request.temperature": 0.2,
        "gen_ai.response.model": "gpt-4o-2024-08-06", "gen_ai.response.id": "chatcmpl-1",
        "gen_ai.response.finish_reasons": ["stop"], "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 5, "gen_ai.usage.cache_read.input_tokens": 8}


def test_captured_prompts_are_redacted_in_the_store(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=completion("reply to ops@example.com")))
    c = instrument_openai(client(wire), telemetry=pipeline)
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert "QQQQ" not in span.content["gen_ai.input.messages"]
    assert "[REDACTED:openai_key]" in span.content["gen_ai.input.messages"]
    assert span.content["gen_ai.output.messages"] == "reply to [REDACTED:email]"


def test_usage_is_added_to_the_running_step(wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(Reply(body=completion()), Reply(body=completion()))
    c = instrument_openai(client(wire))

    def agent(task: str, attempt: cl.Attempt) -> str:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return task

    result = cl.Loop(agent, task_type="t", store=memory_store).run("x")
    assert result.event is not None
    assert (result.event.input_tokens, result.event.output_tokens) == (24, 10)
    # the model that answered, not the alias asked for; cache reads of both calls
    assert (result.event.model, result.event.provider) == ("gpt-4o-2024-08-06", "openai")
    assert result.event.cached_input_tokens == 16


def test_a_call_outside_any_step_counts_against_the_runs_token_budget(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(Reply(body=completion()), Reply(body=completion()))
    c = instrument_openai(client(wire))
    step = cl.Loop(lambda task, attempt: task, task_type="t", store=memory_store, guards=())
    with cl.Run(store=memory_store, max_tokens=30) as run:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # the agent's own call
        assert step.run(1).ok
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        refused = step.run(2)
    assert (run.input_tokens, run.output_tokens) == (24, 10)
    assert refused.outcome is cl.Outcome.BUDGET_EXCEEDED


def test_a_call_that_failed_still_names_the_model_asked_for(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(Reply(status=500, body={"error": {"message": "down"}}))
    c = instrument_openai(client(wire))

    def agent(task: str, attempt: cl.Attempt) -> str:
        with pytest.raises(openai.InternalServerError):
            c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return task

    result = cl.Loop(agent, task_type="t", store=memory_store).run("x")
    assert result.event is not None
    assert (result.event.model, result.event.provider) == ("gpt-4o", "openai")


def test_a_stream_passes_chunks_through_and_records_usage(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=STREAM))
    c = instrument_openai(client(wire), telemetry=pipeline)
    stream = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                       stream_options={"include_usage": True})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert text == "hello"
    assert span.attributes["gen_ai.usage.input_tokens"] == 30
    assert span.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert span.content["gen_ai.output.messages"] == "hello"


async def test_an_async_stream_records_usage(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=STREAM))
    c = instrument_openai(openai.AsyncOpenAI(base_url=f"{wire.url}/v1", api_key="test",
                                             max_retries=0), telemetry=pipeline)
    stream = await c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                             stream=True, stream_options={"include_usage": True})
    n = 0
    async for _ in stream:
        n += 1
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert n == 3
    assert span.attributes["gen_ai.usage.output_tokens"] == 2
    assert span.attributes["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"


async def test_an_async_completion_records_usage(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=completion()))
    c = instrument_openai(openai.AsyncOpenAI(base_url=f"{wire.url}/v1", api_key="test",
                                             max_retries=0), telemetry=pipeline)
    await c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.attributes["gen_ai.usage.input_tokens"] == 12


def test_a_429_is_reported_with_its_retry_after(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    seen: list[tuple[str, float | None]] = []
    wire.script(Reply(status=429, headers={"retry-after": "7"},
                      body={"error": {"message": "slow down", "type": "rate_limit"}}))
    c = instrument_openai(client(wire), telemetry=pipeline,
                          on_rate_limited=lambda key, after: seen.append((key, after)))
    with pytest.raises(openai.RateLimitError):
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert seen == [("openai:gpt-4o", 7.0)]
    assert span.attributes["error.type"] == "429"
    assert span.status == 2


def test_429s_the_sdk_retries_are_reported_too(wire: WireServer) -> None:
    seen: list[tuple[str, float | None]] = []
    wire.script(Reply(status=429, headers={"retry-after-ms": "10"}, body={"error": {}}),
                Reply(body=completion()))
    c = instrument_openai(openai.OpenAI(base_url=f"{wire.url}/v1", api_key="test",
                                        max_retries=1),
                          on_rate_limited=lambda key, after: seen.append((key, after)))
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert seen == [("openai:gpt-4o", 0.01)]


def test_instrumenting_twice_records_once(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=completion()))
    c = instrument_openai(instrument_openai(client(wire), telemetry=pipeline),
                          telemetry=pipeline)
    c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    pipeline.flush(5.0)
    assert len(exporter.finished()) == 1


def test_inside_a_traced_step_the_model_call_is_a_child_of_the_agent_span(
    wire: WireServer, spans: Spans,
) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=completion()))
    c = instrument_openai(client(wire))  # no pipeline given: it follows the running step

    def agent(task: str, attempt: cl.Attempt) -> str:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return task

    cl.Loop(agent, task_type="t", store=None, telemetry=pipeline, agent_id="writer").run("x")
    pipeline.flush(5.0)
    by_name = {s.name: s for s in exporter.finished()}
    assert by_name["chat gpt-4o"].parent_id == by_name["invoke_agent writer"].span_id
    assert by_name["invoke_agent writer"].attributes["gen_ai.usage.input_tokens"] == 12
    assert by_name["closedloop.step"].attributes["closedloop.usage.input_tokens"] == 12


def test_a_completion_fills_the_steps_cost_from_the_price_table(wire: WireServer) -> None:
    wire.script(Reply(body=completion()))
    c = instrument_openai(client(wire))

    def agent(task: str, attempt: cl.Attempt) -> str:
        c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        return task

    event = cl.Loop(agent, task_type="t", store=None).run("x").event
    assert event is not None and event.model == "gpt-4o-2024-08-06"
    # genai-prices: $2.50 per MTok in, $1.25 cached, $10 out (12 in of which 8 cached, 5 out)
    assert event.cost_usd == pytest.approx((4 * 2.5 + 8 * 1.25 + 5 * 10) / 1e6)
