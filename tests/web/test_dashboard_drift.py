"""Drift detections on the dashboard, recorded through the drift guard's own path on every
backend: the overview's "drift alarms" tile and per task type column (active alarms only: of
the last 24 h, not resumed since), the control page's table of recent detections (hostile
reasons shown as text), and the live overview sending its figures again when one arrives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

import closedloop as cl
from closedloop.autonomy import AutonomyLevels
from closedloop.control import CaptureSink, FaultControl, ledger_for_store, resume
from closedloop.learn import DriftGuard, DriftPolicy, Firing, recorded_firings
from closedloop.store import level_store_for
from closedloop.web import create_app
from closedloop.web._dashboard import (
    DRIFT_ACTIVE_S,
    DRIFT_SHOWN,
    drift_firings,
    overview_data,
    overview_payload,
    overview_state,
)

from .dashboard_util import TEXT, assert_safe, parse, visible

NOW = time.time()


@pytest.fixture
def store(any_url: str) -> Iterator[cl.Store]:
    s = cl.open_store(any_url)
    yield s
    s.close()


def _step(i: int, task_type: str) -> cl.StepEvent:
    return cl.StepEvent(
        ts=NOW - 600 + i, trace_id=f"{i + 1:032x}", agent_id="agent-1", task_type=task_type,
        autonomy="autonomous", outcome="succeeded", attempts=1, input_tokens=10,
        output_tokens=5, latency_ms=12.5, validation_passed=True, verification_passed=True,
        error_type=None, error_message=None, propose_ms=1.0, validate_ms=0.5, act_ms=8.0,
        verify_ms=2.0, detail=None)


def _seed_steps(store: cl.Store) -> None:
    for i, task_type in enumerate(("deploy", "billing", "deploy")):
        store.record(_step(i, task_type))
    assert store.flush()


def _guard(store: cl.Store, policy: DriftPolicy | None = None, **kw: Any) -> DriftGuard:
    return DriftGuard(policy=policy or DriftPolicy(), store=store, sinks=[CaptureSink()],
                      save_every=0, **kw)


def _fire(store: cl.Store, *, task_type: str = "deploy", at: float = NOW - 60,
          reason: str = "verification pass rate fell", signal: str = "verification",
          actions: tuple[str, ...] = ("alert",), guard: DriftGuard | None = None) -> Firing:
    """Record a firing as the drift guard records its own (its actions carried out)."""
    firing = Firing(task_type=task_type, model="gpt-x", signal=signal, actions=actions, at=at,
                    statistic=5.25, reason=reason,
                    evidence={"observations": 40, "last_trace_id": "ab" * 16})
    (guard or _guard(store)).act([firing])
    return firing


def _get(store: cl.Store, path: str) -> httpx.Response:
    app = create_app(store=store, dashboard=True)

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as http:
            return await http.get(path)

    return asyncio.run(get())


def _ledger(store: cl.Store) -> Any:
    return ledger_for_store(store)


def _drift_cells(html: str) -> dict[str, dict[str, str | None]]:
    """Per task type of the overview's table, its drift cell's (the last) attributes and
    text."""
    rows: dict[str, dict[str, str | None]] = {}
    body = html.split("<tbody", 1)[1].split("</tbody>", 1)[0]
    for row in body.split("<tr>")[1:]:
        task = parse(row).text.split()[0]
        cell = parse("<td" + row.rsplit("<td", 1)[1].split("</td>", 1)[0])
        ((tag, attrs), *_) = cell.elements
        assert tag == "td"
        rows[task] = {**attrs, "text": cell.text.strip()}
    return rows


def test_a_drift_fired_by_a_real_loop_shows_on_the_overview_for_its_task_type(
        store: cl.Store) -> None:
    policy = DriftPolicy(verified_pass_rate=(0.98, 0.90), reask_rate=None, exceedance=None,
                         false_alarm_steps=1000, actions=("alert",))
    guard = _guard(store, policy)
    seen = [0]

    def verify(intent: object, result: object) -> bool:
        seen[0] += 1
        return seen[0] <= 40

    loop = cl.Loop(lambda task, attempt: task, task_type="deploy", executor=lambda p: p,
                   store=store, guards=[guard], verifiers=[verify])
    for i in range(70):
        loop.run(i)
    other = cl.Loop(lambda task, attempt: task, task_type="billing", executor=lambda p: p,
                    store=store)
    other.run(0)
    assert store.flush()
    (fired,) = recorded_firings(level_store_for(store))
    data = overview_data(store, _ledger(store))
    assert [f.signal for f in data["drift"]] == ["verification"]
    rows = {r["f"].task_type: r for r in data["rows"]}
    assert [f.at for f in rows["deploy"]["drift"]] == [fired.at]
    assert rows["billing"]["drift"] == []

    html = _get(store, "/ui/").text
    tile = [a for t, a in parse(html).elements
            if t == "a" and a.get("href") == "/ui/control#drift" and "tile" in (a["class"] or "")]
    assert tile and tile[0]["class"] == "tile bad"
    assert '<span class="big" data-field="drift">1</span>' in html
    cells = _drift_cells(html)
    assert cells["deploy"]["text"] == "1" and cells["deploy"]["class"] == "num bad"
    assert str(cells["deploy"]["title"]).startswith("verification: ")
    assert cells["billing"]["text"] == "0" and "title" not in cells["billing"]


def test_no_drift_gives_a_quiet_tile_and_zero_in_every_row(store: cl.Store) -> None:
    _seed_steps(store)
    html = _get(store, "/ui/").text
    assert '<span class="big" data-field="drift">0</span>' in html
    tile = [a for t, a in parse(html).elements if t == "a" and a.get("href") == "/ui/control#drift"
            and "tile" in (a["class"] or "")]
    assert tile[0]["class"] == "tile"
    assert {k: v["text"] for k, v in _drift_cells(html).items()} == {"billing": "0",
                                                                      "deploy": "0"}


def test_a_firing_older_than_a_day_is_not_an_active_alarm(store: cl.Store) -> None:
    _seed_steps(store)
    _fire(store, at=NOW - 100)
    just = overview_data(store, _ledger(store), None, now=NOW - 100 + DRIFT_ACTIVE_S - 1)
    assert len(just["drift"]) == 1
    later = overview_data(store, _ledger(store), None, now=NOW - 100 + DRIFT_ACTIVE_S + 1)
    assert later["drift"] == []
    assert all(r["drift"] == [] for r in later["rows"])


def test_a_resume_after_a_firing_ends_its_alarm_but_not_a_later_one(store: cl.Store) -> None:
    _seed_steps(store)
    ledger = _ledger(store)
    fault = FaultControl(ledger=ledger, sinks=[CaptureSink()], halt_after=10**6,
                         halt_rate=1.0, min_samples=10**6)
    guard = _guard(store, fault_control=fault)
    _fire(store, at=time.time() - 5, actions=("halt",), guard=guard)
    _fire(store, task_type="billing", at=time.time() - 5)
    assert [s.task_type for s in ledger.stops()] == ["deploy"]
    # the halt it caused (recorded after it) leaves it active: only a resume ends it
    assert sorted(f.task_type for f in overview_data(store, ledger)["drift"]) == [
        "billing", "deploy"]
    assert resume(ledger, "deploy", reason="checked the model", by="alice") is not None
    found = overview_data(store, ledger)
    assert [f.task_type for f in found["drift"]] == ["billing"]
    _fire(store, at=time.time() + 5, reason="fell again")
    assert [f.reason for f in overview_data(store, ledger)["drift"]
            if f.task_type == "deploy"] == ["fell again"]


def _drift_table(html: str) -> list[list[str]]:
    """The control page's drift detections: each row's cells' texts."""
    table = html.split('<table class="grid drift">', 1)[1].split("</table>", 1)[0]
    body = table.split("<tbody>", 1)[1]
    return [[parse("<td" + td).text.strip() for td in row.split("<td")[1:]]
            for row in body.split("<tr>")[1:]]


