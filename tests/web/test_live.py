"""The dashboard's live updates over HTTP against a real ``closedloop serve``: server-sent
events of the steps and approval requests stored after a page was made, their auth, their
bound, and their end when the server stops."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import closedloop as cl
from closedloop.web._live import MAX_STREAMS

from .conftest import Served, make_request, start_serve, wait_for
from .dashboard_util import TEXT, VIEWER, parse, signed_in, start_dashboard, visible


def _step(i: int, *, task_type: str = "deploy", outcome: str = "succeeded",
          error: str | None = None, ts: float | None = None) -> cl.StepEvent:
    return cl.StepEvent(
        ts=time.time() if ts is None else ts, trace_id=f"{i + 1:032x}", agent_id="agent-1",
        task_type=task_type, autonomy="autonomous", outcome=outcome, attempts=1,
        input_tokens=10, output_tokens=5, latency_ms=12.5, validation_passed=True,
        verification_passed=outcome == "succeeded", error_type=None if error is None
        else "verification", error_message=error, propose_ms=1.0, validate_ms=0.5,
        act_ms=8.0, verify_ms=2.0, detail=None)


def _record(url: str, *events: cl.StepEvent) -> None:
    with cl.open_store(url) as store:
        for e in events:
            store.record(e)
        assert store.flush()


class Events:
    """The events of one open stream, read by a thread of their own."""

    def __init__(self, http: httpx.Client, path: str, **headers: str) -> None:
        self.found: list[dict[str, Any]] = []
        self.comments: list[str] = []
        self.ended = threading.Event()
        self.status: int | None = None
        self._ctx = http.stream("GET", path, headers=headers,
                                timeout=httpx.Timeout(30, read=None))
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._ctx as answer:
                self.status = answer.status_code
                event: dict[str, Any] = {}
                for line in answer.iter_lines():
                    if line.startswith(":"):
                        self.comments.append(line)
                    elif line == "":
                        if "data" in event:
                            self.found.append(event)
                        event = {}
                    else:
                        name, _, value = line.partition(": ")
                        event[name] = json.loads(value) if name == "data" else value
        except httpx.HTTPError:
            pass
        finally:
            self.ended.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.found) if e.get("event") == kind]


def _live_url(page_html: str) -> str:
    urls = [str(a["data-live"]) for _, a in parse(page_html).elements if "data-live" in a]
    assert len(urls) == 1, urls
    return urls[0]


@pytest.fixture
def dash(tmp_path: Path) -> Iterator[Served]:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    s = start_dashboard(url)
    yield s
    s.stop()


def test_a_step_stored_after_the_page_arrives_on_its_stream(store_url: str) -> None:
    _record(store_url, *(_step(i, ts=time.time() - 100 + i) for i in range(3)))
    served = start_dashboard(store_url)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            live = _live_url(http.get("/ui/steps").text)
            stream = Events(http, live)
            _record(store_url, _step(10, error=f"verifier says {TEXT}", outcome="failed"))
            (event,) = wait_for("the new step", lambda: stream.of("step"))
    finally:
        served.stop()
    cells = event["data"]["cells"]
    assert cells[1]["text"] == "deploy" and cells[2] == {"text": "failed",
                                                         "badge": "out-failed"}
    text = cells[7]["text"]  # as stored (PostgreSQL keeps no NUL), controls written out
    assert text.startswith("verifier says <script>alert(1)</script> \"><img src=x")
    assert "\\x1b[31mred\\x1b[0m a\\x0db" in text and "\\u202eevil" in text
    assert not any(c in text for c in "\x1b\r\x00\u202e")
    assert cells[8]["href"] == f"/ui/traces/{11:032x}"
    assert event["id"]  # a position to resume from


def test_the_stream_keeps_the_pages_filters(dash: Served) -> None:
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        live = _live_url(http.get("/ui/steps", params={"task_type": "plan"}).text)
        assert "task_type=plan" in live
        stream = Events(http, live)
        _record(dash.store_url, _step(1, task_type="deploy"), _step(2, task_type="plan"))
        wait_for("the plan step", lambda: stream.of("step"))
        _record(dash.store_url, _step(3, task_type="plan"))
        wait_for("the second plan step", lambda: len(stream.of("step")) == 2)
    assert [e["data"]["cells"][8]["href"][-1] for e in stream.of("step")] == ["3", "4"]


def test_a_reconnect_goes_on_from_the_last_event_id(dash: Served) -> None:
    _record(dash.store_url, _step(1, ts=time.time() - 10))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        live = _live_url(http.get("/ui/steps").text)
        first = Events(http, live)
        _record(dash.store_url, _step(2, ts=time.time() - 5))
        (seen,) = wait_for("the first new step", lambda: first.of("step"))
        _record(dash.store_url, _step(3))
        again = Events(http, live, **{"Last-Event-ID": seen["id"]})
        resumed = wait_for("the step after it", lambda: again.of("step"))
    assert [e["data"]["cells"][8]["href"][-1] for e in resumed] == ["4"]


def test_only_the_first_page_without_an_end_time_is_live(dash: Served) -> None:
    _record(dash.store_url, *(_step(i, ts=time.time() - 200 + i) for i in range(60)))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        first = parse(http.get("/ui/steps").text)
        nxt = [a["href"] for t, a in first.elements if t == "a" and a.get("rel") == "next"]
        later = parse(http.get(str(nxt[0])).text)
        bounded = parse(http.get("/ui/steps", params={"until": "1h"}).text)
    assert [a for _, a in first.elements if "data-live" in a]
    assert not [a for _, a in later.elements if "data-live" in a]
    assert not [a for _, a in bounded.elements if "data-live" in a]


def test_a_new_pending_request_arrives_on_the_approvals_stream(dash: Served) -> None:
    make_request(dash.store_url, task_type="before", created=time.time() - 60)
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        page = http.get("/ui/approvals").text
        stream = Events(http, _live_url(page))
        new = make_request(dash.store_url, task_type=f"t {TEXT}", destructive=True,
                           proposal={"plan": TEXT})
        (event,) = wait_for("the new request", lambda: stream.of("approval"))
    data = event["data"]
    assert data["href"] == f"/ui/approvals/{new.request_id}"
    assert visible(data["task_type"]) == visible(f"t {TEXT}") and data["destructive"]
    assert "before" not in json.dumps(stream.found)
    assert "\x1b" not in json.dumps(data, ensure_ascii=False)


def test_beyond_loopback_a_stream_needs_a_signed_in_person(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    served = start_serve(url, "--addr", "0.0.0.0",
                         env={"CLOSEDLOOP_DASHBOARD_USERS": f"vera:viewer:{VIEWER}"})
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as anon:
            refused = anon.get("/ui/live/steps")
        with signed_in(served, VIEWER) as vera:
            stream = Events(vera, "/ui/live/steps")
            wait_for("the stream to open", lambda: stream.status is not None)
    finally:
        served.stop()
    assert refused.status_code == 401 and stream.status == 200


def test_a_bad_cursor_is_refused_before_the_stream_starts(dash: Served) -> None:
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        assert http.get("/ui/live/steps", params={"cursor": "nope"}).status_code == 422
        assert http.get("/ui/live/steps", params={"label": "no"}).status_code == 422
        assert http.get("/ui/live/approvals", params={"since": "x"}).status_code == 422


def test_streams_are_bounded_and_end_when_the_server_stops(dash: Served) -> None:
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False,
                      limits=httpx.Limits(max_connections=MAX_STREAMS + 4)) as http:
        streams = [Events(http, "/ui/live/steps") for _ in range(MAX_STREAMS)]
        wait_for("every stream to open", lambda: all(s.status == 200 for s in streams))
        one_more = http.get("/ui/live/steps")
        assert one_more.status_code == 503 and "too many live views" in one_more.text
        assert dash.stop() == 0
        for s in streams:
            assert s.ended.wait(30)
    # ended by the server, not cancelled by uvicorn when its grace period ran out
    assert "Traceback" not in "".join(dash.err)
    assert "graceful shutdown exceeded" not in "".join(dash.err)


def test_a_quiet_stream_sends_heartbeats(dash: Served) -> None:
    # the heartbeat interval is the server's; wait for one (it is 10 s)
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        stream = Events(http, "/ui/live/steps")
        wait_for("a heartbeat", lambda: stream.comments, timeout=60)
    assert stream.comments[0] == ": keep-alive"


def test_the_overview_sends_its_figures_again_when_steps_arrive(dash: Served) -> None:
    _record(dash.store_url, *(_step(i, ts=time.time() - 100 + i) for i in range(3)))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        page = http.get("/ui/").text
        live = _live_url(page)
        assert live.startswith("/ui/live/overview?window=7d&state=")
        unchanged = Events(http, live)  # the page's state: nothing is sent until it changes
        stream = Events(http, "/ui/live/overview?window=7d")  # no state: the figures now
        (first,) = wait_for("the figures", lambda: stream.of("overview"))
        _record(dash.store_url, _step(10, task_type=f"t {TEXT}", outcome="failed"))
        later = wait_for("the figures with the new step",
                         lambda: [e for e in unchanged.of("overview")
                                  if e["data"]["tiles"]["runs"] == "4"])
    assert first["data"]["tiles"]["runs"] == "3" and first["id"]
    assert [c.get("text") for c in first["data"]["rows"][0]["cells"]][:3] == [
        "deploy", "3", "100.0%"]
    rows = later[0]["data"]["rows"]
    assert [r["cells"][0]["text"] for r in rows] == ["deploy", visible(f"t {TEXT}")]
    cell = rows[1]["cells"][0]
    assert cell["href"].startswith("/ui/steps?task_type=t+") and "\x1b" not in cell["text"]
    assert len(unchanged.of("overview")) == 1  # sent once, when it changed


def test_an_overview_stream_of_an_unknown_window_is_refused(dash: Served) -> None:
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        assert http.get("/ui/live/overview", params={"window": "1y"}).status_code == 422
