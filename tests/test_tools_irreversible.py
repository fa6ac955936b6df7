"""Irreversible tools always need approval above the configured risk: whatever the risk
function says (a NaN is not "low") and whatever autonomy level is stored for the tool."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.autonomy import AutonomyLevels


def dropper(store: cl.Store, done: list[str], risk: Any, asked: list[str]) -> Any:
    def approver(task: Any, proposal: dict[str, Any]) -> bool:
        asked.append(proposal["name"])
        return False

    @cl.tool(store=store, irreversible=True, approve_above=0.5, risk=risk, approver=approver)
    def drop_table(name: str) -> str:
        """Drop a table."""
        done.append(name)
        return f"dropped {name}"
    return drop_table


@pytest.mark.parametrize("risk", [math.nan, 0.9])
def test_an_irreversible_call_whose_risk_is_not_below_the_threshold_needs_approval(
        memory_store: cl.Store, risk: float) -> None:
    done: list[str] = []
    asked: list[str] = []
    drop = dropper(memory_store, done, lambda call: risk, asked)
    answer = drop(name="customers")
    assert "rejected" in answer
    assert asked == ["customers"] and done == []


def test_a_stored_autonomous_level_does_not_lift_the_approval_of_an_irreversible_call(
        tmp_path: Path) -> None:
    store = cl.open_store(f"sqlite:///{tmp_path / 'events.db'}")
    try:
        AutonomyLevels(store).set("drop_table", "autonomous", reason="earned", by="test")
        done: list[str] = []
        asked: list[str] = []
        drop = dropper(store, done, 0.9, asked)
        assert "rejected" in drop(name="customers")
        assert asked == ["customers"] and done == []
    finally:
        store.close()
