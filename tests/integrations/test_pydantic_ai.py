"""The Pydantic AI adapter with the real pydantic-ai, its model talking HTTP to a local server
in OpenAI's chat-completions format."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

import closedloop as cl
from closedloop.integrations import (
    instrument_openai,
    pydantic_ai_output_validator,
    pydantic_ai_tool,
)
from integrations._chat import USAGE, text_reply, tool_reply, tool_results, user_texts
from integrations._wire_server import WireServer

BUCKETS: dict[str, str] = {}


def lowercase_name(call: dict[str, Any]) -> str | None:
    name = call.get("name", "")
    return None if name == name.lower() else f"bucket names are lowercase, got {name!r}"


def model(wire: WireServer) -> OpenAIChatModel:
    client = instrument_openai(openai.AsyncOpenAI(base_url=f"{wire.url}/v1", api_key="test",
                                                  max_retries=0))
    return OpenAIChatModel("gpt-4o", provider=OpenAIProvider(openai_client=client))


@pytest.fixture(autouse=True)
def _buckets() -> None:
    BUCKETS.clear()


@pytest.fixture(autouse=True)
def _event_loop() -> Iterator[None]:
    """``Agent.run_sync`` runs on the thread's current event loop: one per test, closed after."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    loop.close()
    asyncio.set_event_loop(None)


def make_bucket_tool(store: cl.Store, **options: Any) -> Any:
    @cl.tool(validators=[lowercase_name], store=store, **options)
    def create_bucket(name: str, region: str = "eu-west-1") -> str:
        """Create a storage bucket."""
        BUCKETS[name] = region
        return f"created {name} in {region}"
    return create_bucket


