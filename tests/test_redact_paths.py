"""Secrets never leave the process: every way text leaves closedloop passes the redactor.

Events (their error message and detail) in the store and in dead-letter files, spans (status
message, attributes, events, content), scores' comments, alerts and log lines; redaction
always before a cut, so that no piece of a secret survives a truncation.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace

import closedloop as cl
from closedloop._redact import LOGGERS
from closedloop.control import Alert, CaptureSink, LogSink
from closedloop.store import MemoryBackend, Store, open_store, span_store_for
from closedloop.telemetry import Capture, MemoryExporter, Telemetry, record_score

KEY = "sk-proj-" + "Zx9Qw3Er5Ty7Ui1Op2As4Df6Gh8Jk0Lz" * 2
PIECE = KEY[:8]  # what a cut through the key would leave behind
PASSWORD = "n0t-in-any-l0g"
DSN = f"postgres://app:{PASSWORD}@db.internal:5432/orders"


def leaked(text: str) -> bool:
    return KEY in text or PIECE in text or PASSWORD in text


@pytest.fixture
def store() -> Iterator[Store]:
    s = open_store("memory://", flush_interval=0.01)
    yield s
    s.close()


def stored(store: Store) -> list[cl.StepEvent]:
    assert store.flush()
    return list(store.events())


def event(error_message: str | None = None,
          detail: dict[str, Any] | None = None) -> cl.StepEvent:
    return cl.StepEvent(
        ts=1.0, trace_id="0" * 32, agent_id="a", task_type="t", autonomy="autonomous",
        outcome="error", attempts=1, input_tokens=0, output_tokens=0, latency_ms=1.0,
        validation_passed=None, verification_passed=None, error_type="agent",
        error_message=error_message, propose_ms=0.0, validate_ms=0.0, act_ms=0.0,
        verify_ms=0.0, detail=detail)


# -- events -------------------------------------------------------------------------------

def test_the_writer_redacts_an_events_message_and_detail(store: Store) -> None:
    store.record(event(error_message=f"call failed with {KEY}",
                       detail={"exception": {"message": f"connect {DSN}"},
                               "config": {"password": "hunter2"}}))
    (back,) = stored(store)
    assert back.error_message == "call failed with [REDACTED:openai_key]"
    assert back.detail == {
        "exception": {"message": "connect postgres://app:[REDACTED:url_password]"
                                 "@db.internal:5432/orders"},
        "config": {"password": "[REDACTED:secret]"}}


class RefusingBackend(MemoryBackend):
    """A backend whose disk is full: every write fails."""

    def write_batch(self, events: Sequence[cl.StepEvent]) -> None:
        raise OSError("No space left on device")


def test_dead_letter_files_hold_redacted_events(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    store = Store(RefusingBackend(), dead_letter=dead, flush_interval=0.01)
    store._writer.retry_delays = ()
    store.record(event(error_message=f"boom {KEY}", detail={"url": DSN}))
    assert store.close().dead_lettered == 1
    text = dead.read_text()
    assert not leaked(text)
    assert json.loads(text)["error_message"] == "boom [REDACTED:openai_key]"


def test_importing_a_dead_letter_file_redacts_what_it_writes(tmp_path: Path) -> None:
    from closedloop.store._deadletter import import_dead_letter

    dead = tmp_path / "old.jsonl"  # e.g. written before redaction, or by hand
    dead.write_text(json.dumps(event(error_message=f"boom {KEY}",
                                     detail={"dsn": DSN})._asdict()) + "\n")
    store = open_store(tmp_path / "events.db")
    try:
        assert import_dead_letter(dead, store).imported == 1
        (back,) = list(store.events())
    finally:
        store.close()
    assert back.error_message == "boom [REDACTED:openai_key]"
    assert not leaked(json.dumps(back.detail))


@pytest.mark.parametrize("pad", [1970, 1980])
def test_a_failing_agents_message_is_redacted_before_it_is_cut(store: Store, pad: int) -> None:
    def agent(task: str, attempt: cl.Attempt) -> str:
        # the key straddles the 2000-character limit of the recorded message (1970) and of
        # the recorded exception's message (1980), leaving too short a piece to recognise
        raise RuntimeError("x" * pad + " " + KEY)

    loop = cl.Loop(agent, task_type="cut", store=store, guards=[], telemetry=None)
    with pytest.raises(RuntimeError):
        loop.run("go")
    (back,) = stored(store)
    assert back.error_message is not None and back.detail is not None
    assert not leaked(back.error_message)
    assert not leaked(json.dumps(back.detail))
    assert "truncated" in back.error_message


def test_verification_messages_are_redacted_in_the_event(store: Store) -> None:
    loop = cl.Loop(lambda task, attempt: task, task_type="v", executor=lambda p: p,
                   verifiers=[lambda intent, result: cl.Verdict.fail(f"reached {DSN}")],
                   store=store, guards=[], telemetry=None)
    result = loop.run("go")
    assert result.outcome == "failed"
    (back,) = stored(store)
    assert back.error_message is not None and not leaked(back.error_message)
    assert not leaked(json.dumps(back.detail))


def test_validation_feedback_history_is_redacted(store: Store) -> None:
    loop = cl.Loop(lambda task, attempt: task, task_type="r",
                   validators=[lambda p: f"do not send {KEY}"], max_attempts=2,
                   store=store, guards=[], telemetry=None)
    loop.run("go")
    (back,) = stored(store)
    assert not leaked(back.error_message or "")
    assert not leaked(json.dumps(back.detail))


def test_the_process_default_takes_the_users_patterns(store: Store) -> None:
    previous = cl.set_default_redactor(cl.Redactor([r"ACCT-\d{6}"]))
    try:
        store.record(event(error_message="account ACCT-123456 overdrawn"))
        (back,) = stored(store)
    finally:
        cl.set_default_redactor(previous)
    assert back.error_message == "account [REDACTED:custom] overdrawn"
    assert cl.default_redactor() is previous


# -- spans --------------------------------------------------------------------------------

def traced_failure(pipeline: Telemetry) -> None:
    def agent(task: str, attempt: cl.Attempt) -> str:
        span = trace.get_current_span()
        span.set_attribute("http.url", DSN)
        span.set_attribute("http.request.header.authorization", "Basic dXNlcjpwYXNz")
        span.add_event("retry", {"reason": f"rejected {KEY}"})
        span.record_exception(ValueError("y" * 1980 + " " + KEY))  # cut at 2000
        raise ValueError("z" * 470 + " " + KEY)  # straddles the 500-character status cap

    loop = cl.Loop(agent, task_type="spans", store=None, guards=[], telemetry=pipeline)
    with pytest.raises(ValueError, match="zzz"):
        loop.run(f"task with {KEY}")


def test_span_status_attributes_events_and_content_are_redacted() -> None:
    exporter = MemoryExporter()
    pipeline = Telemetry([exporter], flush_interval=60.0)
    traced_failure(pipeline)
    pipeline.shutdown()
    spans = exporter.finished()
    assert spans
    for span in spans:
        text = json.dumps([span.status_message, span.attributes, span.events, span.content])
        assert not leaked(text), span.name
    agent_span = next(s for s in spans if s.name.startswith("invoke_agent"))
    assert agent_span.attributes["http.request.header.authorization"] == "[REDACTED:secret]"
    assert agent_span.status_message is not None
    assert "[REDACTED" in agent_span.status_message


def test_spans_sent_to_an_sdk_exporter_are_redacted_with_content_off() -> None:
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from closedloop.telemetry import OTelExporter

    sdk = InMemorySpanExporter()
    pipeline = Telemetry([OTelExporter(sdk)], flush_interval=60.0)
    traced_failure(pipeline)
    pipeline.shutdown()
    spans = sdk.get_finished_spans()
    assert spans
    for span in spans:
        text = repr((span.status.description, dict(span.attributes or {}),
                     [(e.name, dict(e.attributes or {})) for e in span.events]))
        assert not leaked(text), span.name


def test_content_is_redacted_before_json_escapes_it() -> None:
    aws = "AKIA" + "QWERTYUIOPASDFGH"
    args = {"note": f"first line\n{aws}", "password": 'say "open" then sesame'}
    out = Capture().apply({"args": args})
    assert aws not in out["args"] and "sesame" not in out["args"]
    assert json.loads(out["args"]) == {"note": "first line\n[REDACTED:aws_access_key]",
                                       "password": "[REDACTED:secret]"}


def test_content_is_redacted_before_it_is_capped() -> None:
    out = Capture(max_chars=40).apply({"prompt": "p" * 25 + " " + KEY})
    assert not leaked(out["prompt"])
    assert out["prompt"].startswith("p" * 25 + " [REDACTED:o")


def test_scores_comments_are_redacted(store: Store) -> None:
    score = record_score("a" * 32, "quality", 0.2, comment=f"it leaked {KEY} to {DSN}",
                         store=store)
    assert not leaked(score.comment or "")
    (back,) = span_store_for(store).scores(trace_id="a" * 32)
    assert back.comment == ("it leaked [REDACTED:openai_key] to "
                            "postgres://app:[REDACTED:url_password]@db.internal:5432/orders")


# -- control, alerts and logs -------------------------------------------------------------

def test_stop_reasons_and_evidence_are_redacted_in_the_ledger(tmp_path: Path) -> None:
    from closedloop.control import SQLiteLedger, Stop, StopKind

    ledger = SQLiteLedger(tmp_path / "events.db")
    ledger.put(Stop(task_type="deploy", kind=StopKind.HALTED, reason=f"401 with {KEY}",
                    by="fault-control", at=1.0,
                    evidence={"last_error": f"cannot reach {DSN}", "api_key": "abc123",
                              "failures": [f"{KEY} rejected"]}))
    stop = ledger.get("deploy")
    assert stop is not None
    assert stop.reason == "401 with [REDACTED:openai_key]"
    assert stop.evidence == {
        "last_error": "cannot reach postgres://app:[REDACTED:url_password]@db.internal:5432/orders",
        "api_key": "[REDACTED:secret]", "failures": ["[REDACTED:openai_key] rejected"]}
    assert not leaked(json.dumps(ledger.history(5)))


def test_alerts_are_redacted_for_every_sink(caplog: pytest.LogCaptureFixture) -> None:
    alert = Alert(kind="halted", subject="deploy", summary=f"verification failed: {DSN}",
                  action=f"rotate {KEY}", evidence={"last_error": f"401 for {KEY}",
                                                    "api_key": "abc123", "failures": 7})
    capture = CaptureSink()
    capture.send(alert)
    with caplog.at_level(logging.WARNING, logger="closedloop.control"):
        LogSink().send(alert)
    assert not leaked(json.dumps(capture.alerts[0].to_dict()))
    assert not leaked(alert.render())
    assert alert.evidence == {"last_error": "401 for [REDACTED:openai_key]",
                              "api_key": "[REDACTED:secret]", "failures": 7}
    assert caplog.records and not leaked(caplog.text)


@pytest.mark.parametrize("name", LOGGERS)
def test_log_lines_are_redacted_with_their_arguments(name: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=name):
        logging.getLogger(name).warning("store %s refused: %s", DSN, KEY)
    (record,) = [r for r in caplog.records if r.name == name]
    assert record.getMessage() == (
        "store postgres://app:[REDACTED:url_password]@db.internal:5432/orders refused: "
        "[REDACTED:openai_key]")


def test_logged_tracebacks_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("closedloop.store")
    with caplog.at_level(logging.ERROR, logger="closedloop.store"):
        try:
            raise ConnectionError(f"cannot reach {DSN}")
        except ConnectionError:
            log.exception("write failed")
    assert "ConnectionError" in caplog.text
    assert not leaked(caplog.text)


_CHECK_FILTER = """
import importlib, logging, sys
module = importlib.import_module(sys.argv[1])
missing = [n for n in sys.argv[2:]
           if not any(type(f).__name__ == "RedactingFilter" for f in logging.getLogger(n).filters)]
