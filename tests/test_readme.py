"""The README's first example runs as written and does what its comments say."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import closedloop as cl

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