def test_the_control_page_lists_the_detections_newest_first_with_the_active_ones_marked(
        store: cl.Store) -> None:
    _fire(store, at=NOW - 3 * DRIFT_ACTIVE_S, reason="long ago")
    levels = AutonomyLevels(store, sinks=[])
    _fire(store, task_type="billing", at=NOW - 30, signal="latency", reason="slower",
          actions=("alert", "demote"), guard=_guard(store, levels=levels))
    answer = _get(store, "/ui/control")
    assert answer.status_code == 200
    billing, deploy = _drift_table(answer.text)
    assert billing[1:] == ["billing", "gpt-x", "latency", "5.25", "alert, demote", "slower",
                           "active"]
    assert billing[0] == time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(NOW - 30))
    assert deploy[1:] == ["deploy", "gpt-x", "verification", "5.25", "alert", "long ago", ""]


def test_the_control_page_shows_at_most_its_bound(store: cl.Store) -> None:
    guard = _guard(store)
    for i in range(DRIFT_SHOWN + 3):
        _fire(store, at=NOW - 1000 + i, reason=f"number {i}", guard=guard)
    rows = _drift_table(_get(store, "/ui/control").text)
    assert [r[6] for r in rows] == [f"number {i}" for i in range(DRIFT_SHOWN + 2, 2, -1)]


