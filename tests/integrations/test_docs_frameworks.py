"""docs/frameworks.md: each framework's example runs as written, with the real framework,
against a local server in OpenAI's wire format, and prints what the page says it prints."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import closedloop as cl
from integrations._chat import (
    call_outputs,
    response_calls,
    response_text,
    text_reply,
    tool_reply,
    tool_results,
)
from integrations._wire_server import WireServer

DOC = Path(__file__).resolve().parents[2] / "docs" / "frameworks.md"


def section(title: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)


@pytest.fixture
def openai_env(wire: WireServer, monkeypatch: pytest.MonkeyPatch) -> WireServer:
    monkeypatch.setenv("OPENAI_BASE_URL", f"{wire.url}/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "test")
    return wire


@pytest.fixture(autouse=True)
def _event_loop() -> Iterator[None]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    loop.close()
    asyncio.set_event_loop(None)


def run_example(code: str) -> tuple[str, dict[str, Any]]:
    out = io.StringIO()
    namespace: dict[str, Any] = {"__name__": "frameworks_doc"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), namespace)
    return out.getvalue(), namespace


def test_the_openai_agents_sdk_example(openai_env: WireServer) -> None:
    from agents import set_default_openai_client, set_trace_processors

    wire = openai_env
    wire.script(response_calls(("create_bucket", {"name": "Logs"})),
                response_calls(("create_bucket", {"name": "logs"}), first_id=2),
                response_text("created the logs bucket"))
    text = section("OpenAI Agents SDK")
    code, *_ = blocks(text, "python")
    shown, feedback = blocks(text, "text")
    set_trace_processors([])  # the example adds its processor; never the SDK's exporter here
    try:
        out, _ = run_example(code)
    finally:
        set_trace_processors([])
        set_default_openai_client(openai.AsyncOpenAI(api_key="unused"))
    assert out == shown
    assert call_outputs(wire.requests[1][1])["call_1"] == feedback.strip()
    assert [path for path, _ in wire.requests] == ["/v1/responses"] * 3
    store = cl.default_store()
    assert store.flush()
    assert [(e.task_type, e.outcome) for e in store.events()] == [
        ("create_bucket", "failed"), ("create_bucket", "succeeded")]


def test_the_pydantic_ai_example(openai_env: WireServer) -> None:
    wire = openai_env
    wire.script(tool_reply(("create_bucket", {"name": "Logs"})),
                tool_reply(("create_bucket", {"name": "logs"}), first_id=2),
                text_reply("TODO: say what was done"),
                text_reply("created the logs bucket"))
    text = section("Pydantic AI")
    code, *_ = blocks(text, "python")
    shown, feedback = blocks(text, "text")
    out, namespace = run_example(code)
    assert out == shown
    # Pydantic AI sends a tool's retry prompt as {"error": ...}
    assert json.loads(tool_results(wire.requests[1][1])["call_1"]) == {"error": feedback.strip()}
    run = namespace["run"]
    assert isinstance(run, cl.Run)
    assert run.input_tokens + run.output_tokens == 4 * 25  # the model's four calls
    store = cl.default_store()
    assert store.flush()
    assert [(e.task_type, e.outcome) for e in store.events() if e.run_id == run.run_id] == [
        ("create_bucket", "failed"), ("create_bucket", "succeeded"), ("output", "failed"),
        ("output", "succeeded")]


def test_the_langgraph_example() -> None:
    text = section("LangGraph")
    code, *_ = blocks(text, "python")
    (shown,) = blocks(text, "text")
    out, _ = run_example(code)
    assert out == shown
    store = cl.default_store()
    assert store.flush()
    # one request, executed once: one awaiting event and one executed event, one step id
    events = list(store.events())
    assert [e.outcome for e in events] == ["awaiting_approval", "succeeded"]
    assert len({e.step_id for e in events}) == 1
