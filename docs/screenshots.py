"""Take the dashboard screenshots under docs/img/ (shown in README.md and docs/dashboard.md).

    PYTHONPATH=src python docs/screenshots.py

Seeds a fresh store in a temporary folder: ``closedloop demo`` (60 requests), two weeks of
synthetic ``db.migrate`` steps (so the trend sparklines have days to draw), one pending
approval request with a planned deletion, one halt and two drift detections (one of them
active); starts ``closedloop serve`` on it and photographs the pages with Playwright driving
Debian's Chromium (/usr/bin/chromium).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

import closedloop as cl
from closedloop._approvals import new_request
from closedloop.approvals import approvals_for
from closedloop.autonomy import AutonomyLevels
from closedloop.control import Stop, StopKind, ledger_for_store
from closedloop.learn import DriftGuard, Firing

OUT = Path(__file__).resolve().parent / "img"
TOKEN = "docs-admin-token-" + "4b1d" * 6


def seed(url: str) -> None:
    subprocess.run([sys.executable, "-m", "closedloop", "demo", "--requests", "60", "--store",
                    url], check=True, capture_output=True)
    rng = random.Random(3)
    now = time.time()
    with cl.open_store(url) as store:
        for day in range(14, 0, -1):
            for _ in range(rng.randint(20, 40)):
                model = "gpt-4.1" if rng.random() < 0.5 else "claude-sonnet-4"
                ok = rng.random() < 0.70 + day * -0.012 + 0.2 - 0.15 * (model == "gpt-4.1")
                store.record(cl.StepEvent(
                    ts=now - day * 86400 + rng.uniform(0, 80000), trace_id=uuid.uuid4().hex,
                    agent_id="migrator", task_type="db.migrate", autonomy="approve",
                    outcome="succeeded" if ok else "failed", attempts=1 + (rng.random() < .2),
                    input_tokens=rng.randint(800, 1500), output_tokens=rng.randint(100, 300),
                    latency_ms=rng.uniform(300, 1800), validation_passed=rng.random() < .93,
                    verification_passed=ok, error_type=None if ok else "verification",
                    error_message=None if ok else "row count differs after migration",
                    propose_ms=200.0, validate_ms=3.0, act_ms=400.0, verify_ms=90.0,
                    detail=None, cost_usd=rng.uniform(0.004, 0.012),
                    model=model,
                    labels={"region": rng.choice(["eu", "us"])}))
        ledger_for_store(store, redis_url=None).put(Stop(
            task_type="db.migrate", kind=StopKind.HALTED,
            reason="verification pass rate fell below 80% over the last 50 steps",
            by="fault-control@worker-2", at=now - 1800,
            evidence={"verification_pass_rate": 0.74, "window": 50, "threshold": 0.8}))
    with cl.open_store(url) as store:
        from closedloop.store import RunRecord

        ends = [rng.choice(["succeeded"] * 4 + ["budget_exceeded", "halted"]) for _ in range(12)]
        why = {"succeeded": None, "budget_exceeded": "max_cost_usd 0.10 reached after 8 steps",
               "halted": "db.migrate halted by fault-control"}
        store.runs().put_runs([RunRecord(
            run_id=uuid.uuid4().hex, name=f"nightly migration #{40 + i}",
            started=now - i * 3600 - 600, ended=now - i * 3600 - 600 + rng.uniform(20, 240),
            outcome=ends[i], message=why[ends[i]],
            steps=rng.randint(3, 12), failed=rng.randint(0, 2), refused=0,
            input_tokens=rng.randint(5000, 20000), output_tokens=rng.randint(800, 3000),
            cost_usd=rng.uniform(0.02, 0.2), labels={"region": rng.choice(["eu", "us"])})
            for i in range(12)])
        guard = DriftGuard(store=store, sinks=[], save_every=0)
        guard.act([Firing(
            task_type="db.migrate", model="gpt-4.1", signal="verification", actions=("alert",),
            at=at, statistic=stat, reason=reason,
            evidence={"observations": 212, "baseline": 0.92})
            for at, stat, reason in (
                (now - 2 * 86400, 4.1, "verification pass rate drifted from 0.92 towards 0.80 "
                                       "(CUSUM 4.10 over 4.02)"),
                (now - 2400, 5.3, "verification pass rate drifted from 0.92 towards 0.80 "
                                  "(CUSUM 5.30 over 4.02)"))])
        AutonomyLevels(store, sinks=[]).set("db.migrate", "approve", by="dana@ops",
                                            reason="schema changes need a second pair of eyes")
        approvals_for(store).create(new_request(
            task_type="db.migrate", agent_id="migrator", requested_by="migrator@worker-2",
            proposal={"sql": ["ALTER TABLE orders ADD COLUMN region text",
                              "DROP TABLE orders_archive_2019"]},
            task_input={"ask": "add a region column to orders"}, step_id=uuid.uuid4().hex,
            trace_id=uuid.uuid4().hex,
            verdicts=[{"check": "sql_parses", "passed": True},
                      {"check": "no_unbounded_delete", "passed": True}],
            risk={"summary": "drops 1 table, alters 1", "destructive": True,
                  "items": [{"address": "orders", "action": "alter"},
                            {"address": "orders_archive_2019", "action": "delete"}]},
            expires_in=86400))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/demo.db"
        seed(url)
        env = {**os.environ, "CLOSEDLOOP_API_TOKEN": TOKEN}
        proc = subprocess.Popen([sys.executable, "-m", "closedloop", "serve", "--port", "0",
                                 "--store", url], stderr=subprocess.PIPE, text=True, env=env)
        try:
            assert proc.stderr is not None
            match = re.search(r"http://[^ ]+?:(\d+)/", proc.stderr.readline())
            assert match is not None
            base = f"http://127.0.0.1:{match.group(1)}"
            shoot(base)
        finally:
            proc.terminate()
            proc.wait(30)


def shoot(base: str) -> None:
    OUT.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(f"{base}/ui/login")
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        page.goto(f"{base}/ui/")
        page.screenshot(path=OUT / "dashboard-overview.png", full_page=True)
        page.goto(f"{base}/ui/steps?task_type=ec2.provision&outcome=failed")
        page.screenshot(path=OUT / "dashboard-steps.png")
        page.locator("table.grid tbody tr a.mono").first.click()
        page.wait_for_load_state()
        page.screenshot(path=OUT / "dashboard-trace.png", full_page=True)
        page.goto(f"{base}/ui/approvals")
        page.locator("article.request >> text=Review").first.click()
        page.wait_for_load_state()
        page.screenshot(path=OUT / "dashboard-approval.png", full_page=True)
        page.goto(f"{base}/ui/control")
        page.screenshot(path=OUT / "dashboard-control.png", full_page=True)
        page.goto(f"{base}/ui/autonomy")
        page.screenshot(path=OUT / "dashboard-autonomy.png", full_page=True)
        page.goto(f"{base}/ui/runs")
        page.screenshot(path=OUT / "dashboard-runs.png")
        page.goto(f"{base}/ui/failures?window=30d")
        page.screenshot(path=OUT / "dashboard-failures.png", full_page=True)
        page.goto(f"{base}/ui/factors?window=30d&task_type=db.migrate")
        page.screenshot(path=OUT / "dashboard-factors.png", full_page=True)
        pair = [_first_trace(page, f"{base}/ui/steps?task_type=ec2.provision&outcome={o}")
                for o in ("failed", "succeeded")]
        page.goto(f"{base}/ui/diff?a={pair[0]}&b={pair[1]}")
        page.screenshot(path=OUT / "dashboard-diff.png", full_page=True)
        browser.close()


def _first_trace(page: Any, url: str) -> str:
    page.goto(url)
    href = page.locator("table.grid tbody tr a.mono").first.get_attribute("href")
    return str(href).rsplit("/", 1)[-1]


if __name__ == "__main__":
    main()
