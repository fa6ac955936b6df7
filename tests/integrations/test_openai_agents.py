"""The OpenAI Agents SDK adapter with the real openai-agents, its model talking HTTP to a local
server in OpenAI's Responses API format."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from agents import (
    Agent,
    OpenAIResponsesModel,
    Runner,
    ToolInputGuardrailTripwireTriggered,
    function_tool,
    set_trace_processors,
)
from agents.exceptions import UserError
from agents.tracing import Span, Trace, TracingProcessor

import closedloop as cl
from closedloop.integrations import (
    ClosedLoopTraceProcessor,
    agents_function_tool,
    agents_input_guardrail,
    agents_output_guardrail,
    instrument_openai,
)
from integrations._chat import (
    RESPONSES_USAGE,
    call_outputs,
    response_calls,
    response_text,
    streamed,
)
from integrations._wire_server import WireServer

BUCKETS: dict[str, str] = {}


class Capture(TracingProcessor):
    """The SDK's traces and spans as an exporter would get them."""

    def __init__(self) -> None:
        self.traces: list[dict[str, Any]] = []
        self.spans: list[dict[str, Any]] = []

    def on_trace_start(self, trace: Trace) -> None:
        pass

    def on_trace_end(self, trace: Trace) -> None:
        exported = trace.export()
        if exported:
            self.traces.append(exported)

    def on_span_start(self, span: Span[Any]) -> None:
        pass

    def on_span_end(self, span: Span[Any]) -> None:
        exported = span.export()
        if exported:
            self.spans.append(exported)

    def shutdown(self) -> None:
        pass

    def force_flush(self) -> None:
        pass


@pytest.fixture(autouse=True)
def _state() -> Iterator[None]:
    BUCKETS.clear()
    yield
    set_trace_processors([])  # never the SDK's exporter to OpenAI's servers


@pytest.fixture
def capture() -> Capture:
    c = Capture()
    set_trace_processors([ClosedLoopTraceProcessor(), c])
    return c


def model(wire: WireServer) -> OpenAIResponsesModel:
    client = instrument_openai(openai.AsyncOpenAI(base_url=f"{wire.url}/v1", api_key="test",
                                                  max_retries=0))
    return OpenAIResponsesModel("gpt-4.1", openai_client=client)


def lowercase_name(call: dict[str, Any]) -> str | None:
    name = call.get("name", "")
    return None if name == name.lower() else f"bucket names are lowercase, got {name!r}"


def bucket_tool(store: cl.Store, **options: Any) -> Any:
    @cl.tool(validators=[lowercase_name], store=store, **options)
    def create_bucket(name: str, region: str = "eu-west-1") -> str:
        """Create a storage bucket."""
        BUCKETS[name] = region
        return f"created {name} in {region}"
    return create_bucket


def run(agent: Agent[Any], prompt: str) -> Any:
    return asyncio.run(Runner.run(agent, prompt))


def test_closedloops_feedback_is_the_tool_result_and_the_model_calls_count_against_the_run(
        wire: WireServer, memory_store: cl.Store, capture: Capture) -> None:
    wire.script(response_calls(("create_bucket", {"name": "Logs"})),
                response_calls(("create_bucket", {"name": "logs"}), first_id=2),
                response_text("created logs"))
    agent = Agent(name="ops", instructions="provision", model=model(wire),
                  tools=[agents_function_tool(bucket_tool(memory_store))])

    async def main() -> tuple[Any, cl.Run]:
        async with cl.Run("provision", store=memory_store) as r:
            return await Runner.run(agent, "make a logs bucket"), r

    result, r = asyncio.run(main())
    assert result.final_output == "created logs"
    assert BUCKETS == {"logs": "eu-west-1"}
    feedback = call_outputs(wire.requests[1][1])["call_1"]
    assert feedback.startswith("closedloop: create_bucket was not called: its arguments are "
                               "invalid")
    assert "bucket names are lowercase, got 'Logs'" in feedback
    assert call_outputs(wire.requests[2][1])["call_2"] == "created logs in eu-west-1"
    # the agent's three model calls (Responses API) are the run's tokens
    per_call = RESPONSES_USAGE["input_tokens"], RESPONSES_USAGE["output_tokens"]
    assert (r.input_tokens, r.output_tokens) == (3 * per_call[0], 3 * per_call[1])
    assert memory_store.flush()
    assert [(e.outcome, e.run_id) for e in memory_store.events()] == [
        ("failed", r.run_id), ("succeeded", r.run_id)]
    # tracing joined: the SDK's trace and its agent spans name the closedloop run
    (trace,) = capture.traces
    assert trace["metadata"]["closedloop.run_id"] == r.run_id
    kinds = {s["span_data"]["type"] for s in capture.spans
             if s.get("metadata", {}).get("closedloop.run_id") == r.run_id}
    assert "agent" in kinds


