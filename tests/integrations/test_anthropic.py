"""The official anthropic SDK, instrumented, talking HTTP to a local server in Anthropic's
format."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

import closedloop as cl
from closedloop.integrations import instrument_anthropic
from closedloop.telemetry import MemoryExporter, Telemetry
from integrations._wire_server import Reply, WireServer

Spans = tuple[Telemetry, MemoryExporter]
MESSAGES = [{"role": "user", "content": "hello"}]
USAGE = {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 30,
         "cache_creation_input_tokens": 2}
MESSAGE = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-test-1",
           "content": [{"type": "text", "text": "hi there"}], "stop_reason": "end_turn",
           "stop_sequence": None, "usage": USAGE}


def stream_events() -> list[tuple[str | None, Any]]:
    start = {**MESSAGE, "content": [], "stop_reason": None,
             "usage": {"input_tokens": 10, "output_tokens": 1, "cache_read_input_tokens": 30}}
    return [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hi "}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "there"}}),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                           "usage": {"output_tokens": 7}}),
        ("message_stop", {"type": "message_stop"}),
    ]


def client(wire: WireServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=wire.url, api_key="test", max_retries=0)


def test_a_message_records_usage_including_cache(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(body=MESSAGE))
    c = instrument_anthropic(client(wire), telemetry=pipeline)
    c.messages.create(model="claude-test-1", max_tokens=64, messages=MESSAGES,
                      system="be brief")
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    a = span.attributes
    assert (a["gen_ai.provider.name"], a["gen_ai.request.max_tokens"]) == ("anthropic", 64)
    assert a["gen_ai.usage.input_tokens"] == 42  # 10 fresh + 30 cache reads + 2 cache writes
    assert a["gen_ai.usage.cache_read.input_tokens"] == 30
    assert a["gen_ai.usage.output_tokens"] == 5
    assert a["gen_ai.response.finish_reasons"] == ["end_turn"]
    assert span.content["gen_ai.system_instructions"] == "be brief"


def test_usage_model_and_cache_reads_are_added_to_the_running_step(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(Reply(body=MESSAGE), Reply(events=stream_events()))
    c = instrument_anthropic(client(wire))

    def agent(task: str, attempt: cl.Attempt) -> str:
        c.messages.create(model="claude-test", max_tokens=64, messages=MESSAGES)
        with c.messages.create(model="claude-test", max_tokens=64, messages=MESSAGES,
                               stream=True) as stream:
            for _ in stream:
                pass
        return task

    event = cl.Loop(agent, task_type="t", store=memory_store).run("x").event
    assert event is not None
    assert (event.model, event.provider) == ("claude-test-1", "anthropic")
    assert event.input_tokens == 42 + 40 and event.cached_input_tokens == 30 + 30
    assert event.output_tokens == 5 + 7


def test_a_stream_records_final_usage_and_stop_reason(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=stream_events()))
    c = instrument_anthropic(client(wire), telemetry=pipeline)
    with c.messages.create(model="claude-test-1", max_tokens=64, messages=MESSAGES,
                           stream=True) as stream:
        kinds = [event.type for event in stream]
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert span.attributes["gen_ai.usage.output_tokens"] == 7
    assert span.attributes["gen_ai.usage.input_tokens"] == 40
    assert span.attributes["gen_ai.response.finish_reasons"] == ["max_tokens"]
    assert span.content["gen_ai.output.messages"] == "hi there"


async def test_an_async_stream_records_usage(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=stream_events()))
    c = instrument_anthropic(anthropic.AsyncAnthropic(base_url=wire.url, api_key="test",
                                                      max_retries=0), telemetry=pipeline)
    stream = await c.messages.create(model="claude-test-1", max_tokens=64,
                                     messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.attributes["gen_ai.usage.output_tokens"] == 7


def test_a_429_is_reported_with_its_retry_after(wire: WireServer, spans: Spans) -> None:
    pipeline, _ = spans
    seen: list[tuple[str, float | None]] = []
    wire.script(Reply(status=429, headers={"retry-after": "2"},
                      body={"type": "error", "error": {"type": "rate_limit_error",
                                                       "message": "slow"}}))
    c = instrument_anthropic(client(wire), telemetry=pipeline,
                             on_rate_limited=lambda key, after: seen.append((key, after)))
    with pytest.raises(anthropic.RateLimitError):
        c.messages.create(model="claude-test-1", max_tokens=8, messages=MESSAGES)
    assert seen == [("anthropic:claude-test-1", 2.0)]


async def test_an_async_client_reports_429s(wire: WireServer) -> None:
    seen: list[tuple[str, float | None]] = []
    wire.script(Reply(status=429, headers={"retry-after": "1"}, body={"type": "error"}))
    c = instrument_anthropic(anthropic.AsyncAnthropic(base_url=wire.url, api_key="test",
                                                      max_retries=0),
                             on_rate_limited=lambda key, after: seen.append((key, after)))
    with pytest.raises(anthropic.RateLimitError):
        await c.messages.create(model="claude-test-2", max_tokens=8, messages=MESSAGES)
    assert seen == [("anthropic:claude-test-2", 1.0)]


def test_a_message_is_priced_with_cache_reads_and_writes_at_their_rates(
        wire: WireServer, memory_store: cl.Store) -> None:
    cl.configure(store=memory_store, prices={"anthropic:claude-test-*": {
        "input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75}})
    wire.script(Reply(body=MESSAGE))
    c = instrument_anthropic(client(wire))

    def agent(task: str, attempt: cl.Attempt) -> str:
        c.messages.create(model="claude-test", max_tokens=64, messages=MESSAGES)
        return task

    event = cl.Loop(agent, task_type="t").run("x").event
    assert event is not None
    # 10 fresh + 30 cache reads + 2 cache writes in, 5 out
    assert event.cost_usd == pytest.approx((10 * 3.0 + 30 * 0.3 + 2 * 3.75 + 5 * 15.0) / 1e6)


def test_the_stream_helper_records_usage_at_the_end_of_the_stream(
        wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=stream_events()))
    c = instrument_anthropic(client(wire), telemetry=pipeline)
    with c.messages.stream(model="claude-test-1", max_tokens=64, messages=MESSAGES,
                           system="be brief") as stream:
        text = "".join(stream.text_stream)
        # the stream ended: the call is recorded before the block exits
        pipeline.flush(5.0)
        (span,) = exporter.finished()
        final = stream.get_final_message()
    assert text == "hi there" and final.usage.output_tokens == 7
    a = span.attributes
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (40, 7)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 30
    assert a["gen_ai.response.finish_reasons"] == ["max_tokens"]
    assert a["gen_ai.response.model"] == "claude-test-1"
    assert span.content["gen_ai.output.messages"] == "hi there"
    assert span.content["gen_ai.system_instructions"] == "be brief"


def test_the_stream_helper_adds_usage_to_the_step_and_counts_against_the_run(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(Reply(events=stream_events()), Reply(events=stream_events()))
    c = instrument_anthropic(client(wire))

    def agent(task: str, attempt: cl.Attempt) -> str:
        with c.messages.stream(model="claude-test", max_tokens=64, messages=MESSAGES) as s:
            return str(s.get_final_text())

    with cl.Run(store=memory_store, max_tokens=100) as run:
        with c.messages.stream(model="claude-test", max_tokens=64, messages=MESSAGES) as s:
            s.until_done()  # the agent's own call: 47 tokens for the run
        result = cl.Loop(agent, task_type="t", store=memory_store).run("x")
    assert result.proposal == "hi there" and result.event is not None
    assert (result.event.model, result.event.provider) == ("claude-test-1", "anthropic")
    assert (result.event.input_tokens, result.event.output_tokens) == (40, 7)
    assert result.event.cached_input_tokens == 30
    assert (run.input_tokens, run.output_tokens) == (80, 14)


def test_a_stream_helper_left_early_still_ends_its_span(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=stream_events()))
    c = instrument_anthropic(client(wire), telemetry=pipeline)
    with c.messages.stream(model="claude-test-1", max_tokens=64, messages=MESSAGES) as stream:
        first = next(iter(stream))
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert first.type == "message_start"
    assert span.attributes["gen_ai.usage.input_tokens"] == 40  # what message_start said


def test_a_stream_helper_whose_request_fails_is_an_error_span(
        wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(status=529, body={"type": "error", "error": {
        "type": "overloaded_error", "message": "busy"}}))
    c = instrument_anthropic(client(wire), telemetry=pipeline)
    with pytest.raises(anthropic.APIStatusError), c.messages.stream(
            model="claude-test-1", max_tokens=64, messages=MESSAGES):
        pass
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert span.attributes["error.type"] == "529"


async def test_the_async_stream_helper_records_usage(wire: WireServer, spans: Spans) -> None:
    pipeline, exporter = spans
    wire.script(Reply(events=stream_events()))
    c = instrument_anthropic(anthropic.AsyncAnthropic(base_url=wire.url, api_key="test",
                                                      max_retries=0), telemetry=pipeline)
    async with c.messages.stream(model="claude-test-1", max_tokens=64,
                                 messages=MESSAGES) as stream:
        text = await stream.get_final_text()
    pipeline.flush(5.0)
    (span,) = exporter.finished()
    assert text == "hi there"
    assert span.attributes["gen_ai.usage.output_tokens"] == 7
    assert span.attributes["gen_ai.response.finish_reasons"] == ["max_tokens"]
