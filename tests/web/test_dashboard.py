"""The dashboard of ``closedloop serve`` (``/ui``), over HTTP against a real server: its
pages, stored text shown as text, sign-in, roles, CSRF and the audit trail of each write."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

import closedloop as cl
from closedloop import approvals as ap
from closedloop.control import Stop, StopKind, ledger_for_store
from closedloop.loop import new_trace_id

from .conftest import TOKEN, Served, make_request, start_serve, stored
from .dashboard_util import (
    APPROVER,
    PRINTABLE,
    TASK_TYPE,
    TEXT,
    VIEWER,
    assert_safe,
    csrf_of,
    parse,
    safe_texts,
    seed_hostile,
    signed_in,
    start_dashboard,
    visible,
)

PAGES = ("/ui/", "/ui/steps", "/ui/traces", "/ui/approvals", "/ui/control", "/ui/autonomy",
         "/ui/failures", "/ui/factors", "/ui/login")


@pytest.fixture
def dash(store_url: str) -> Iterator[Served]:
    s = start_dashboard(store_url)
    yield s
    s.stop()


def _step(i: int, *, outcome: str = "succeeded", task_type: str = "deploy",
          ago: float = 0.0) -> cl.StepEvent:
    return cl.StepEvent(
        ts=time.time() - 1000 + i - ago, trace_id=f"{i + 1:032x}", agent_id="agent-1",
        task_type=task_type, autonomy="autonomous", outcome=outcome, attempts=1,
        input_tokens=10, output_tokens=5, latency_ms=12.5, validation_passed=True,
        verification_passed=outcome == "succeeded", error_type=None if outcome == "succeeded"
        else "verification", error_message=None, propose_ms=1.0, validate_ms=0.5,
        act_ms=8.0, verify_ms=2.0, detail=None)


def _halt(store_url: str, task_type: str = "deploy") -> None:
    with cl.open_store(store_url) as store:
        ledger_for_store(store, redis_url=None).put(Stop(
            task_type=task_type, kind=StopKind.HALTED, reason="verification kept failing",
            by="fault-control", at=time.time(), evidence={"failed": 5, "window": 20}))


def test_every_page_answers_html_with_a_strict_policy(dash: Served) -> None:
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        assert http.get("/").headers["location"] == "/ui/"
        for path in PAGES:
            answer = http.get(path)
            assert answer.status_code == 200, (path, answer.text)
            assert answer.headers["content-type"].startswith("text/html")
            policy = answer.headers["content-security-policy"]
            assert "default-src 'none'" in policy and "script-src 'self';" in policy
            assert "unsafe" not in policy and "connect-src 'self'" in policy
            assert answer.headers["x-frame-options"] == "DENY"
            assert_safe(answer.text)
        css = http.get("/ui/static/dashboard.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
        js = http.get("/ui/static/live.js")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert "innerHTML" not in js.text and "textContent" in js.text
        assert http.get("/ui/static/../_app.py").status_code == 404
        assert http.get("/ui/static/other.js").status_code == 404


def test_overview_shows_each_task_type_with_its_rates_and_state(store_url: str) -> None:
    with cl.open_store(store_url) as store:
        for i in range(8):
            store.record(_step(i, outcome="succeeded" if i % 4 else "failed"))
        store.record(_step(9, task_type="billing"))
    _halt(store_url)
    make_request(store_url, task_type="deploy")
    served = start_dashboard(store_url)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            page = parse(http.get("/ui/").text)
    finally:
        served.stop()
    # per task type: steps, validation and verification pass rates, p95, level, state,
    # pending approvals
    # (no trend line: every step is in one hour; the p95 is estimated within its latency
    # bucket, 10-20 ms, by rank: the top of 8 steps near its top, of 1 in the middle)
    assert "billing 1 100.0% \u2013 100.0% \u2013 15.0 ms default running 0" in page.text
    assert "deploy 8 100.0% \u2013 75.0% \u2013 19.4 ms default halted 1" in page.text
    assert not [a for t, a in page.elements if t == "polyline"]


def test_overview_draws_the_daily_pass_rates_as_sparklines(store_url: str) -> None:
    with cl.open_store(store_url) as store:
        for day, outcomes in enumerate((["succeeded"] * 4, ["failed"] * 4,
                                        ["succeeded", "failed"] * 2)):
            for i, outcome in enumerate(outcomes):
                store.record(_step(day * 10 + i, outcome=outcome, ago=(3 - day) * 86400))
    served = start_dashboard(store_url)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            page = parse(http.get("/ui/").text)
    finally:
        served.stop()
    lines = [str(a["points"]) for t, a in page.elements if t == "polyline"]
    assert len(lines) == 2  # validation, verification
    verification = [float(p.split(",")[1]) for p in lines[1].split()]
    assert len(verification) == 3
    # SVG y grows downwards: 100% is high, 0% low, 50% between
    assert verification[0] < verification[2] < verification[1]


def test_steps_are_paged_with_the_stores_cursor_and_filtered(store_url: str) -> None:
    with cl.open_store(store_url) as store:
        for i in range(120):
            store.record(_step(i, outcome="failed" if i % 3 == 0 else "succeeded"))
    served = start_dashboard(store_url)
    seen: list[str] = []
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            path: str | None = "/ui/steps"
            while path is not None:
                page = parse(http.get(path).text)
                seen += [str(a["href"]) for t, a in page.elements
                         if t == "a" and str(a.get("href", "")).startswith("/ui/traces/")]
                nxt = [a["href"] for t, a in page.elements if t == "a" and a.get("rel") == "next"]
                path = str(nxt[0]) if nxt else None
            failed = parse(http.get("/ui/steps", params={"outcome": "failed"}).text)
            bad = http.get("/ui/steps", params={"cursor": "not-a-cursor"})
    finally:
        served.stop()
    assert len(seen) == 120 and len(set(seen)) == 120
    assert seen[0] == f"/ui/traces/{120:032x}"  # newest first
    rows = [a for t, a in failed.elements if t == "a" and
            str(a.get("href", "")).startswith("/ui/traces/")]
    assert len(rows) == 40
    assert bad.status_code == 422


def test_steps_show_the_random_end_of_their_trace_ids(store_url: str) -> None:
    # Trace ids start with their step's time in ms (UUIDv7-like): steps of the same ms share
    # their first 12 digits, so the short form shown is the random end.
    made = [new_trace_id() for _ in range(3)]
    ids = [made[0][:12] + tail[12:] for tail in made]  # as if made in the same millisecond
    with cl.open_store(store_url) as store:
        for i, trace_id in enumerate(ids):
            store.record(_step(i)._replace(trace_id=trace_id))
    served = start_dashboard(store_url)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            page = parse(http.get("/ui/steps").text)
    finally:
        served.stop()
    assert all(trace_id[-12:] in page.text for trace_id in ids)
    assert ids[0][:12] not in page.text


def test_hostile_stored_text_is_shown_as_text_on_every_page(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    seeded = seed_hostile(url)
    served = start_dashboard(url)
    try:
        with signed_in(served, TOKEN) as http:
            pages = {p: http.get(p) for p in (
                "/ui/", f"/ui/steps?task_type={quote(TASK_TYPE)}", "/ui/traces", "/ui/approvals",
                "/ui/control", f"/ui/traces/{seeded['trace_id']}",
                f"/ui/approvals/{seeded['request_id']}")}
    finally:
        served.stop()
    texts = safe_texts(pages)
    shown = visible(TEXT)
    assert visible(TASK_TYPE) in texts["/ui/"]
    assert visible(TASK_TYPE) in texts["/ui/traces"]
    steps = texts[f"/ui/steps?task_type={quote(TASK_TYPE)}"]
    assert f"{visible(TASK_TYPE)} failed" in steps and "No steps match" not in steps
    trace = texts[f"/ui/traces/{seeded['trace_id']}"]
    assert f"verifier says {shown}" in trace and f"validator says {shown}" in trace
    assert f"reason {shown}" in texts["/ui/control"] and f"by {shown}" in texts["/ui/control"]
    request = texts[f"/ui/approvals/{seeded['request_id']}"]
    assert f"agent {visible(PRINTABLE)}" in request and f"message {shown}" in request
    assert f"check {shown}" in request


def test_a_write_needs_a_signed_in_approver_and_the_forms_csrf_token(dash: Served) -> None:
    rid = make_request(dash.store_url).request_id
    path = f"/ui/approvals/{rid}/decide"
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as anon:
        assert anon.post(path, data={"action": "approve"}).status_code == 401
        # the API token as a bearer header does not stand in for a signed-in person
        assert anon.post(path, data={"action": "approve"},
                         headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 401
        refused = anon.post("/ui/login", data={"token": "wrong-token-0123456789abcdef"})
        assert refused.status_code == 401 and "closedloop_session" not in refused.cookies
    with signed_in(dash, VIEWER) as viewer:
        form = viewer.get(f"/ui/approvals/{rid}")
        assert "Approve as" not in form.text
        assert viewer.post(path, data={"action": "approve", "csrf": csrf_of(form.text)}
                           ).status_code == 403
    with signed_in(dash, APPROVER) as alice:
        csrf = csrf_of(alice.get(f"/ui/approvals/{rid}").text)
        assert alice.post(path, data={"action": "approve"}).status_code == 403
        assert alice.post(path, data={"action": "approve", "csrf": "x" * 43}).status_code == 403
        other_site = alice.post(path, data={"action": "approve", "csrf": csrf},
                                headers={"Origin": "http://evil.example"})
        assert other_site.status_code == 403
        assert stored(dash.store_url, rid).status is ap.ApprovalStatus.PENDING
        done = alice.post(path, data={"action": "approve", "csrf": csrf, "reason": "fine"})
        assert done.status_code == 303
        page = alice.get(done.headers["location"])
    assert "Approved." in page.text
    after = stored(dash.store_url, rid)
    assert after.status is ap.ApprovalStatus.APPROVED
    with cl.open_store(dash.store_url) as store:
        history = ap.get_request(rid, store=store).history
    assert [(h.action, h.by, h.reason) for h in history][-1] == ("approved", "alice (web)",
                                                                 "fine")


def test_the_session_cookie_is_http_only_and_same_site_strict(dash: Served) -> None:
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        answer = http.post("/ui/login", data={"token": APPROVER})
    cookie = answer.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    with signed_in(dash, APPROVER) as alice:
        csrf = csrf_of(alice.get("/ui/").text)
        assert alice.post("/ui/logout", data={"csrf": csrf}).status_code == 303
        assert alice.post("/ui/logout", data={"csrf": csrf}).status_code == 401


def test_reject_needs_a_reason_and_records_who(dash: Served) -> None:
    rid = make_request(dash.store_url).request_id
    with signed_in(dash, APPROVER) as alice:
        csrf = csrf_of(alice.get(f"/ui/approvals/{rid}").text)
        path = f"/ui/approvals/{rid}/decide"
        assert alice.post(path, data={"action": "reject", "csrf": csrf}).status_code == 422
        assert alice.post(path, data={"action": "reject", "csrf": csrf,
                                      "reason": "too big"}).status_code == 303
    with cl.open_store(dash.store_url) as store:
        found = ap.get_request(rid, store=store)
    assert found.status is ap.ApprovalStatus.REJECTED
    assert (found.history[-1].by, found.history[-1].reason) == ("alice (web)", "too big")


def test_resume_needs_an_admin_and_a_reason_and_is_logged(dash: Served) -> None:
    _halt(dash.store_url)
    with signed_in(dash, APPROVER) as alice:
        page = alice.get("/ui/control")
        assert "Resume deploy" not in page.text
        assert alice.post("/ui/control/resume", data={
            "task_type": "deploy", "reason": "fixed", "csrf": csrf_of(page.text)}
        ).status_code == 403
    with signed_in(dash, TOKEN) as admin:
        csrf = csrf_of(admin.get("/ui/control").text)
        assert admin.post("/ui/control/resume", data={
            "task_type": "deploy", "reason": " ", "csrf": csrf}).status_code == 422
        with cl.open_store(dash.store_url) as store:
            assert [s.task_type for s in ledger_for_store(store, redis_url=None).stops()] == [
                "deploy"]
        done = admin.post("/ui/control/resume", data={
            "task_type": "deploy", "reason": "AMI fixed", "csrf": csrf})
        assert done.status_code == 303
        again = admin.post("/ui/control/resume", data={
            "task_type": "deploy", "reason": "AMI fixed", "csrf": csrf})
        assert again.status_code == 409
    with cl.open_store(dash.store_url) as store:
        ledger = ledger_for_store(store, redis_url=None)
        assert ledger.stops() == []
        last = ledger.history(1)[0]
    assert (last["event"], last["by"], last["reason"]) == ("resumed", "admin (web)",
                                                          "AMI fixed")


def test_without_users_or_token_the_dashboard_is_read_only(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    rid = make_request(url).request_id
    served = start_serve(url, token=None)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            assert http.get("/ui/approvals").status_code == 200
            assert "read-only" in http.get("/ui/login").text
            assert http.post("/ui/login", data={"token": TOKEN}).status_code == 401
            assert http.post(f"/ui/approvals/{rid}/decide",
                             data={"action": "approve"}).status_code == 401
    finally:
        served.stop()
    assert stored(url, rid).status is ap.ApprovalStatus.PENDING


def test_beyond_loopback_every_page_needs_a_signed_in_person(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    served = start_serve(url, "--addr", "0.0.0.0",
                         env={"CLOSEDLOOP_DASHBOARD_USERS": f"vera:viewer:{VIEWER}"})
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            for path in PAGES[:-1]:
                assert http.get(path).status_code == 401, path
            assert http.get("/ui/login").status_code == 200
        with signed_in(served, VIEWER) as vera:
            for path in PAGES:
                assert vera.get(path).status_code == 200, path
    finally:
        served.stop()


def test_a_trace_page_shows_the_span_tree_and_the_proposal(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    seeded = seed_hostile(url)
    served = start_dashboard(url)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            page = parse(http.get(f"/ui/traces/{seeded['trace_id']}").text)
            missing = http.get(f"/ui/traces/{uuid.uuid4().hex}")
            bad = http.get("/ui/traces/not-hex")
    finally:
        served.stop()
    names = [a.get("class") for t, a in page.elements if t == "li"]
    assert "span depth-0" in names and any(str(n).startswith("span depth-1") for n in names)
    assert "closedloop.step" in page.text and "Proposal" in page.text
    assert missing.status_code == 404 and bad.status_code == 404


def test_the_overview_covers_the_last_7_days_unless_asked(store_url: str) -> None:
    with cl.open_store(store_url) as store:
        store.record(_step(1))
        store.record(_step(2, ago=10 * 86400))
        store.record(_step(3, ago=40 * 86400))
    served = start_dashboard(store_url)
    try:
        with httpx.Client(base_url=served.url, timeout=30, trust_env=False) as http:
            counts = {w: parse(http.get("/ui/", params=w and {"window": w}).text).text
                      for w in ("", "24h", "30d", "all")}
            bad = http.get("/ui/", params={"window": "1y"})
    finally:
        served.stop()
    assert "deploy 1 " in counts[""] and "deploy 1 " in counts["24h"]
    assert "deploy 2 " in counts["30d"] and "deploy 3 " in counts["all"]
    assert bad.status_code == 422


def test_live_pages_reload_themselves_and_show_new_requests(dash: Served) -> None:
    with httpx.Client(base_url=dash.url, timeout=30, trust_env=False) as http:
        before = parse(http.get("/ui/approvals", params={"live": "1"}).text)
        refresh = [a for t, a in before.elements if t == "meta" and a.get("http-equiv")]
        assert refresh == [{"http-equiv": "refresh", "content": "10"}]
        assert not [a for t, a in parse(http.get("/ui/approvals").text).elements
                    if t == "meta" and a.get("http-equiv")]
        make_request(dash.store_url, task_type="late.arrival")
        after = parse(http.get("/ui/approvals", params={"live": "1"}).text)
    assert "late.arrival" not in before.text and "late.arrival" in after.text


def test_an_admin_sets_a_level_with_a_reason_and_it_is_audited(dash: Served) -> None:
    from closedloop.store import level_store_for

    with cl.open_store(dash.store_url) as store:
        store.record(_step(1))
    form = {"task_type": "deploy", "level": "approve", "reason": "new AMI pipeline"}
    with signed_in(dash, APPROVER) as alice:
        csrf = csrf_of(alice.get("/ui/").text)
        assert "Set" not in parse(alice.get("/ui/autonomy").text).text.split()
        assert alice.post("/ui/autonomy/set", data={**form, "csrf": csrf}).status_code == 403
    with signed_in(dash, TOKEN) as admin:
        csrf = csrf_of(admin.get("/ui/autonomy").text)
        assert admin.post("/ui/autonomy/set", data={**form, "reason": "", "csrf": csrf}
                          ).status_code == 422
        assert admin.post("/ui/autonomy/set", data={**form, "level": "godmode", "csrf": csrf}
                          ).status_code == 422
        assert admin.post("/ui/autonomy/set", data={**form, "csrf": csrf}).status_code == 303
        page = parse(admin.get("/ui/autonomy").text).text
    assert "none → approve" in page and "admin (web)new AMI pipeline" in page
    with cl.open_store(dash.store_url) as store:
        (change,) = level_store_for(store).history(task_type="deploy")
    assert (change.new, change.by, change.reason) == ("approve", "admin (web)",
                                                      "new AMI pipeline")
