"""The dashboard's analysis pages over HTTP against a real ``closedloop serve``: step filters
(model, label, time range) with keyset pages, two traces side by side, failure clusters and
factors with their links, the autonomy evidence with promote and demote, and hostile stored
text shown as text on each of them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

import closedloop as cl
from closedloop.autonomy import AutonomyLevels
from closedloop.store import level_store_for

from .conftest import TOKEN, Served
from .dashboard_util import (
    APPROVER,
    TASK_TYPE,
    TEXT,
    assert_safe,
    csrf_of,
    parse,
    safe_texts,
    seed_hostile,
    signed_in,
    start_dashboard,
    visible,
)


def _step(i: int, *, outcome: str = "succeeded", model: str | None = None,
          labels: dict[str, str] | None = None, ago: float = 0.0,
          task_type: str = "deploy") -> cl.StepEvent:
    return cl.StepEvent(
        ts=time.time() - 1000 + i - ago, trace_id=f"{i + 1:032x}", agent_id="agent-1",
        task_type=task_type, autonomy="autonomous", outcome=outcome, attempts=1,
        input_tokens=10, output_tokens=5, latency_ms=12.5, validation_passed=True,
        verification_passed=outcome == "succeeded", error_type=None if outcome == "succeeded"
        else "verification", error_message=None if outcome == "succeeded"
        else f"row count differs by {i}", propose_ms=1.0, validate_ms=0.5, act_ms=8.0,
        verify_ms=2.0, detail=None, model=model, labels=labels)


def _traces(page: Any) -> list[str]:
    return [str(a["href"]).rsplit("/", 1)[-1] for t, a in page.elements
            if t == "a" and str(a.get("href", "")).startswith("/ui/traces/")]


def _all_pages(http: httpx.Client, path: str, **params: str) -> list[str]:
    seen: list[str] = []
    page = parse(http.get(path, params=params).text)
    while True:
        seen += _traces(page)
        nxt = [a["href"] for t, a in page.elements if t == "a" and a.get("rel") == "next"]
        if not nxt:
            return seen
        page = parse(http.get(str(nxt[0])).text)


@pytest.fixture
def dash(store_url: str) -> Iterator[Served]:
    s = start_dashboard(store_url)
    yield s
    s.stop()


def test_steps_are_filtered_by_model_label_and_time_across_pages(dash: Served) -> None:
    with cl.open_store(dash.store_url) as store:
        for i in range(130):
            store.record(_step(i, model="m-a" if i % 2 else "m-b",
                               labels={"tier": "gold" if i % 3 == 0 else "free"},
                               ago=86400 * 3 if i < 20 else 0.0))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        by_model = _all_pages(http, "/ui/steps", model="m-a")
        by_label = _all_pages(http, "/ui/steps", label="tier=gold", model="m-b")
        recent = _all_pages(http, "/ui/steps", since="2d")
        old = _all_pages(http, "/ui/steps", until="2d")
        window = _all_pages(http, "/ui/steps", since=time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() - 4 * 86400)), until="2d")
        form = parse(http.get("/ui/steps", params={"label": "tier=gold"}).text)
        bad = [http.get("/ui/steps", params=p) for p in (
            {"label": "tier"}, {"label": "bad key=x"}, {"since": "yesterday"})]
    ids = {i: f"{i + 1:032x}" for i in range(130)}
    assert sorted(by_model) == sorted(ids[i] for i in range(130) if i % 2)
    assert sorted(by_label) == sorted(ids[i] for i in range(130) if i % 6 == 0)
    assert sorted(recent) == sorted(ids[i] for i in range(20, 130))
    assert sorted(old) == sorted(window) == sorted(ids[i] for i in range(20))
    assert {"name": "label", "value": "tier=gold", "size": "14",
            "placeholder": "key=value"} in [a for t, a in form.elements if t == "input"]
    assert [b.status_code for b in bad] == [422, 422, 422]
    assert "KEY=VALUE" in bad[0].text and "2026-05-01T12:00" in bad[2].text


def _two_traces(url: str) -> tuple[str, str]:
    from closedloop.telemetry import StoreExporter, Telemetry

    store = cl.open_store(url)
    pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
    ids = []
    for size in ("t3.small", "t3.huge"):
        def agent(task: Any, attempt: cl.Attempt, size: str = size) -> dict[str, str]:
            return {"size": size}

        loop = cl.Loop(agent, task_type="deploy",
                       executor=lambda p: p, store=store, telemetry=pipeline, guards=(),
                       verifiers=[lambda task, result: None if result["size"] == "t3.small"
                                  else cl.Verdict.fail("too big")], max_attempts=1)
        ids.append(loop.run({"ask": "a server"}).trace_id)
    pipeline.shutdown()
    store.close()
    return ids[0], ids[1]


def test_two_traces_picked_from_the_list_are_shown_side_by_side(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    a, b = _two_traces(url)
    served = start_dashboard(url)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            listing = parse(http.get("/ui/traces").text)
            picked = parse(http.get("/ui/diff", params=[("t", a), ("t", b)]).text)
            same = parse(http.get("/ui/diff", params={"a": a, "b": a}).text)
            asks: list[Any] = [
                [("t", a)], [("a", a), ("b", "f" * 32)], [("a", a), ("b", "<x>")], [("a", a)]]
            errors = [http.get("/ui/diff", params=p).status_code for p in asks]
    finally:
        served.stop()
    assert {"method": "get", "action": "/ui/diff", "class": "compare"} in listing.forms()
    boxes = [str(a_["value"]) for t, a_ in listing.elements
             if t == "input" and a_.get("name") == "t"]
    assert sorted(boxes) == sorted([a, b])
    rows = [r for t, r in picked.elements if t == "tr" and "diverges" in str(r.get("class"))]
    assert rows
    assert "They first split at closedloop.step / closedloop.attempt / " in picked.text
    assert "closedloop.proposal" in picked.text and "t3.small" in picked.text
    assert "t3.huge" in picked.text and "too big" in picked.text
    assert "No stage differs." in same.text
    assert errors == [422, 404, 404, 404]


def test_failure_clusters_link_their_example_traces(dash: Served) -> None:
    with cl.open_store(dash.store_url) as store:
        for i in range(12):
            store.record(_step(i, outcome="failed" if i % 3 == 0 else "succeeded"))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        page = parse(http.get("/ui/failures").text)
        other = parse(http.get("/ui/failures", params={"task_type": "plan"}).text)
        bad = http.get("/ui/failures", params={"window": "1y"})
    assert "4 failed of 12 steps" in page.text
    assert "verification row count differs by <*>" in page.text
    assert set(_traces(page)) <= {f"{i + 1:032x}" for i in (0, 3, 6, 9)}
    assert len(_traces(page)) == 3  # the newest examples
    assert "No step failed in this period." in other.text
    assert bad.status_code == 422


def test_factors_rank_dimensions_and_link_to_the_steps_of_a_value(dash: Served) -> None:
    with cl.open_store(dash.store_url) as store:
        for i in range(200):
            model = "m-bad" if i % 2 else "m-good"
            failed = (i % 2 == 1 and i % 5 != 0) or i % 17 == 0
            store.record(_step(i, outcome="failed" if failed else "succeeded", model=model,
                               labels={"region": "eu" if i % 3 else "us"}))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        page = parse(http.get("/ui/factors").text)
    assert page.text.index("model significant") < page.text.index("label:region")
    assert "m-bad1008181.0%" in page.text  # value, steps, failed, rate
    links = [str(a["href"]) for t, a in page.elements if t == "a"]
    assert "/ui/steps?model=m-bad" in links and "/ui/steps?label=region%3Deu" in links


def test_the_autonomy_page_shows_the_evidence_and_its_recommendation(dash: Served) -> None:
    with cl.open_store(dash.store_url) as store:
        AutonomyLevels(store, sinks=[]).set("deploy", "approve", by="dana", reason="start")
        time.sleep(0.01)
        for i in range(30):
            store.record(_step(i, outcome="failed" if i % 10 == 0 else "succeeded")
                         ._replace(ts=time.time(), autonomy="approve"))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        page = parse(http.get("/ui/autonomy").text)
    row = page.text[page.text.index("deploy approve"):page.text.index("History")]
    assert "90.0% ≥ 74.4% · 27/30" in row  # verification: rate, Wilson lower bound, counts
    assert "autonomous: not yet" in row and "more verified executions" in row
    assert "startdana ·" in row  # the reason, then who and when


def test_an_admin_promotes_and_demotes_with_a_reason_and_the_evidence(dash: Served) -> None:
    with cl.open_store(dash.store_url) as store:
        store.record(_step(1))
    with signed_in(dash, APPROVER) as alice:
        csrf = csrf_of(alice.get("/ui/autonomy").text)
        assert alice.post("/ui/autonomy/set", data={
            "task_type": "deploy", "level": "suggest", "reason": "x", "csrf": csrf,
        }).status_code == 403
    with signed_in(dash, TOKEN) as admin:
        page = parse(admin.get("/ui/autonomy").text)
        buttons = {str(a["value"]): a.get("class") for t, a in page.elements
                   if t == "button" and a.get("name") == "level"}
        csrf = csrf_of(admin.get("/ui/autonomy").text)
        moves = [admin.post("/ui/autonomy/set", data={
            "task_type": "deploy", "level": level, "reason": why, "csrf": csrf})
            for level, why in (("approve", "new pipeline"), ("autonomous", "it held up"))]
        missing = admin.post("/ui/autonomy/set", data={"task_type": "deploy",
                                                       "level": "suggest", "csrf": csrf})
    assert buttons == {"approve": "demote"}  # the default, autonomous, is the top
    assert [m.status_code for m in moves] == [303, 303] and missing.status_code == 422
    with cl.open_store(dash.store_url) as store:
        changes = level_store_for(store).history(task_type="deploy")
    assert [(c.kind, c.new, c.by, c.reason) for c in changes] == [
        ("promoted", "autonomous", "admin (web)", "it held up"),
        ("demoted", "approve", "admin (web)", "new pipeline")]


def test_hostile_stored_text_is_text_on_the_analysis_pages(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    first = seed_hostile(url)
    second = seed_hostile(url)
    with cl.open_store(url) as store:
        for i in range(40):
            store.record(_step(i, outcome="failed" if i % 2 else "succeeded",
                               model=f"model {TEXT}"[:200] if i % 4 < 2 else "plain",
                               labels={"tier": f"v {TEXT}"[:200] if i % 3 else "x"},
                               task_type=TASK_TYPE))
        AutonomyLevels(store, sinks=[]).set(TASK_TYPE, "approve", by="dana",
                                            reason=f"why {TEXT}")
    served = start_dashboard(url)
    model = quote(f"model {TEXT}"[:200])
    try:
        with signed_in(served, TOKEN) as http:
            pages = {p: http.get(p) for p in (
                "/ui/failures", "/ui/factors", "/ui/autonomy",
                f"/ui/diff?a={first['trace_id']}&b={second['trace_id']}",
                f"/ui/steps?model={model}")}
    finally:
        served.stop()
    texts = safe_texts(pages)
    shown = visible(TEXT)
    assert visible(TASK_TYPE) in texts["/ui/failures"]
    assert "verifier says <script>alert(<*>)</script>" in texts["/ui/failures"]  # a template
    assert "\\u202eevil &amp; {{" in texts["/ui/failures"]
    assert visible(f"model {TEXT}"[:200]) in texts["/ui/factors"]
    assert visible(f"v {TEXT}"[:200]) in texts["/ui/factors"]
    assert f"why {shown}" in texts["/ui/autonomy"] and visible(TASK_TYPE) in texts["/ui/autonomy"]
    diff = texts[f"/ui/diff?a={first['trace_id']}&b={second['trace_id']}"]
    assert f"verifier says {shown}" in diff and visible(TASK_TYPE) in diff
    assert "No steps match" not in texts[f"/ui/steps?model={model}"]


def test_unnamed_runs_of_one_process_are_told_apart(dash: Served) -> None:
    from closedloop.loop import new_step_id
    from closedloop.store import RunRecord

    ids = [new_step_id() for _ in range(3)]  # as cl.Run makes them: one prefix, a count
    now = time.time()
    with cl.open_store(dash.store_url) as store:
        store.runs().put_runs([RunRecord(run_id=run_id, name=None, started=now - 10 + i,
                                         ended=now - 5 + i, outcome="succeeded", steps=1,
                                         message=None) for i, run_id in enumerate(ids)])
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        page = parse(http.get("/ui/runs").text)
    shown = [text for run_id in ids for text in [f"{run_id[:6]}\u2026{run_id[-6:]}"]
             if text in page.text]
    assert len(shown) == 3 and len(set(shown)) == 3


def test_runs_are_filtered_paged_and_link_to_their_steps(dash: Served) -> None:
    from closedloop.store import RunRecord

    now = time.time()
    with cl.open_store(dash.store_url) as store:
        store.runs().put_runs([RunRecord(
            run_id=f"run-{i:03d}", name=f"job {i}" if i else f"job {TEXT}"[:200],
            started=now - 1000 + i - (86400 * 3 if i < 10 else 0), ended=now - 900 + i,
            outcome="halted" if i % 4 == 0 else "succeeded", steps=2,
            message=f"halted: {TEXT}" if i % 4 == 0 else None) for i in range(70)])
        for i in range(6):
            store.record(_step(i)._replace(run_id="run-011" if i % 2 else "run-012"))
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        def names(**params: str) -> list[str]:
            out: list[str] = []
            page = parse(http.get("/ui/runs", params=params).text)
            while True:
                out += [str(a["href"]).rsplit("=", 1)[-1] for t, a in page.elements
                        if t == "a" and str(a.get("href", "")).startswith("/ui/steps?run_id=")]
                nxt = [a["href"] for t, a in page.elements if t == "a" and a.get("rel") == "next"]
                if not nxt:
                    return out
                page = parse(http.get(str(nxt[0])).text)

        every, halted, recent = names(), names(outcome="halted"), names(since="2d")
        of_run = _all_pages(http, "/ui/steps", run_id="run-011")
        first = http.get("/ui/runs", params={"outcome": "halted"})
    assert every == [f"run-{i:03d}" for i in range(69, 9, -1)] + [
        f"run-{i:03d}" for i in range(9, -1, -1)]
    assert sorted(halted) == sorted(f"run-{i:03d}" for i in range(0, 70, 4))
    assert sorted(recent) == sorted(f"run-{i:03d}" for i in range(10, 70))
    assert sorted(of_run) == sorted(f"{i + 1:032x}" for i in (1, 3, 5))
    text = assert_safe(first.text).text
    assert f"job {visible(TEXT)}"[:60] in text
    assert f"halted: {visible(TEXT)}"[:120] in text  # (PostgreSQL keeps no NUL)