print(",".join(missing))
"""


def test_every_module_that_logs_puts_the_filter_on_its_logger() -> None:
    # imported alone, in a fresh process: the filter must not depend on what else was imported
    src = Path(cl.__file__).parent
    uses: dict[str, set[str]] = {}
    for path in src.rglob("*.py"):
        names = set(re.findall(r"getLogger\(\"(closedloop[\w.]*)\"\)", path.read_text()))
        if names:
            parts = path.relative_to(src.parent).with_suffix("").parts
            uses[".".join(p for p in parts if p != "__init__")] = names
    assert len(uses) >= 5
    assert set().union(*uses.values()) <= set(LOGGERS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for module, names in sorted(uses.items()):
        done = subprocess.run([sys.executable, "-c", _CHECK_FILTER, module, *sorted(names)],
                              capture_output=True, text=True, env=env, timeout=60, check=True)
        assert done.stdout.strip() == "", f"{module} logs on {done.stdout.strip()} unfiltered"


class BrokenRedactor(cl.Redactor):
    def __call__(self, text: str) -> str:
        raise RuntimeError("broken")


def test_a_log_line_that_cannot_be_redacted_is_withheld(caplog: pytest.LogCaptureFixture) -> None:
    previous = cl.set_default_redactor(BrokenRedactor())
    try:
        with caplog.at_level(logging.WARNING, logger="closedloop"):
            logging.getLogger("closedloop").warning("token %s", KEY)  # must not raise
    finally:
        cl.set_default_redactor(previous)
    (record,) = [r for r in caplog.records if r.name == "closedloop"]
    assert record.getMessage() == "[closedloop: log line withheld, redaction failed]"
