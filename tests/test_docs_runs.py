"""docs/runs.md's example runs as written and prints what the page says it prints."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import closedloop as cl

DOC = Path(__file__).resolve().parent.parent / "docs" / "runs.md"


def test_the_example_prints_what_the_page_shows_and_records_the_run() -> None:
    text = DOC.read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", text, re.DOTALL)[0]
    shown = re.findall(r"prints\n\n```text\n(.*?)```", text, re.DOTALL)[0]
    out = io.StringIO()
    namespace: dict[str, object] = {"__name__": "runs_doc"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), namespace)
    assert out.getvalue() == shown
    run = namespace["run"]
    assert isinstance(run, cl.Run)
    store = cl.default_store()
    assert store.flush()
    steps = list(store.events())
    assert [(e.outcome, e.error_type) for e in steps] == [
        ("failed", "validation"), ("succeeded", None), ("failed", "verification"),
        ("compensated", None)]
    assert {e.run_id for e in steps} == {run.run_id}
    record = store.runs().get_run(run.run_id)
    assert record is not None and (record.outcome, record.steps, record.compensated) == (
        "succeeded", 3, 1)