def test_invalid_arguments_come_back_as_model_retry_with_closedloops_feedback(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(tool_reply(("create_bucket", {"name": "Logs"})),
                tool_reply(("create_bucket", {"name": "logs"}), first_id=2),
                text_reply("created logs"))
    agent = Agent(model(wire), tools=[pydantic_ai_tool(make_bucket_tool(memory_store))])
    with cl.Run("provision", store=memory_store) as run:
        result = agent.run_sync("make a logs bucket")
    assert result.output == "created logs"
    assert BUCKETS == {"logs": "eu-west-1"}
    # the retry prompt (Pydantic AI's {"error": ...}) the model got carries closedloop's feedback
    retry = json.loads(tool_results(wire.requests[1][1])["call_1"])["error"]
    assert "closedloop: create_bucket was not called: its arguments are invalid" in retry
    assert "bucket names are lowercase, got 'Logs'" in retry
    assert tool_results(wire.requests[2][1])["call_2"] == "created logs in eu-west-1"
    # both calls were steps of the run; the model's three calls count against it
    assert memory_store.flush()
    steps = [e for e in memory_store.events() if e.run_id == run.run_id]
    assert [(e.task_type, e.outcome, e.error_type) for e in steps] == [
        ("create_bucket", "failed", "validation"), ("create_bucket", "succeeded", None)]
    assert (run.input_tokens, run.output_tokens) == (3 * USAGE["prompt_tokens"],
                                                     3 * USAGE["completion_tokens"])


def test_the_tool_keeps_the_functions_schema_for_the_model(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(text_reply("nothing to do"))
    agent = Agent(model(wire), tools=[pydantic_ai_tool(make_bucket_tool(memory_store))])
    agent.run_sync("hello")
    (spec,) = wire.requests[0][1]["tools"]
    fn = spec["function"]
    assert (fn["name"], fn["description"]) == ("create_bucket", "Create a storage bucket.")
    assert fn["parameters"]["required"] == ["name"]
    assert set(fn["parameters"]["properties"]) == {"name", "region"}


def test_a_verification_mismatch_is_retried_after_the_rollback(
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

    wire.script(tool_reply(("create_bucket", {"name": "eu", "region": "ap-south-2"})),
                tool_reply(("create_bucket", {"name": "eu"}), first_id=2),
                text_reply("done"))
    agent = Agent(model(wire), tools=[pydantic_ai_tool(create_bucket)])
    assert asyncio.get_event_loop().run_until_complete(agent.run("make it")).output == "done"
    retry = json.loads(tool_results(wire.requests[1][1])["call_1"])["error"]
    assert "outcome does not match the intent" in retry and "landed in us-east-1" in retry
    assert "rolled back" in retry
    assert BUCKETS == {"eu": "eu-west-1"}


def test_a_call_awaiting_approval_is_the_tools_result_not_a_retry(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(tool_reply(("create_bucket", {"name": "logs"})), text_reply("asked"))
    bucket = make_bucket_tool(memory_store, autonomy="suggest")
    agent = Agent(model(wire), tools=[pydantic_ai_tool(bucket)])
    assert agent.run_sync("make a logs bucket").output == "asked"
    answer = tool_results(wire.requests[1][1])["call_1"]
    assert answer.startswith("closedloop: create_bucket it was not executed: this tool only "
                             "suggests")
    assert BUCKETS == {}


def test_a_spent_run_budget_stops_the_agent_and_ends_the_run(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(tool_reply(("create_bucket", {"name": "a"})),
                tool_reply(("create_bucket", {"name": "b"}), first_id=2))
    agent = Agent(model(wire), tools=[pydantic_ai_tool(make_bucket_tool(memory_store))])
    with pytest.raises(cl.ToolRefused), cl.Run(store=memory_store, max_steps=1) as run:
        agent.run_sync("make two buckets")
    assert run.outcome is cl.Outcome.BUDGET_EXCEEDED
    assert BUCKETS == {"a": "eu-west-1"}


def test_more_invalid_calls_than_max_invalid_stop_the_agent(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(*(tool_reply(("create_bucket", {"name": "X"}), first_id=n) for n in (1, 2)))
    bucket = make_bucket_tool(memory_store, max_invalid=1)
    tool = pydantic_ai_tool(bucket)
    assert tool.max_retries == 1  # Pydantic AI's own limit would stop it at the same call
    agent = Agent(model(wire), tools=[tool])
    with pytest.raises(cl.ToolRefused, match="2 invalid calls in a row"):
        agent.run_sync("make it")
    assert len(wire.requests) == 2 and BUCKETS == {}


def test_a_plain_function_is_guarded_with_the_options_given(
        wire: WireServer, memory_store: cl.Store) -> None:
    def delete_bucket(name: str) -> str:
        """Delete a bucket."""
        BUCKETS.pop(name, None)
        return f"deleted {name}"

    wire.script(tool_reply(("delete_bucket", {"name": "old"})), text_reply("ok"))
    wrapped = pydantic_ai_tool(delete_bucket, store=memory_store, autonomy="suggest")
    agent = Agent(model(wire), tools=[wrapped])
    BUCKETS["old"] = "eu-west-1"
    agent.run_sync("delete old")
    assert "this tool only suggests" in tool_results(wire.requests[1][1])["call_1"]
    assert BUCKETS == {"old": "eu-west-1"}
    assert memory_store.flush()
    assert [(e.task_type, e.outcome) for e in memory_store.events()] == [
        ("delete_bucket", "suggested")]
    with pytest.raises(cl.ConfigError, match="already a guarded tool"):
        pydantic_ai_tool(make_bucket_tool(memory_store), autonomy="suggest")


def no_placeholder(output: str) -> str | None:
    return "the answer still has a TODO" if "TODO" in output else None


def test_an_output_validator_re_asks_with_closedloops_feedback(
        wire: WireServer, memory_store: cl.Store) -> None:
    wire.script(text_reply("summary: TODO"), text_reply("summary: all good"))
    agent = Agent(model(wire))
    check = pydantic_ai_output_validator(no_placeholder, store=memory_store)
    agent.output_validator(check)
    with cl.Run(store=memory_store) as run:
        result = agent.run_sync("summarise")
    assert result.output == "summary: all good"
    # the re-ask the model got is closedloop's feedback
    reask = wire.requests[1][1]["messages"]
    text = "\n".join(user_texts(wire.requests[1][1]))
    assert "rejected by validation" in text, reask
    assert "no_placeholder: [error] invalid: the answer still has a TODO" in text
    assert memory_store.flush()
    steps = [e for e in memory_store.events() if e.run_id == run.run_id]
    assert [(e.task_type, e.outcome) for e in steps] == [("output", "failed"),
                                                         ("output", "succeeded")]


def test_a_critical_output_issue_blocks_without_re_ask(
        wire: WireServer, memory_store: cl.Store) -> None:
    def no_secrets(output: str) -> cl.Verdict | None:
        if "password" in output:
            return cl.Verdict(issues=(cl.Issue(message="leaks a password",
                                               severity=cl.Severity.CRITICAL),))
        return None

    wire.script(text_reply("the password is hunter2"))
    agent = Agent(model(wire))
    agent.output_validator(pydantic_ai_output_validator(no_secrets, store=memory_store))
    with pytest.raises(cl.Blocked, match="leaks a password"):
        agent.run_sync("tell me")
    assert len(wire.requests) == 1
