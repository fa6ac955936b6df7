"""The store under real faults: a full disk, a read-only disk, a store that cannot be opened.

The disk is a small tmpfs mounted by the test (root only; elsewhere these tests are skipped),
filled with a real file until the kernel says ENOSPC, and remounted read-only. Whatever the
fault, the agent keeps working, the real error is logged once with its fix, events are held
and written once the store accepts them again, and what cannot be held is dead-lettered to a
file the ``closedloop store import-deadletter`` command writes back exactly once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop.cli import main
from closedloop.store import SQLiteBackend, default_store, import_dead_letter

DISK_BYTES = 4 * 1024 * 1024


class SmallDisk:
    """A tmpfs of a few MB that the test can fill, free and make read-only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for size in (65536, 512, 1):  # until not one byte is left
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * size)
        finally:
            os.close(fd)
        with pytest.raises(OSError, match="No space left on device"):
            (self.path / "probe").write_bytes(b"\0" * 4096)

    def free(self) -> None:
        self.filler.unlink()

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True,
                       capture_output=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs",
                           str(mount_point)], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        reason = f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}"
        if os.environ.get("CLOSEDLOOP_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{reason} (required: CLOSEDLOOP_REQUIRE_SERVICES=1)")
        pytest.skip(reason)
    try:
        yield SmallDisk(mount_point)
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=True)


def agent(task: int, attempt: cl.Attempt) -> int:
    return task