def test_a_hostile_reason_is_shown_as_text_on_both_pages(store: cl.Store) -> None:
    _seed_steps(store)
    _fire(store, reason=TEXT, signal="score:<b>x</b>")
    control = _get(store, "/ui/control")
    page = assert_safe(control.text)
    assert visible(TEXT) in " ".join(page.text.split())
    overview = _get(store, "/ui/").text
    assert_safe(overview)
    title = str(_drift_cells(overview)["deploy"]["title"])
    assert "<script>alert(1)</script>" in title and "\\x1b[31mred" in title
    payload = overview_payload(overview_data(store, _ledger(store)))
    (deploy,) = [r for r in payload["rows"] if r["cells"][0]["text"] == "deploy"]
    assert "\x1b" not in deploy["cells"][-1]["title"]
    assert "\\x1b[31mred" in deploy["cells"][-1]["title"]


def test_the_live_overview_changes_when_a_firing_arrives(store: cl.Store) -> None:
    _seed_steps(store)
    before = overview_payload(overview_data(store, _ledger(store)))
    _fire(store)
    after = overview_payload(overview_data(store, _ledger(store)))
    assert overview_state(before) != overview_state(after)
    assert (before["tiles"]["drift"], after["tiles"]["drift"]) == ("0", "1")
    cells = {r["cells"][0]["text"]: r["cells"][-1] for r in after["rows"]}
    assert cells["deploy"]["text"] == "1" and cells["deploy"]["href"] == "/ui/control#drift"
    assert cells["billing"] == {"text": "0", "class": "num muted"}


def test_a_task_types_drift_cell_counts_its_alarms_and_names_the_newest(
        store: cl.Store) -> None:
    _seed_steps(store)
    guard = _guard(store)
    _fire(store, at=NOW - 90, signal="reask", reason="older", guard=guard)
    _fire(store, at=NOW - 30, signal="latency", reason="newest", guard=guard)
    cell = _drift_cells(_get(store, "/ui/").text)["deploy"]
    assert (cell["text"], cell["title"]) == ("2", "latency: newest (and 1 more)")
    payload = overview_payload(overview_data(store, _ledger(store)))
    (deploy,) = [r["cells"][-1] for r in payload["rows"] if r["cells"][0]["text"] == "deploy"]
    assert (deploy["text"], deploy["title"]) == ("2", "latency: newest (and 1 more)")


def test_a_store_without_a_level_store_has_no_alarms() -> None:
    assert drift_firings(SimpleNamespace(backend=object())) == []


def test_a_read_only_store_shows_its_detections(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'drift.db'}"
    with cl.open_store(url) as writer:
        _seed_steps(writer)
        _fire(writer, reason="seen read-only")
    before = (tmp_path / "drift.db").stat().st_mtime_ns
    reader = cl.open_store(url, read_only=True)
    try:
        assert "seen read-only" in _get(reader, "/ui/control").text
        assert '<span class="big" data-field="drift">1</span>' in _get(reader, "/ui/").text
    finally:
        reader.close()
    assert (tmp_path / "drift.db").stat().st_mtime_ns == before
