"""The README's examples run as written and do what their comments say."""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.control import default_backpressure
from integrations._wire_server import Reply, WireServer

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.DOTALL)


def test_first_example_runs_and_reasks_once() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()[0], str(README), "exec"), {"__name__": "readme"})
    assert out.getvalue().split() == ["succeeded", "2"]
    store = cl.default_store()
    assert store.flush()
    (event,) = store.events()
    assert (event.task_type, event.attempts, event.validation_passed) == ("provision_ec2", 2, True)
    assert event.verification_passed is True
    assert event.input_tokens == 840


def completion(content: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": input_tokens, "completion_tokens": output_tokens,
                      "total_tokens": input_tokens + output_tokens}}


@pytest.fixture
def openai_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[WireServer]:
    """A local server in OpenAI's wire format, where the README's client will find it."""
    server = WireServer()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("OPENAI_BASE_URL", f"{server.url}/v1")
    yield server
    server.close()


def test_the_openai_example_reasks_with_feedback_under_backpressure(
        openai_server: WireServer) -> None:
    untagged = json.dumps({"instance_type": "t3.micro", "tags": {}})
    tagged = json.dumps({"instance_type": "t3.micro", "tags": {"owner": "platform"}})
    openai_server.script(
        Reply(status=429, headers={"retry-after-ms": "20"},
              body={"error": {"message": "Rate limit reached", "type": "requests"}}),
        Reply(body=completion(untagged, 100, 20)),
        Reply(body=completion(tagged, 150, 25)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(python_blocks()[1], str(README), "exec"), {"__name__": "readme"})
    # the 429 was retried by closedloop (the SDK's retries are off), the re-ask fixed the tag
    assert out.getvalue().split() == ["succeeded", "2", "250"]
    assert len(openai_server.requests) == 3
    counts = default_backpressure().status()["openai/gpt-4o-mini"]["counts"]
    assert (counts["overloaded"], counts["ok"]) == (1, 2)
    # the re-ask carries the model's own answer and what was wrong with it
    messages = openai_server.requests[2][1]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == untagged
    assert "tag 'owner' is required" in messages[3]["content"]
    store = cl.default_store()
    assert store.flush()
    (event,) = store.events()
    assert (event.outcome, event.attempts, event.autonomy) == ("succeeded", 2, "approve")
    assert (event.input_tokens, event.output_tokens) == (250, 45)
