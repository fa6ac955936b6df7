"""The PostgreSQL level store on the backend's connection pool: a dashboard page's worth of
level reads opens no connection, and a pooled connection goes back as the pool's other users
expect it (outside any transaction, with the server's statement timeout)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.autonomy import Feedback, LevelKey, LevelRecord
from closedloop.store.postgres import PostgresBackend, PostgresLevelStore

from .conftest import _pg_admin


def record(level: str, task_type: str = "t", at: float = 1.0) -> LevelRecord:
    return LevelRecord(key=LevelKey(task_type=task_type), level=level,
                       by="alice", at=at, reason="why")


@pytest.fixture
def backend(pg_url: str) -> Iterator[PostgresBackend]:
    found = PostgresBackend(pg_url, pool_size=1)  # one pooled connection: every call's
    yield found
    found.close()


def _stats(backend: PostgresBackend) -> dict[str, int]:
    from psycopg_pool import ConnectionPool

    pool = backend.pool()
    assert isinstance(pool, ConnectionPool)
    return pool.get_stats()


def _server_timeout(backend: PostgresBackend) -> tuple[Any, Any]:
    """The pooled connection's transaction status and statement timeout."""
    with backend.pool().connection() as conn:
        return (conn.info.transaction_status.name,
                conn.execute("SHOW statement_timeout").fetchone()[0])  # type: ignore[index]


def test_a_page_of_level_calls_opens_no_connection(backend: PostgresBackend) -> None:
    levels = backend.level_store()
    levels.levels()  # the pool is open and has its connection
    before = _stats(backend)
    for task in ("a", "b", "c"):  # what /ui/autonomy asks per task type, and some writes
        levels.levels(task)
        levels.history(task_type=task, limit=20)
        levels.evidence_groups(task, since=0.0, classes=True)
    levels.set_level(record("approve", "a"))
    levels.put_feedback(Feedback(step_id="0" * 32, agreed=True, by="a", at=2.0))
    levels.put_detector("d", {"x": 1}, at=3.0)
    assert levels.detector("d") == {"x": 1}
    assert [f.step_id for f in levels.feedback()] == ["0" * 32]
    after = _stats(backend)
    assert after.get("connections_num", 0) == before.get("connections_num", 0)
    assert after["requests_num"] - before["requests_num"] >= 14  # each call on the pool


def test_a_failed_transaction_leaves_the_connection_clean(backend: PostgresBackend,
                                                           pg_schema: str) -> None:
    from closedloop.store.postgres._backend import _lock_key

    default = _server_timeout(backend)
    assert default[0] == "IDLE"
    levels = PostgresLevelStore(backend.pool, backend._connect, pg_schema, backend.url,
                                statement_timeout=0.3)
    levels.set_level(record("approve"))
    admin = _pg_admin()
    try:  # another process holds the schema's autonomy lock: the change times out inside
        admin.execute("SELECT pg_advisory_lock(%s)", (_lock_key("autonomy", pg_schema),))
        with pytest.raises(cl.ControlUnavailable, match="cannot write autonomy levels"):
            levels.set_level(record("autonomous", at=2.0))
    finally:
        admin.close()
    assert _server_timeout(backend) == default  # no open transaction, no 300 ms timeout left
    assert [r.level for r in levels.levels()] == ["approve"]  # rolled back, and usable
    assert levels.set_level(record("autonomous", at=3.0)) is not None
    assert [c.new for c in levels.history()] == ["autonomous", "approve"]


def test_the_long_evidence_timeout_stays_with_its_count(backend: PostgresBackend) -> None:
    default = _server_timeout(backend)
    backend.level_store().evidence_groups("t", since=0.0, classes=False)
    assert _server_timeout(backend) == default


def test_a_connection_left_in_a_transaction_is_closed(backend: PostgresBackend) -> None:
    levels = backend.level_store()
    left = levels._run("read", lambda conn: (conn.execute("BEGIN"), conn)[1])
    assert left.closed  # never handed to the pool's next user
    assert _server_timeout(backend)[0] == "IDLE"
    assert levels.levels() == []


def test_a_pooled_connection_whose_server_process_went_is_replaced(
        backend: PostgresBackend) -> None:
    levels = backend.level_store()
    levels.set_level(record("approve"))
    with backend.pool().connection() as conn:
        pid = conn.info.backend_pid
    admin = _pg_admin()
    try:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    finally:
        admin.close()
    assert [r.level for r in levels.levels()] == ["approve"]  # at once, on another
    with backend.pool().connection() as conn:
        assert conn.info.backend_pid != pid
    levels.set_level(record("autonomous", at=2.0))
    assert [c.new for c in levels.history()] == ["autonomous", "approve"]


def test_a_busy_pool_does_not_hold_a_level_read(backend: PostgresBackend) -> None:
    levels = backend.level_store()
    levels.set_level(record("approve"))
    before = _stats(backend)
    with backend.pool().connection() as held:  # telemetry has the pool's one connection
        assert [r.level for r in levels.levels()] == ["approve"]  # on one of its own
        assert held.info.transaction_status.name == "IDLE"
    after = _stats(backend)
    assert after.get("connections_num", 0) == before.get("connections_num", 0)
    assert after["requests_num"] - before["requests_num"] == 2  # held, and the level read's


def test_threads_share_the_pool(backend: PostgresBackend) -> None:
    levels = backend.level_store()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(20):
                levels.levels()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _stats(backend).get("connections_num", 0) <= 1


FORK = """
    import os, sys
    from closedloop.autonomy import LevelKey, LevelRecord
    from closedloop.store import open_backend
    backend = open_backend(sys.argv[1])
    levels = backend.level_store()
    def rec(level, at):
        return LevelRecord(key=LevelKey(task_type="t"), level=level, by="a", at=at, reason="r")
    levels.set_level(rec("approve", 1.0))  # the parent's pool is open and used
    pid = os.fork()
    if pid == 0:  # the child: its own pool, never the parent's sockets
        levels.set_level(rec("suggest", 2.0))
        assert [r.level for r in levels.levels()] == ["suggest"]
        backend.close()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert [r.level for r in levels.levels()] == ["suggest"]  # the parent's still work
    levels.set_level(rec("autonomous", 3.0))
    assert [c.new for c in levels.history()] == ["autonomous", "suggest", "approve"]
    backend.close()
    print("ok")
"""


def test_a_forked_child_reads_and_writes_levels_on_its_own_pool(pg_url: str) -> None:
    src = str(Path(__file__).parents[2] / "src")
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK), pg_url],
                         env={"PYTHONPATH": src, "PATH": os.environ.get("PATH", "/usr/bin")},
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
