"""What the PostgreSQL backend adds to the contract: schemas, partitions, migrations, errors."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

import closedloop as cl
from closedloop.store import EventQuery, open_backend
from closedloop.store._writer import BatchWriter
from closedloop.store.postgres import MIGRATIONS, SCHEMA_VERSION, PostgresBackend, partition_name

from .conftest import PG_URL
from .test_contract import SRC, event

DAY = 86_400.0


def pg(url: str) -> PostgresBackend:
    backend = open_backend(url)
    assert isinstance(backend, PostgresBackend)
    return backend


def sql(backend: PostgresBackend, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with backend.pool().connection() as conn:
        return conn.execute(query, params).fetchall()


def test_events_land_in_one_partition_per_utc_day(pg_url: str, pg_schema: str) -> None:
    backend = pg(pg_url)
    try:
        midnight = 1_790_035_200.0  # 2026-09-22T00:00:00Z
        backend.write_batch([event(0, ts=midnight - 0.5), event(1, ts=midnight),
                             event(2, ts=midnight + DAY - 0.001), event(3, ts=midnight + DAY)])
        rows = sql(backend, f'SELECT tableoid::regclass::text, trace_id FROM "{pg_schema}".events '
                   "ORDER BY ts")
        assert [r[0].rsplit(".", 1)[-1] for r in rows] == [
            "events_20260921", "events_20260922", "events_20260922", "events_20260923"]
        assert partition_name(int(midnight // DAY)) == "events_20260922"
    finally:
        backend.close()


def test_a_timestamp_that_is_not_finite_does_not_refuse_the_batch(pg_url: str) -> None:
    backend = pg(pg_url)
    try:
        backend.write_batch([event(0), event(1, ts=float("inf"))])
        assert backend.count() == 2
    finally:
        backend.close()


def test_schemas_in_one_database_are_separate_stores(pg_url: str, pg_schema: str) -> None:
    other_schema = pg_schema + "_b"
    other = pg(f"{PG_URL}?schema={other_schema}")
    try:
        mine = pg(pg_url)
        mine.write_batch([event(1)])
        other.write_batch([event(2), event(3)])
        assert mine.count() == 1 and other.count() == 2
        assert list(mine.iter_events(EventQuery())) == [event(1)]
        mine.close()
    finally:
        with other.pool().connection() as conn:
            conn.execute(f'DROP SCHEMA "{other_schema}" CASCADE')
        other.close()


def test_opening_to_read_a_schema_without_a_store_creates_nothing(
    pg_url: str, pg_schema: str
) -> None:
    with pytest.raises(cl.StoreError, match=f"no closedloop store in schema '{pg_schema}'"):
        cl.open_store(pg_url, create=False)
    import psycopg

    with psycopg.connect(PG_URL) as conn:
        found = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                             (pg_schema,)).fetchone()
    assert found == (0,)


def test_a_newer_schema_version_is_refused(pg_url: str, pg_schema: str) -> None:
    backend = pg(pg_url)
    sql_exec(backend, f'INSERT INTO "{pg_schema}".schema_version (version) VALUES (%s)',
             SCHEMA_VERSION + 1)
    backend.close()
    with pytest.raises(cl.StoreError, match="newer than this closedloop supports"):
        open_backend(pg_url)


def sql_exec(backend: PostgresBackend, query: str, *params: Any) -> None:
    with backend.pool().connection() as conn:
        conn.execute(query, params)


def test_nul_and_lone_surrogates_are_replaced_not_refused(pg_url: str) -> None:
    backend = pg(pg_url)
    try:
        bad = event(1)._replace(error_message="a\x00b \ud800", agent_id="x\x00",
                                detail={"k\x00": ["v\x00", "\udfff"]})
        backend.write_batch([event(0), bad])
        got = list(backend.iter_events(EventQuery()))
        assert got[0] == event(0)
        assert got[1] == bad._replace(error_message="a\ufffdb \ufffd", agent_id="x\ufffd",
                                      detail={"k\ufffd": ["v\ufffd", "\ufffd"]})
    finally:
        backend.close()


@pytest.mark.requires("psycopg", "psycopg_pool")
@pytest.mark.parametrize("schema", ["", "1abc", "a-b", "x" * 64, 'a"; DROP SCHEMA public'])
def test_a_schema_that_is_not_a_plain_name_is_a_config_error(schema: str) -> None:
    with pytest.raises(cl.ConfigError, match="not a plain SQL name"):
        cl.open_store(f"{PG_URL}?schema={schema}")


@pytest.mark.requires("psycopg", "psycopg_pool")
def test_the_password_never_appears_in_the_url_or_errors() -> None:
    url = "postgresql://postgres:hunter2@127.0.0.1:1/test?schema=x"
    with pytest.raises(cl.StoreError) as caught:
        cl.open_store(url)
    message = str(caught.value)
    assert "hunter2" not in message
    assert "postgresql://postgres:***@127.0.0.1:1/test" in message
    assert len(message.splitlines()) == 1


def test_postgres_scheme_is_an_alias(pg_schema: str) -> None:
    url = PG_URL.replace("postgresql://", "postgres://", 1) + f"?schema={pg_schema}"
    with cl.open_store(url) as store:
        store.record(event(1))
        assert store.flush()
        assert store.count() == 1


def test_psycopg_is_imported_only_when_a_postgresql_store_is_opened(tmp_path: Path) -> None:
    code = f"""
        import sys
        import closedloop as cl
        with cl.open_store("sqlite:///{tmp_path / 'e.db'}") as s:
            s.record(cl.StepEvent(*([0.0] + ["x"] * 5 + [1, 1, 1, 1.0, None, None, None,
                                                          None, 0.0, 0.0, 0.0, 0.0, None])))
        assert "psycopg" not in sys.modules, "psycopg imported"
        print("ok")
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(),
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_without_the_postgres_extra_opening_says_what_to_install() -> None:
    code = """
        import sys
        sys.modules["psycopg"] = None  # as if the extra were not installed
        import closedloop as cl
        try:
            cl.open_store("postgresql://postgres@127.0.0.1/test?schema=never_created")
        except cl.ConfigError as exc:
            print(exc)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(),
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("\n") == 1
    assert "pip install 'closedloop[postgres]'" in out.stdout


def _env() -> dict[str, str]:
    return {"PYTHONPATH": SRC, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


FORK = """
    import os, sys
    from closedloop.store import EventQuery, open_backend
    sys.path.insert(0, sys.argv[2])
    from test_contract import event
    backend = open_backend(sys.argv[1])
    backend.write_batch([event(0)])  # the parent's pool is open and used
    pid = os.fork()
    offset = 1 if pid == 0 else 1000  # child and parent write at the same time
    for i in range(offset, offset + 200):
        backend.write_batch([event(i)])
    if pid == 0:
        backend.close()
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    backend.write_batch([event(5000)])  # the parent's connections still work
    got = sorted(e.input_tokens - 100 for e in backend.iter_events(EventQuery()))
    assert got == [0, *range(1, 201), *range(1000, 1200), 5000], got
    backend.close()
    print("ok")