def test_streamed_runs_model_calls_count_against_the_run_and_its_token_budget(
        wire: WireServer, memory_store: cl.Store, capture: Capture) -> None:
    wire.script(streamed(response_calls(("create_bucket", {"name": "logs"}))),
                streamed(response_calls(("create_bucket", {"name": "more"}), first_id=2)),
                streamed(response_text("never read")))
    agent = Agent(name="ops", instructions="provision", model=model(wire),
                  tools=[agents_function_tool(bucket_tool(memory_store))])
    per_call = RESPONSES_USAGE["input_tokens"] + RESPONSES_USAGE["output_tokens"]

    async def consume(result: Any, kinds: list[str]) -> None:
        async for event in result.stream_events():
            kinds.append(event.type)

    async def main() -> tuple[list[str], cl.Run]:
        kinds: list[str] = []
        # the first model call spends the budget: the tool call it asks for is refused
        async with cl.Run("provision", store=memory_store, max_tokens=per_call) as r:
            result = Runner.run_streamed(agent, "make a logs bucket")
            with pytest.raises(UserError) as raised:
                await consume(result, kinds)
            assert isinstance(raised.value.__cause__, cl.ToolRefused)
        return kinds, r

    kinds, r = asyncio.run(main())
    assert "raw_response_event" in kinds  # streamed, event by event
    assert (r.input_tokens, r.output_tokens) == (RESPONSES_USAGE["input_tokens"],
                                                 RESPONSES_USAGE["output_tokens"])
    assert r.outcome is cl.Outcome.BUDGET_EXCEEDED and r.refused == 1
    assert BUCKETS == {}
    assert len(wire.requests) == 1


def test_streamed_runs_count_every_model_call_and_its_cost(
        wire: WireServer, memory_store: cl.Store, capture: Capture) -> None:
    cl.configure(prices={"gpt-4.1*": {"input": 2.0, "output": 8.0}})
    wire.script(streamed(response_calls(("create_bucket", {"name": "logs"}))),
                streamed(response_text("created logs")))
    agent = Agent(name="ops", model=model(wire),
                  tools=[agents_function_tool(bucket_tool(memory_store))])

    async def main() -> tuple[Any, cl.Run]:
        async with cl.Run("provision", store=memory_store) as r:
            result = Runner.run_streamed(agent, "make a logs bucket")
            async for _ in result.stream_events():
                pass
            return result.final_output, r

    final, r = asyncio.run(main())
    assert final == "created logs" and BUCKETS == {"logs": "eu-west-1"}
    assert (r.input_tokens, r.output_tokens) == (2 * RESPONSES_USAGE["input_tokens"],
                                                 2 * RESPONSES_USAGE["output_tokens"])
    assert r.steps == 1 and r.outcome is cl.Outcome.SUCCEEDED
    assert r.cost_usd is not None and r.cost_usd > 0


def test_a_spent_run_budget_stops_the_sdk_run(wire: WireServer, memory_store: cl.Store,
                                              capture: Capture) -> None:
    wire.script(response_calls(("create_bucket", {"name": "a"})),
                response_calls(("create_bucket", {"name": "b"}), first_id=2))
    agent = Agent(name="ops", model=model(wire),
                  tools=[agents_function_tool(bucket_tool(memory_store))])
    with pytest.raises(UserError) as raised, cl.Run(store=memory_store, max_steps=1) as r:
        run(agent, "two buckets")
    # the SDK wraps what a tool raises; the refusal is its cause, and ends the run as such
    assert isinstance(raised.value.__cause__, cl.ToolRefused)
    assert r.outcome is cl.Outcome.BUDGET_EXCEEDED
    assert BUCKETS == {"a": "eu-west-1"}


def test_the_functions_own_error_still_goes_through_the_sdks_failure_function(
        wire: WireServer, memory_store: cl.Store) -> None:
    @cl.tool(store=memory_store)
    def flaky(name: str) -> str:
        """Fails."""
        raise RuntimeError("backend down")

    wire.script(response_calls(("flaky", {"name": "x"})), response_text("gave up"))
    agent = Agent(name="ops", model=model(wire), tools=[agents_function_tool(flaky)])
    assert run(agent, "try").final_output == "gave up"
    assert call_outputs(wire.requests[1][1])["call_1"] == (
        "An error occurred while running the tool. Please try again.")
    assert memory_store.flush()
    assert [e.outcome for e in memory_store.events()] == ["error"]


