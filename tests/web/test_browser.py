"""The dashboard in a real browser: Playwright driving Debian's Chromium (``/usr/bin/chromium``,
no browser download) against a real ``closedloop serve``: the overview after the demo, a failed
trace, approving a request that then executes once, resuming a halt, and a write refused
without signing in."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from _services import program
from closedloop import approvals as ap
from closedloop.control import Stop, StopKind, ledger_for_store
from closedloop.learn import DriftGuard, Firing

from .conftest import TOKEN, Served, make_request, stored
from .dashboard_util import APPROVER, start_dashboard

pytestmark = [pytest.mark.slow, pytest.mark.requires("chromium", "playwright")]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = program("chromium")  # Debian's /usr/bin/chromium
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        found = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield found
        found.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def sign_in(page: Any, served: Served, token: str) -> None:
    page.goto(f"{served.url}/ui/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_load_state()
    assert page.url == f"{served.url}/ui/?done=signed_in", (page.url, page.content()[:3000])
    assert page.locator(".notice").inner_text() == "Signed in."


def test_the_overview_after_the_demo_and_a_failed_trace(tmp_path: Path, page: Any) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    subprocess.run([sys.executable, "-m", "closedloop", "demo", "--requests", "30",
                    "--store", url], check=True, capture_output=True, timeout=300)
    served = start_dashboard(url)
    try:
        page.goto(f"{served.url}/")
        assert page.title() == "Overview · closedloop"
        row = page.locator("table.grid tbody tr", has_text="ec2.provision")
        assert row.locator("td").nth(1).inner_text() == "30"
        page.click("nav >> text=Steps")
        page.select_option("select[name=outcome]", "failed")
        page.click("text=Filter")
        assert "outcome=failed" in page.url
        first = page.locator("table.grid tbody tr").first
        assert first.locator(".badge").inner_text() == "failed"
        first.locator("a.mono").click()
        assert page.locator("h1").inner_text().startswith("Trace ")
        error = page.locator("dd.error-text").first.inner_text()
        assert error.startswith(("verification", "validation"))
        assert page.locator("li.span").count() >= 3
        assert page.locator("li.span.failed, ul.verdicts li").count() >= 1
        assert page.locator("pre.content").first.inner_text().lstrip().startswith("{")
    finally:
        served.stop()


def test_approve_in_the_browser_then_it_executes_once(tmp_path: Path, page: Any) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    calls: list[Any] = []

    def executor(proposal: Any) -> dict[str, Any]:
        calls.append(proposal)
        return {"applied": proposal}

    with cl.open_store(url) as store:
        loop = cl.Loop(lambda task, attempt: {"type": task["type"], "size": "t3.small"},
                       task_type="deploy", agent_id="deployer", executor=executor,
                       verifiers=[lambda task, result: None], store=store, guards=(),
                       autonomy="approve")
        asked = loop.run({"type": "web"})
        rid = asked.approval_id
        assert rid is not None and store.flush()
        served = start_dashboard(url)
        try:
            sign_in(page, served, APPROVER)
            page.click("nav >> text=Approvals")
            page.locator("article.request", has_text="deploy").locator("text=Review").click()
            assert page.locator("#status").inner_text() == "pending"
            page.fill("#reason", "size is fine")
            page.click("button.approve")
            page.wait_for_url(f"**/ui/approvals/{rid}?done=approved")
            assert page.locator("#status").inner_text() == "approved"
            executed = loop.run_approved()
            assert loop.run_approved() is None  # once
            page.reload()
            assert page.locator("#status").inner_text() == "executed"
            history = page.locator("table.grid").last.inner_text()
        finally:
            served.stop()
    assert executed is not None and executed.outcome is cl.Outcome.SUCCEEDED
    assert calls == [{"type": "web", "size": "t3.small"}]
    assert "alice (web)" in history and "size is fine" in history


def test_resume_a_halt_in_the_browser(tmp_path: Path, page: Any) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with cl.open_store(url) as store:
        ledger_for_store(store, redis_url=None).put(Stop(
            task_type="deploy", kind=StopKind.HALTED, reason="verification kept failing",
            by="fault-control", at=time.time(), evidence={"failed": 5, "window": 20}))
    served = start_dashboard(url)
    try:
        sign_in(page, served, TOKEN)
        assert page.locator("a.tile.bad .big").inner_text() == "1"  # paused or halted
        page.click("nav >> text=Control")
        card = page.locator("section.stop", has_text="deploy")
        assert "verification kept failing" in card.inner_text()
        card.locator("input[name=reason]").fill("AMI fixed")
        card.locator("button[type=submit]").click()
        page.wait_for_url("**/ui/control?done=resumed")
        assert page.locator("text=No task type is paused or halted.").is_visible()
        assert "admin (web)" in page.locator("table.grid").inner_text()
    finally:
        served.stop()
    with cl.open_store(url) as store:
        assert ledger_for_store(store, redis_url=None).stops() == []


def test_a_write_without_signing_in_is_refused(tmp_path: Path, page: Any) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    rid = make_request(url).request_id
    served = start_dashboard(url)
    try:
        page.goto(f"{served.url}/ui/approvals/{rid}")
        assert page.locator("form[action$='/decide']").count() == 0
        assert page.locator("text=as an approver to decide").is_visible()
        refused = page.request.post(f"{served.url}/ui/approvals/{rid}/decide",
                                    form={"action": "approve", "reason": "sneaky"})
        assert refused.status == 401
        assert "sign in first" in refused.text()
    finally:
        served.stop()
    assert stored(url, rid).status is ap.ApprovalStatus.PENDING


def test_a_step_and_a_request_stored_after_the_page_opened_appear_as_text(
        tmp_path: Path, page: Any) -> None:
    from .dashboard_util import TEXT

    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with cl.open_store(url) as store:
        store.record(_step(1, "deploy", None))
    dialogs: list[str] = []

    def dialog(d: Any) -> None:
        dialogs.append(d.message)
        d.dismiss()

    page.on("dialog", dialog)
    served = start_dashboard(url)
    try:
        page.goto(f"{served.url}/ui/steps")
        page.wait_for_selector("#live-status:not([hidden])")
        assert page.locator("#steps tbody tr").count() == 1
        with cl.open_store(url) as store:
            store.record(_step(2, f"hostile {TEXT}", f"says {TEXT}"))
        row = page.locator("#steps tbody tr").first
        row.locator("text=says").wait_for()
        assert page.locator("#steps tbody tr").count() == 2  # no reload: the old row stays
        assert row.locator("td").nth(1).inner_text().startswith(
            "hostile <script>alert(1)</script> \"><img src=x onerror=alert(2)>")
        assert "\\x1b[31mred" in row.locator("td").nth(7).inner_text()
        assert page.locator("#steps script, #steps img, #steps b:not(:first-child)").count() == 0
        assert row.locator("a.mono").get_attribute("href") == f"/ui/traces/{3:032x}"

        page.goto(f"{served.url}/ui/approvals")
        page.wait_for_selector("#live-status:not([hidden])")
        assert page.locator("[data-live-count]").inner_text() == "0"
        make_request(url, task_type=f"t {TEXT}", proposal={"plan": TEXT}, destructive=True)
        card = page.locator("article.request").first
        card.wait_for()
        assert card.locator("h3 a").inner_text().startswith("t <script>alert(1)</script>")
        assert page.locator("[data-live-count]").inner_text() == "1"
        assert page.locator(".queue script, .queue img").count() == 0
        card.locator("text=Review").click()
        page.wait_for_load_state()
        assert page.locator("#status").inner_text() == "pending"
    finally:
        served.stop()
    assert dialogs == []


def test_the_overview_updates_its_figures_without_a_reload(tmp_path: Path,
                                                           page: Any) -> None:
    from .dashboard_util import TEXT

    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    dialogs: list[str] = []
    def on_dialog(dialog: Any) -> None:
        dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    served = start_dashboard(url)
    try:
        page.goto(f"{served.url}/ui/")
        page.wait_for_selector("#live-status:not([hidden])")
        assert page.locator("[data-field=runs]").inner_text() == "0"
        assert page.locator("text=No steps in the last 7d.").is_visible()
        page.evaluate("window.notReloaded = true")
        with cl.open_store(url) as store:
            store.record(_step(1, "deploy", None))
            store.record(_step(2, f"hostile {TEXT}", "wrong"))
            DriftGuard(store=store, sinks=[], save_every=0).act([Firing(
                task_type="deploy", model=None, signal="verification", actions=("alert",),
                at=time.time(), statistic=5.0, reason=f"fell {TEXT}", evidence={})])
        # the stream computes the figures again every 10 s: wait for them
        page.wait_for_selector("[data-field=runs]:text-is('2')", timeout=60_000)
        assert page.evaluate("window.notReloaded") is True
        rows = page.locator("table.grid tbody tr")
        assert rows.count() == 2 and page.locator("text=No steps in the last 7d.").is_hidden()
        assert rows.nth(1).locator("td").first.inner_text().startswith(
            "hostile <script>alert(1)</script>")
        assert page.locator("table.grid script, table.grid img").count() == 0
        assert page.locator("[data-field=verification]").inner_text() == "50.0%"
        assert page.locator("[data-field=drift]").inner_text() == "1"
        drift = rows.nth(0).locator("td").last
        assert drift.inner_text() == "1"
        title = drift.get_attribute("title")
        assert title.startswith("verification: fell <script>alert(1)</script>")
        assert "\\x1b[31mred" in title and "\x1b" not in title
    finally:
        served.stop()
    assert dialogs == []


def test_the_pages_work_without_scripts(tmp_path: Path, browser: Any) -> None:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    with cl.open_store(url) as store:
        for i in range(3):
            store.record(_step(i, "deploy", None))
    served = start_dashboard(url)
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(f"{served.url}/ui/steps")
        assert page.locator("#steps tbody tr").count() == 3
        assert page.locator("#live-status").is_hidden()
        page.fill("input[name=model]", "nothing")
        page.click("text=Filter")
        assert "model=nothing" in page.url
        assert page.locator("text=No steps match.").is_visible()
    finally:
        context.close()
        served.stop()


def _step(i: int, task_type: str, error: str | None) -> cl.StepEvent:
    return cl.StepEvent(
        ts=time.time(), trace_id=f"{i + 1:032x}", agent_id="agent-1", task_type=task_type,
        autonomy="autonomous", outcome="failed" if error else "succeeded", attempts=1,
        input_tokens=1, output_tokens=1, latency_ms=5.0, validation_passed=True,
        verification_passed=error is None, error_type="verification" if error else None,
        error_message=error, propose_ms=1.0, validate_ms=1.0, act_ms=1.0, verify_ms=1.0,
        detail=None)