"""


def test_a_forked_child_writes_through_its_own_connections(pg_url: str) -> None:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FORK), pg_url,
                          str(Path(__file__).parent)], env=_env(), capture_output=True,
                         text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


PARTITIONER = """
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from closedloop.store import open_backend
    from test_contract import event
    url, start = sys.argv[1], float(sys.argv[2])
    backend = open_backend(url)
    while time.time() < start:
        time.sleep(0.001)
    backend.write_batch([event(i, ts=1_790_000_000.0 + i * 86_400.0) for i in range(60)])
    backend.close()
"""


def test_processes_needing_the_same_new_partitions_at_once_all_write(pg_url: str) -> None:
    open_backend(pg_url).close()  # the store exists; its day partitions do not
    start = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(PARTITIONER), pg_url,
                               str(start), str(Path(__file__).parent)], env=_env(),
                              stderr=subprocess.PIPE, text=True) for _ in range(6)]
    for p in procs:  # write_batch itself, without the writer's retries, must not fail
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-1500:]
    backend = pg(pg_url)
    try:
        assert backend.count() == 6 * 60
    finally:
        backend.close()


@pytest.mark.requires("psycopg", "psycopg_pool")
def test_events_for_an_unreachable_server_are_dead_lettered_then_imported(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from closedloop.cli import main
    from closedloop.store import dead_letter_for_url

    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    down = "postgresql://postgres:hunter2@127.0.0.1:1/test?schema=x"  # nothing listens on 1
    store = cl.open_store(down, defer=True, max_held=10)  # an agent starts anyway
    for i in range(25):
        store.record(event(i))
    stats = store.close(timeout=30)
    assert stats.dead_lettered == 25 and stats.lost == 0
    dead = dead_letter_for_url(down)
    assert dead.parent == tmp_path / "data" / "closedloop" / "deadletter"
    assert "hunter2" not in str(dead) and "hunter2" not in dead.read_text()
    result = CliRunner().invoke(main, ["store", "import-deadletter", str(dead),
                                       "--store", pg_url])
    assert result.exit_code == 0, result.output
    backend = pg(pg_url)
    try:
        assert list(backend.iter_events(EventQuery())) == [event(i) for i in range(25)]
    finally:
        backend.close()


def test_the_default_store_can_be_postgresql(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLOSEDLOOP_STORE", pg_url)
    cl.reset_default_store()
    try:
        loop = cl.Loop(lambda task, attempt: task, task_type="pg.default")
        assert loop.run(41).outcome == "succeeded"
        store = cl.default_store()
        assert store.flush()
        (stored,) = store.events()
        assert stored.task_type == "pg.default" and stored.outcome == "succeeded"
    finally:
        # Closed here, before pg_schema drops the schema: the autouse reset comes after that
        # drop, and the store's roll-up keeper folding meanwhile could deadlock with it.
        monkeypatch.setenv("CLOSEDLOOP_STORE", "memory://")
        cl.reset_default_store()


def test_a_batch_the_server_refuses_leaves_nothing_behind(pg_url: str) -> None:
    import psycopg

    backend = pg(pg_url)
    try:
        backend.write_batch([event(0)])
        null_trace = event(3)._replace(trace_id=None)  # type: ignore[arg-type]
        bad = [event(1), event(2), null_trace, event(4)]  # trace_id is NOT NULL
        with pytest.raises(psycopg.errors.NotNullViolation):
            backend.write_batch(bad)
        assert list(backend.iter_events(EventQuery())) == [event(0)]
        backend.write_batch([event(5)])  # the connection is usable again
        assert backend.count() == 2
    finally:
        backend.close()


def test_other_url_parameters_reach_libpq(pg_url: str) -> None:
    backend = pg(f"{pg_url}&application_name=closedloop_contract")
    try:
        (name,) = sql(backend, "SELECT current_setting('application_name')")[0]
        assert name == "closedloop_contract"
        assert "application_name=closedloop_contract" in backend.url
    finally:
        backend.close()


AGENT = """
    import sys
    import closedloop as cl
    worker, steps = sys.argv[1], int(sys.argv[2])
    loop = cl.Loop(lambda task, attempt: task * 2, task_type=f"worker-{worker}",
                   validators=[lambda proposal: None])
    for i in range(steps):
        assert loop.run(i).outcome == "succeeded"
    # no close: the default store is flushed at exit
