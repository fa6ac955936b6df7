"""Line protocol: what :func:`event_line` writes, and what a real InfluxDB reads back of it.

The escaping is checked by properties over hostile text (commas, equals signs, spaces, quotes,
backslashes, line breaks, control characters, any Unicode) written to a real InfluxDB 1.x and
queried back: a tag holds :func:`tag_text` of the value (line breaks as spaces, no trailing
backslash; nothing else changes), a string field holds the value itself.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop import StepEvent
from closedloop.telemetry import (
    escape_measurement,
    escape_string,
    escape_tag,
    event_line,
    tag_text,
)

from .conftest import OwnInfluxd

pytestmark = pytest.mark.requires("influxd")


def make_event(**changes: Any) -> StepEvent:
    base = StepEvent(
        ts=1_700_000_000.123456, trace_id="ab" * 16, agent_id="agent-1", task_type="plan",
        autonomy="autonomous", outcome="succeeded", attempts=2, input_tokens=1200,
        output_tokens=300, latency_ms=12.5, validation_passed=True, verification_passed=None,
        error_type=None, error_message=None, propose_ms=10.0, validate_ms=1.0, act_ms=0.5,
        verify_ms=0.0, detail=None, step_id="s1", model="gpt-4o", provider="openai",
        labels={"region": "eu"}, cached_input_tokens=200, cost_usd=0.00725)
    return base._replace(**changes)


def test_a_step_is_one_line_with_sorted_tags_typed_fields_and_its_time() -> None:
    line = event_line(make_event())
    assert line == (
        "closedloop_step,agent=agent-1,autonomy=autonomous,label_region=eu,model=gpt-4o,"
        "outcome=succeeded,provider=openai,task_type=plan "
        "succeeded=1i,attempts=2i,input_tokens=1200i,output_tokens=300i,"
        "cached_input_tokens=200i,latency_ms=12.5,propose_ms=10.0,validate_ms=1.0,"
        "act_ms=0.5,verify_ms=0.0,cost_usd=0.00725,validation_passed=1i,"
        'trace_id="abababababababababababababababab",step_id="s1" 1700000000123456000')


def test_unset_values_are_left_out_and_a_failure_carries_its_message() -> None:
    line = event_line(make_event(outcome="failed", error_type="validation",
                                 error_message='bad "x"\\', model=None, labels=None,
                                 cost_usd=None, cached_input_tokens=None,
                                 validation_passed=False, latency_ms=float("nan")),
                      measurement="m", timestamp=7)
    assert line == (
        "m,agent=agent-1,autonomy=autonomous,error_type=validation,outcome=failed,"
        "provider=openai,task_type=plan succeeded=0i,attempts=2i,input_tokens=1200i,"
        "output_tokens=300i,propose_ms=10.0,validate_ms=1.0,act_ms=0.5,verify_ms=0.0,"
        'validation_passed=0i,trace_id="abababababababababababababababab",step_id="s1",'
        'error_message="bad \\"x\\"\\\\" 7')


def test_escaping_follows_the_spec() -> None:
    assert escape_tag("a,b=c d") == r"a\,b\=c\ d"
    assert escape_tag("line\nbreak\r") == "line\\ break\\ "
    assert escape_tag("ends\\\\") == "ends"
    assert escape_tag("a\\b") == "a\\b"  # a backslash inside a tag is kept as written
    assert escape_measurement("a,b c=d") == r"a\,b\ c=d"
    assert escape_string('say "hi" \\ bye\n') == '"say \\"hi\\" \\\\ bye\n"'
    assert tag_text("x\ud800y") == "x\ufffdy"


HOSTILE = st.text(
    alphabet=st.one_of(st.sampled_from(list(',= "\'\\\n\r\t\x00{}[]#=\u2028é€😀')),
                       st.characters(exclude_categories=["Cs"])),
    min_size=1, max_size=40)


def _write(server: OwnInfluxd, db: str, line: str) -> None:
    response = server.client.post("/write", params={"db": db, "precision": "n"},
                                  content=(line + "\n").encode())
    assert response.status_code == 204, response.text


@pytest.fixture(scope="module")
def hostile_db(influxd: OwnInfluxd) -> tuple[OwnInfluxd, str]:
    return influxd, influxd.create_db()


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(task_type=HOSTILE, label=HOSTILE, model=HOSTILE, message=HOSTILE)
def test_hostile_text_reads_back_as_written(hostile_db: tuple[OwnInfluxd, str], task_type: str,
                                            label: str, model: str, message: str) -> None:
    server, db = hostile_db
    step = uuid.uuid4().hex
    event = make_event(task_type=task_type, labels={"region": label}, model=model,
                       error_message=message, step_id=step)
    _write(server, db, event_line(event))
    [row] = server.rows(db, f"SELECT * FROM closedloop_step WHERE step_id = '{step}'")
    assert row["task_type"] == (tag_text(task_type) or None)
    assert row["label_region"] == (tag_text(label) or None)
    assert row["model"] == (tag_text(model) or None)
    assert row["error_message"] == message
    assert row["input_tokens"] == 1200 and row["cost_usd"] == 0.00725


@pytest.mark.parametrize("name", ["closedloop step", "a,b", "with=equals", "x\\y"])
def test_a_hostile_measurement_name_reads_back(influxd: OwnInfluxd, db: str, name: str) -> None:
    _write(influxd, db, event_line(make_event(), measurement=name))
    names = [s["values"][0][0] for s in influxd.query(db, "SHOW MEASUREMENTS")]
    assert names == [name]


def test_text_that_needs_no_change_is_stored_unchanged() -> None:
    for value in ("plan-ec2", "a b,c=d", "a\\b", "é€😀", "\t"):
        assert tag_text(value) == value
    with pytest.raises(AssertionError):
        assert tag_text("x\n") == "x\n"


def test_the_server_refuses_what_escaping_prevents(influxd: OwnInfluxd, db: str) -> None:
    """The cases :func:`tag_text` changes are the ones InfluxDB cannot take as written."""
    for raw in ("m,t=ends\\ f=1i 1", "m,t=a\nb f=1i 1"):
        response = influxd.client.post("/write", params={"db": db}, content=raw.encode())
        assert response.status_code == 400
    assert isinstance(influxd.client, httpx.Client)