def test_the_tool_keeps_the_functions_schema(wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(response_text("nothing"))
    tool = agents_function_tool(bucket_tool(memory_store))
    assert (tool.name, tool.description) == ("create_bucket", "Create a storage bucket.")
    run(Agent(name="ops", model=model(wire), tools=[tool]), "hi")
    (spec,) = wire.requests[0][1]["tools"]
    assert spec["name"] == "create_bucket"
    assert set(spec["parameters"]["properties"]) == {"name", "region"}


def test_an_input_guardrail_rejects_invalid_arguments_with_closedloops_feedback(
        wire: WireServer, memory_store: cl.Store) -> None:
    guardrail = agents_input_guardrail(lowercase_name, task_type="create_bucket.arguments",
                                       store=memory_store)

    @function_tool(tool_input_guardrails=[guardrail])
    def create_bucket(name: str) -> str:
        """Create a storage bucket."""
        BUCKETS[name] = "eu-west-1"
        return f"created {name}"

    wire.script(response_calls(("create_bucket", {"name": "Logs"})),
                response_calls(("create_bucket", {"name": "logs"}), first_id=2),
                response_text("done"))
    agent = Agent(name="ops", model=model(wire), tools=[create_bucket])
    with cl.Run(store=memory_store) as r:
        assert run(agent, "make it").final_output == "done"
    rejected = call_outputs(wire.requests[1][1])["call_1"]
    assert rejected.startswith("closedloop: create_bucket was not called")
    assert "lowercase_name: [error] invalid: bucket names are lowercase" in rejected
    assert BUCKETS == {"logs": "eu-west-1"}
    assert memory_store.flush()
    assert [(e.task_type, e.outcome, e.run_id) for e in memory_store.events()] == [
        ("create_bucket.arguments", "failed", r.run_id),
        ("create_bucket.arguments", "succeeded", r.run_id)]


def test_a_critical_argument_issue_trips_the_guardrail(wire: WireServer,
                                                       memory_store: cl.Store) -> None:
    def not_prod(call: dict[str, Any]) -> cl.Issue | None:
        return (cl.Issue(message="production is off limits", severity=cl.Severity.CRITICAL)
                if call.get("name") == "prod" else None)

    @function_tool(tool_input_guardrails=[agents_input_guardrail(not_prod,
                                                                 store=memory_store)])
    def drop_bucket(name: str) -> str:
        """Drop a bucket."""
        BUCKETS.pop(name, None)
        return "dropped"

    BUCKETS["prod"] = "eu-west-1"
    wire.script(response_calls(("drop_bucket", {"name": "prod"})))
    agent = Agent(name="ops", model=model(wire), tools=[drop_bucket])
    with pytest.raises(ToolInputGuardrailTripwireTriggered):
        run(agent, "drop prod")
    assert BUCKETS == {"prod": "eu-west-1"}


def test_an_output_guardrail_replaces_a_mismatching_output_with_the_differences(
        wire: WireServer) -> None:
    def in_region(call: dict[str, Any], output: str) -> str | None:
        want = call.get("region", "eu-west-1")
        return None if BUCKETS.get(call["name"]) == want else (
            f"{call['name']} is in {BUCKETS.get(call['name'])}, not {want}")

    @function_tool(tool_output_guardrails=[agents_output_guardrail(in_region)])
    def create_bucket(name: str, region: str) -> str:
        """Create a storage bucket."""
        BUCKETS[name] = "us-east-1"
        return f"created {name}"

    wire.script(response_calls(("create_bucket", {"name": "eu", "region": "eu-west-1"})),
                response_text("hm"))
    run(Agent(name="ops", model=model(wire), tools=[create_bucket]), "make it")
    replaced = call_outputs(wire.requests[1][1])["call_1"]
    assert replaced.startswith("closedloop: create_bucket ran, but its outcome does not match")
    assert "in_region: [error] invalid: eu is in us-east-1, not eu-west-1" in replaced


def test_the_processor_marks_spans_inside_a_step_with_the_step_id(
        wire: WireServer, memory_store: cl.Store, capture: Capture) -> None:
    wire.script(response_text("inner answer"))
    inner = Agent(name="inner", model=model(wire))

    @cl.tool(store=memory_store)
    async def ask_inner(question: str) -> str:
        """Ask another agent."""
        return str((await Runner.run(inner, question)).final_output)

    async def main() -> tuple[str, cl.Run]:
        async with cl.Run(store=memory_store) as r:
            return await ask_inner(question="why?"), r

    answer, r = asyncio.run(main())
    assert answer == "inner answer"
    assert memory_store.flush()
    (step,) = memory_store.events()
    marked = [s for s in capture.spans if s["span_data"]["type"] == "agent"]
    assert marked and all(s["metadata"] == {"closedloop.run_id": r.run_id,
                                            "closedloop.step_id": step.step_id}
                          for s in marked)


def test_an_async_guarded_tool_with_a_mismatch_is_rolled_back_and_told(
        wire: WireServer, memory_store: cl.Store) -> None:
    def in_region(call: dict[str, Any], result: str) -> str | None:
        got = BUCKETS.get(call["name"])
        return None if got == call.get("region", "eu-west-1") else f"landed in {got}"

    @cl.tool(verifiers=[in_region], store=memory_store,
             compensate=lambda result, name, region="eu-west-1": BUCKETS.pop(name))
    async def create_bucket(name: str, region: str = "eu-west-1") -> str:
        """Create a storage bucket."""
        BUCKETS[name] = "us-east-1" if region == "ap-south-2" else region
        return f"created {name}"

    wire.script(response_calls(("create_bucket", {"name": "eu", "region": "ap-south-2"})),
                response_text("noted"))
    agent = Agent(name="ops", model=model(wire), tools=[agents_function_tool(create_bucket)])
    assert run(agent, "make it").final_output == "noted"
    told = call_outputs(wire.requests[1][1])["call_1"]
    assert "outcome does not match the intent" in told and "landed in us-east-1" in told
    assert "rolled back" in told
    assert BUCKETS == {}
