"""The store that writes the events keeps the learning roll-ups current for read-only readers
(``closedloop trends``, ``report``, a dashboard without a token), from a thread of its own."""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from pathlib import Path

import psycopg
import pytest

import closedloop as cl
from closedloop.store import RollupKeeper
from closedloop.store.sqlite import _rollup

from .test_learn_queries import step

EVENTS = [step(i, random.Random(i)) for i in range(300)]


@pytest.fixture(autouse=True)
def _fold_small(monkeypatch: pytest.MonkeyPatch) -> None:
    """A roll-up folds as soon as one row waits, a few rows a transaction."""
    monkeypatch.setattr(_rollup, "REFRESH_ROWS", 1)
    monkeypatch.setattr(_rollup, "CHUNK", 50)
    from closedloop.store.postgres import _rollup as pg_rollup

    monkeypatch.setattr(pg_rollup, "REFRESH_ROWS", 1)


def _rolled_up(url: str) -> int:
    """How many steps the task-type roll-up of the store at ``url`` holds (0: none yet)."""
    found: tuple[object, ...] | None
    if url.startswith("sqlite:///"):
        lite = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            found = lite.execute("SELECT sum(s0) FROM learn_rollup WHERE dim = 'task_type'"
                                 ).fetchone()
        finally:
            lite.close()
    else:
        base, schema = url.split("?schema=")
        with psycopg.connect(base) as conn:
            found = conn.execute(f'SELECT sum(s0) FROM "{schema}".learn_rollup '
                                 "WHERE dim = 'task_type'").fetchone()
    return int(str(found[0] or 0)) if found else 0


def _wait_for(condition: object, *, deadline_s: float = 60.0) -> bool:
    """Poll ``condition()`` until it holds (a generous deadline: a condition, not a timing)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_a_writing_store_folds_the_rollups_that_readers_read(shared_url: str) -> None:
    store = cl.open_store(shared_url, rollup_every=0.05)
    try:
        assert store.rollups is not None
        for e in EVENTS:
            store.record(e)
        assert store.flush()
        # nothing queried the store: only its keeper can have folded the rows in
        assert _wait_for(lambda: _rolled_up(shared_url) == len(EVENTS))
    finally:
        store.close()
    # and a read-only reader's trends equal the scan's (the roll-up is read, not refolded)
    reader = cl.open_store(shared_url, read_only=True)
    try:
        assert reader.rollups is None
        cells = reader.series(by="task_type", window="day")
        assert sum(c.steps for c in cells) == len(EVENTS)
    finally:
        reader.close()


def test_the_keeper_runs_only_where_it_can_fold(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    with cl.open_store(url) as writable:
        assert writable.rollups is not None
    assert cl.open_store(url, rollup_every=None).rollups is None
    assert cl.open_store(url, read_only=True).rollups is None
    assert cl.open_store("memory://").rollups is None


def test_a_closed_store_stops_its_keeper(tmp_path: Path) -> None:
    store = cl.open_store(f"sqlite:///{tmp_path / 'events.db'}", rollup_every=3600)
    keeper = store.rollups
    assert keeper is not None and keeper._thread.is_alive()
    store.close()
    assert not keeper._thread.is_alive()


def test_a_failing_fold_is_logged_once_redacted_and_tried_again(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def fold() -> None:
        calls.append(1)
        raise cl.StoreError("cannot update the roll-ups: password=hunter2 refused")

    keeper = RollupKeeper(fold, every=3600)
    try:
        with caplog.at_level(logging.WARNING, logger="closedloop.store"):
            keeper.tick()
            keeper.tick()
    finally:
        keeper.close()
    assert len(calls) == 2 and keeper.failures == 2 and keeper.folds == 0
    said = [r.getMessage() for r in caplog.records if "roll-ups" in r.getMessage()]
    assert len(said) == 1
    assert "hunter2" not in said[0]


@pytest.mark.parametrize("every", [0, -1.0, float("nan"), float("inf"), True, "60"])
def test_a_bad_interval_is_a_config_error(every: object, tmp_path: Path) -> None:
    with pytest.raises(cl.ConfigError, match="rollup_every must be a positive number"):
        cl.open_store(f"sqlite:///{tmp_path / 'events.db'}", rollup_every=every)  # type: ignore[arg-type]


def test_a_long_failure_is_redacted_before_it_is_cut(caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-proj-" + "Ab3" * 20  # cut first, its first characters would match no rule

    def fold() -> None:
        raise cl.StoreError("x" * 285 + " " + key)

    keeper = RollupKeeper(fold, every=3600)
    try:
        with caplog.at_level(logging.WARNING, logger="closedloop.store"):
            keeper.tick()
    finally:
        keeper.close()
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "roll-ups" in said and "sk-proj-Ab3" not in said