def count(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop")


def test_a_full_disk_holds_events_and_writes_them_once_space_is_freed(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    db = small_disk.path / "events.db"
    store = cl.open_store(db, flush_interval=60)
    loop = cl.Loop(agent, task_type="full", store=store, guards=())
    loop.run(-1)
    assert store.flush()  # running normally, then the disk fills up
    small_disk.fill()
    with caplog.at_level(logging.WARNING, logger="closedloop"):
        outcomes = {loop.run(i).outcome for i in range(3000)}  # the agent keeps working
        assert store.flush() is False
    assert outcomes == {cl.Outcome.SUCCEEDED}
    stats = store.stats()
    assert stats.held == 3000 and stats.not_written == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # logged once per outage, not once per batch or retry
    assert "database or disk is full" in errors[0] and "Fix: free space" in errors[0]
    small_disk.free()
    assert store.flush() is True
    assert store.close().written == 3001
    assert count(db) == 3001


def test_a_store_opened_on_a_full_disk_holds_events_until_space_is_freed(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    small_disk.fill()
    db = small_disk.path / "events.db"
    with caplog.at_level(logging.WARNING, logger="closedloop"):
        store = cl.open_store(db, flush_interval=60, defer=True)
        loop = cl.Loop(agent, task_type="full", store=store, guards=())
        assert all(loop.run(i).outcome == cl.Outcome.SUCCEEDED for i in range(10))
        assert store.flush() is False
    assert store.stats().held == 10
    assert "Fix: free space" in caplog.text
    small_disk.free()
    assert store.flush() is True
    store.close()
    assert count(db) == 10


def test_the_real_error_is_raised_not_the_failed_rollback(small_disk: SmallDisk) -> None:
    backend = SQLiteBackend(small_disk.path / "events.db")
    event = cl.StepEvent(1.0, "0" * 32, "a", "t", "autonomous", "succeeded", 1, 1, 1, 1.0,
                         True, None, None, None, 0.0, 0.0, 0.0, 0.0, {"x": "y" * 100_000})
    backend.write_batch([event])  # the store is in use when the disk fills up
    small_disk.fill()
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        backend.write_batch([event] * 200)


def test_spans_on_a_full_disk_raise_the_real_error_too(small_disk: SmallDisk) -> None:
    from closedloop.telemetry import SQLiteSpanStore, StoredSpan

    spans = SQLiteSpanStore(small_disk.path / "events.db")
    span = StoredSpan(trace_id="0" * 32, span_id="0" * 16, parent_id=None, name="s", kind=0,
                      start_ns=0, end_ns=1, status=0, status_message=None,
                      attributes={"x": "y" * 100_000})
    spans.write_spans([span])  # in use when the disk fills up
    small_disk.fill()
    with pytest.raises(sqlite3.OperationalError, match="database or disk is full"):
        spans.write_spans([span] * 200)


def test_beyond_the_bound_events_go_to_a_dead_letter_file_off_the_full_disk_and_import_once(
    small_disk: SmallDisk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    other_fs = tmp_path / "tmp"  # the temporary directory, on another filesystem
    other_fs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(other_fs))
    db = small_disk.path / "events.db"
    store = cl.open_store(db, flush_interval=60, max_held=100)
    loop = cl.Loop(agent, task_type="spill", store=store, guards=())
    small_disk.fill()
    with caplog.at_level(logging.WARNING, logger="closedloop"):
        for i in range(250):
            loop.run(i)
        store.flush()
    stats = store.stats()
    assert stats.held == 100 and stats.dead_lettered == 150 and stats.lost == 0
    beside = small_disk.path / "events.db.deadletter.jsonl"
    assert not beside.exists() or beside.stat().st_size == 0  # no torn line on the full disk
    [dead] = other_fs.glob("closedloop-deadletter-*/events.db.deadletter-*.jsonl")
    assert len(dead.read_text().splitlines()) == 150
    assert dead.stat().st_mode & 0o077 == 0  # events may be sensitive: this user's only
    assert f"closedloop store import-deadletter {dead}" in caplog.text
    small_disk.free()
    assert store.close().written == 100
    first = invoke("store", "import-deadletter", str(dead), "--store", f"sqlite:///{db}",
                   "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout) == {"read": 150, "imported": 150, "already_stored": 0,
                                        "malformed": 0}
    again = invoke("store", "import-deadletter", str(dead), "--store", f"sqlite:///{db}")
    assert again.exit_code == 0, again.output
    assert again.stdout.startswith("imported 0 events") and "150 already stored" in again.stdout
    assert count(db) == 250
    with cl.open_store(db) as reopened:
        assert sorted(e.trace_id for e in reopened.events()) == \
            sorted({e.trace_id for e in reopened.events()})  # each step once


def test_a_read_only_disk_holds_events_until_it_is_writable_again(
    small_disk: SmallDisk, caplog: pytest.LogCaptureFixture
) -> None:
    db = small_disk.path / "events.db"
    store = cl.open_store(db, flush_interval=60)
    small_disk.remount("ro")
    loop = cl.Loop(agent, task_type="ro", store=store, guards=())
    assert all(loop.run(i).outcome == cl.Outcome.SUCCEEDED for i in range(50))
    assert store.flush() is False
    assert store.stats().held == 50
    assert "Fix: make" in caplog.text
    small_disk.remount("rw")
    assert store.flush() is True
    store.close()
    assert count(db) == 50


def test_a_default_store_that_cannot_be_opened_does_not_stop_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store's folder should be")
    monkeypatch.setenv("CLOSEDLOOP_STORE", f"sqlite:///{blocker / 'events.db'}")
    with caplog.at_level(logging.WARNING, logger="closedloop"):
        loop = cl.Loop(agent, task_type="unopened")  # default store and fault control
        assert all(loop.run(i).outcome == cl.Outcome.SUCCEEDED for i in range(20))
        store = default_store()
        assert store.flush() is False
        assert store.flush() is False
    assert store.stats().held == 20
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1  # the cause, once, with the fix
    assert f"cannot open store sqlite:///{blocker / 'events.db'}: {blocker} is a file, not a " \
        "folder" in errors[0]
    assert "Fix: make" in errors[0]
    blocker.unlink()
    blocker.mkdir()  # the operator fixes it: the held events are written
    assert store.flush() is True
    assert count(blocker / "events.db") == 20


def test_import_skips_torn_lines_and_events_already_stored(tmp_path: Path) -> None:
    dead = tmp_path / "dead.jsonl"
    events = [cl.StepEvent(1000.0 + i, uuid.uuid4().hex, "a", "t", "autonomous", "succeeded",
                           1, i, 1, 1.0, True, None, None, None, 0.0, 0.0, 0.0, 0.0,
                           {"i": i} if i % 2 else None) for i in range(5)]
    lines = [json.dumps(e._asdict()) for e in events]
    dead.write_text("\n".join([*lines, lines[0], '{"ts": 1.0, "trace_id": "x"}',
                               lines[1][:40]]) + "\n")
    with cl.open_store(tmp_path / "e.db") as store:
        store.record(events[0])
        assert store.flush()
        result = import_dead_letter(dead, store)
        assert (result.read, result.imported, result.already_stored, result.malformed) == \
            (8, 4, 2, 2)
        assert sorted(store.events()) == sorted(events)


def test_import_of_a_missing_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = invoke("store", "import-deadletter", str(tmp_path / "none.jsonl"), "--store",
                    f"sqlite:///{tmp_path / 'e.db'}")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no dead-letter file at {tmp_path / 'none.jsonl'}"
    assert not (tmp_path / "e.db").exists()  # no store created for nothing


def test_importing_into_a_store_on_a_full_disk_is_one_line_and_can_be_run_again(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    db = small_disk.path / "events.db"
    cl.open_store(db).close()
    dead = tmp_path / "dead.jsonl"
    event = cl.StepEvent(1000.0, uuid.uuid4().hex, "a", "t", "autonomous", "succeeded", 1, 1, 1,
                         1.0, True, None, None, None, 0.0, 0.0, 0.0, 0.0, {"x": "y" * 10_000})
    dead.write_text("".join(json.dumps(event._replace(ts=1000.0 + i, trace_id=uuid.uuid4().hex)
                                       ._asdict()) + "\n" for i in range(100)))
    small_disk.fill()
    full = invoke("store", "import-deadletter", str(dead), "--store", f"sqlite:///{db}")
    assert full.exit_code == 1
    [line] = full.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot open store sqlite:///{db}: ")
    assert line.endswith("(no space left on the disk)")
    small_disk.free()
    again = invoke("store", "import-deadletter", str(dead), "--store", f"sqlite:///{db}")
    assert again.exit_code == 0, again.output
    assert count(db) == 100


def test_telemetry_on_a_default_store_that_cannot_be_opened_does_not_stop_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store's folder should be")
    monkeypatch.setenv("CLOSEDLOOP_STORE", f"sqlite:///{blocker / 'events.db'}")
    telemetry = cl.telemetry.configure(store=True, metrics=False)  # spans into that store
    loop = cl.Loop(agent, task_type="unopened")
    assert loop.run(0).outcome == cl.Outcome.SUCCEEDED
    telemetry.flush()
    assert telemetry.stats().export_failures == {"StoreExporter": 1}  # counted, not raised
    blocker.unlink()
    blocker.mkdir()  # the operator fixes it: the store opens, spans land again
    assert default_store().flush() is True
    result = loop.run(1)
    telemetry.flush()
    assert cl.telemetry.span_store_for(default_store()).trace(result.trace_id)