"""


def test_agents_in_several_processes_share_one_store_each_step_once(pg_url: str) -> None:
    env = {**_env(), "CLOSEDLOOP_STORE": pg_url}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(AGENT), str(w), "400"],
                              env=env, stderr=subprocess.PIPE, text=True) for w in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-1500:]
    backend = pg(pg_url)
    try:
        events = list(backend.iter_events(EventQuery()))
    finally:
        backend.close()
    assert len(events) == 3 * 400
    assert len({e.trace_id for e in events}) == 3 * 400
    for w in range(3):
        mine = [e for e in events if e.task_type == f"worker-{w}"]
        assert len(mine) == 400 and all(e.outcome == "succeeded" for e in mine)


class _Meeting(PostgresBackend):
    """The real backend, whose first two batches must be written at the same time (they wait
    for each other), the calls numbered in ``refuse`` refused once."""

    def __init__(self, url: str, *, refuse: tuple[int, ...] = ()) -> None:
        super().__init__(url)
        self.meet = threading.Barrier(2, timeout=30)
        self.refuse = refuse
        self.threads: list[str] = []
        self.written: list[int] = []  # the input tokens of each written batch's first event
        self.calls = 0
        self.lock = threading.Lock()

    def write_batch(self, events: Sequence[cl.StepEvent]) -> None:
        import psycopg

        with self.lock:
            self.calls += 1
            call = self.calls
        self.threads.append(threading.current_thread().name)
        if call <= 2:
            self.meet.wait()
        if call in self.refuse:
            raise psycopg.OperationalError("the server went away (in the test)")
        super().write_batch(events)
        self.written.append(events[0].input_tokens)


def test_the_writer_writes_two_batches_at_once_each_event_once(pg_url: str) -> None:
    backend = _Meeting(pg_url)
    writer = BatchWriter(backend, batch_size=100, flush_interval=60.0)
    events = [event(i) for i in range(1000)]
    assert writer.submit_many(events)
    assert writer.flush(timeout=60)
    stats = writer.close()
    assert stats.written == 1000 and stats.not_written == 0 and stats.write_errors == 0
    # the first two batches met: one in the lane, one in the writer's own thread
    assert set(backend.threads[:2]) == {"closedloop-store-lane", "closedloop-store-writer"}
    reader = pg(pg_url)
    stored = list(reader.iter_events(EventQuery()))
    reader.close()
    assert sorted(stored) == sorted(events)


def test_a_batch_refused_in_the_lane_is_held_and_written_once(pg_url: str) -> None:
    backend = _Meeting(pg_url, refuse=(1,))
    writer = BatchWriter(backend, batch_size=100, flush_interval=60.0, retry_delays=(0.0,))
    events = [event(i) for i in range(300)]
    assert writer.submit_many(events)
    assert writer.flush(timeout=60)
    stats = writer.close()
    assert stats.written == 300 and stats.not_written == 0 and stats.write_errors == 1
    reader = pg(pg_url)
    stored = list(reader.iter_events(EventQuery()))
    reader.close()
    assert sorted(stored) == sorted(events)
    # the refused batch (the oldest) was written again before any batch after it
    assert backend.calls == 4


def _events_indexes(backend: PostgresBackend) -> set[str]:
    return {r[0] for r in sql(backend, "SELECT indexname FROM pg_indexes WHERE schemaname = %s "
                                       "AND tablename = 'events'", backend.schema)}


_EVENTS_TASK_VERSION = next(v for v, m in enumerate(MIGRATIONS, start=1)
                            if "events_task ON" in m)
"""The schema version whose migration made ``events_task`` (later ones run again after it)."""


def test_a_store_of_the_schema_before_moves_to_events_task_keeping_its_rows(
        pg_url: str) -> None:
    events = [event(i, task_type=("plan", "deploy")[i % 2]) for i in range(40)]
    backend = pg(pg_url)
    try:
        backend.write_batch(events)
        # as the schema before: the two indexes events_task replaces, not events_task
        s = f'"{backend.schema}"'
        with backend.pool().connection() as conn:
            conn.execute(f"DROP INDEX {s}.events_task")
            conn.execute(f"CREATE INDEX events_task_type_ts ON {s}.events (task_type, ts)")
            conn.execute(f"CREATE INDEX events_report ON {s}.events (task_type, outcome, "
                         "error_type, validation_passed, verification_passed, attempts) "
                         "INCLUDE (ts, input_tokens, output_tokens, latency_ms, "
                         "cached_input_tokens, cost_usd)")
            conn.execute(f"DELETE FROM {s}.schema_version WHERE version >= %s",
                         (_EVENTS_TASK_VERSION,))
    finally:
        backend.close()
    migrated = pg(pg_url)
    try:
        assert migrated.found_version == _EVENTS_TASK_VERSION - 1
        indexes = _events_indexes(migrated)
        assert "events_task" in indexes
        assert not indexes & {"events_report", "events_task_type_ts"}
        assert sorted(migrated.iter_events(EventQuery())) == sorted(events)
    finally:
        migrated.close()


def test_summary_counts_task_listings_and_task_types_read_events_task(pg_url: str) -> None:
    from closedloop.store import StepFilter
    from closedloop.store._query import task_types_sql
    from closedloop.store.postgres import _query

    backend = pg(pg_url)
    try:
        backend.write_batch([event(i, task_type=("plan", "deploy")[i % 2]) for i in range(60)])
        plans: list[str] = []

        class Explaining(_query._Source):
            def _rows(self, query: str, params: Sequence[Any]) -> list[Any]:
                plans.append("\n".join(r[0] for r in self.conn.execute(
                    "EXPLAIN " + query, params)))
                return super()._rows(query, params)

        table = _query._table(backend)

        def plan(query: str) -> str:
            return "\n".join(r[0] for r in conn.execute("EXPLAIN " + query))

        with backend.pool().connection() as conn, conn.transaction():
            conn.execute("SET LOCAL enable_seqscan = off")  # as the summary reads
            Explaining(conn, table, StepFilter()).groups()
            listing = plan(f"SELECT ts FROM {table} WHERE task_type = 'plan' "
                           "ORDER BY ts DESC, ctid DESC LIMIT 5")
            types = plan(task_types_sql(table))
        (groups,) = plans
        index = "_task_type_ts_outcome_"  # each day partition's events_task
        assert "Index Only Scan" in groups and index in groups, groups
        assert "Index Scan Backward using events_" in listing and index in listing, listing
        assert index in types, types
    finally:
        backend.close()


def test_when_both_batches_at_once_are_refused_the_older_is_written_first(pg_url: str) -> None:
    backend = _Meeting(pg_url, refuse=(1, 2))
    writer = BatchWriter(backend, batch_size=100, flush_interval=60.0, retry_delays=(0.0,))
    events = [event(i) for i in range(300)]  # input_tokens 100 + i
    assert writer.submit_many(events)
    assert writer.flush(timeout=60)
    stats = writer.close()
    assert stats.written == 300 and stats.not_written == 0 and stats.write_errors == 2
    # held oldest first: the lane's batch (the first hundred), then the writer thread's
    assert backend.written == [100, 200, 300]
