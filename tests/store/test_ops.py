"""``closedloop store info|migrate|prune``: what a store holds, its schema, and retention.

Parametrized over memory, SQLite and PostgreSQL (``any_url``) or the stores shared between
processes (``shared_url``); see ``conftest.py``.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop.cli import main
from closedloop.control import Stop, StopKind, ledger_for_store
from closedloop.store import open_backend, prune, store_info

from .conftest import PG_URL
from .test_contract import event

DAY = 86_400.0
NOW = time.time()


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def fill(url: str, stamps: list[float]) -> None:
    with cl.open_store(url) as store:
        for i, ts in enumerate(stamps):
            store.record(event(i, ts=ts))
        assert store.flush()


def stamps_in(url: str) -> list[float]:
    with cl.open_store(url, read_only=True) as store:
        return [e.ts for e in store.events()]


def schema_of(url: str) -> str:
    return url.rsplit("schema=", 1)[1]


def pg_rows(query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        return conn.execute(query, params).fetchall()


def version_of(url: str) -> int:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url[len("sqlite:///"):]) as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
    rows = pg_rows(f'SELECT max(version) FROM "{schema_of(url)}".schema_version')
    return int(rows[0][0])


# ----- info ----------------------------------------------------------------------------


def test_info_counts_the_events_and_names_the_oldest_and_newest(any_url: str) -> None:
    with cl.open_store(any_url) as store:
        for i, ts in enumerate((NOW - 3 * DAY, NOW - 60, NOW - 2 * DAY)):
            store.record(event(i, ts=ts))
        assert store.flush()
        found = store_info(store)
    assert found.backend == any_url.split(":", 1)[0]
    assert (found.events, found.oldest_event, found.newest_event) == (3, NOW - 3 * DAY, NOW - 60)
    assert found.pending_migrations == 0
    assert (found.control_stops, found.control_halts) == (0, 0)


def test_info_on_the_command_line_shows_schema_counts_size_and_partitions(
    shared_url: str,
) -> None:
    fill(shared_url, [NOW - 2 * DAY, NOW - DAY, NOW])
    result = cli("store", "info", "--store", shared_url, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["events"] == 3
    assert found["schema_version"] == found["latest_version"] > 0
    assert found["pending_migrations"] == 0
    assert found["size_bytes"] > 0
    assert found["newest_event_time"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW))
    days = [time.strftime("events_%Y%m%d", time.gmtime(t)) for t in (NOW - 2 * DAY, NOW - DAY,
                                                                     NOW)]
    assert found["partitions"] == (days if shared_url.startswith("postgresql") else [])
    text = cli("store", "info", "--store", shared_url)
    assert text.exit_code == 0, text.output
    assert "events     3, oldest " in text.stdout
    assert "no migration pending" in text.stdout


def test_info_counts_stops_in_force_and_halts(shared_url: str) -> None:
    fill(shared_url, [NOW])
    with cl.open_store(shared_url) as store:
        ledger = ledger_for_store(store, redis_url=None)
        ledger.put(Stop(task_type="a", kind=StopKind.HALTED, reason="r", by="t", at=NOW))
        ledger.put(Stop(task_type="b", kind=StopKind.PAUSED, reason="r", by="t", at=NOW,
                        until=NOW + 600))
        ledger.put(Stop(task_type="c", kind=StopKind.PAUSED, reason="r", by="t", at=NOW - 900,
                        until=NOW - 300))  # expired: not in force
        found = store_info(store)
    assert (found.control_stops, found.control_halts, found.control_history) == (2, 1, 3)


def test_info_of_a_missing_store_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "none.db"
    result = cli("store", "info", "--store", f"sqlite:///{path}")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no store at ") and result.stderr.count("\n") == 1
    assert not path.exists()


# ----- migrations ------------------------------------------------------------------------


@pytest.fixture
def v1_url(shared_url: str) -> str:
    """A store made by the first schema version only (events, no spans or control state)."""
    if shared_url.startswith("sqlite:///"):
        from closedloop.store.sqlite import MIGRATIONS

        with sqlite3.connect(shared_url[len("sqlite:///"):]) as conn:
            conn.executescript(MIGRATIONS[0])
            conn.execute("PRAGMA user_version = 1")
        return shared_url
    from closedloop.store.postgres import MIGRATIONS as PG_MIGRATIONS

    schema = schema_of(shared_url)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
        conn.execute(f'CREATE TABLE "{schema}".schema_version (version INTEGER PRIMARY KEY, '
                     "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        for statement in PG_MIGRATIONS[0].split(";"):
            if statement.strip():
                conn.execute(statement.replace("{schema}", f'"{schema}"'))
        conn.execute(f'INSERT INTO "{schema}".schema_version (version) VALUES (1)')
    return shared_url


def test_reading_commands_never_migrate_an_older_schema(v1_url: str) -> None:
    result = cli("store", "info", "--store", v1_url, "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found["schema_version"] == 1
    assert found["pending_migrations"] == found["latest_version"] - 1 >= 1
    assert "run `closedloop store migrate`" in cli("store", "info", "--store", v1_url).stdout
    assert cli("status", "--store", v1_url).exit_code == 0
    assert cli("store", "prune", "--older-than", "30d", "--store", v1_url).exit_code == 0
    assert version_of(v1_url) == 1


def test_migrate_applies_the_pending_migrations_and_says_from_which_version(v1_url: str) -> None:
    result = cli("store", "migrate", "--store", v1_url)
    assert result.exit_code == 0, result.output
    latest = version_of(v1_url)
    assert latest > 1
    assert result.stdout.strip().endswith(f"from schema version 1 to {latest}")
    again = cli("store", "migrate", "--store", v1_url, "--json")
    assert json.loads(again.stdout)["from_version"] == json.loads(again.stdout)["to_version"]


def test_migrate_creates_a_store_that_does_not_exist_yet(shared_url: str) -> None:
    result = cli("store", "migrate", "--store", shared_url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["from_version"] == 0
    assert version_of(shared_url) == json.loads(result.stdout)["to_version"]


# ----- prune -------------------------------------------------------------------------------


def test_prune_removes_events_older_than_the_age_and_keeps_the_rest(shared_url: str) -> None:
    fill(shared_url, [NOW - 40 * DAY, NOW - 31 * DAY, NOW - 29 * DAY, NOW - 3600])
    result = cli("store", "prune", "--older-than", "30d", "--store", shared_url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["events"] == 2
    assert stamps_in(shared_url) == [NOW - 29 * DAY, NOW - 3600]
    line = cli("store", "prune", "--older-than", "2w", "--store", shared_url)
    assert line.exit_code == 0 and line.stdout.startswith("removed 1 events older than ")


def test_the_memory_store_prunes_too(memory_store: cl.Store) -> None:
    for i, ts in enumerate((NOW - 3 * DAY, NOW)):
        memory_store.record(event(i, ts=ts))
    assert memory_store.flush()
    assert prune(memory_store, NOW - DAY).events.events == 1
    assert [e.ts for e in memory_store.events()] == [NOW]


def test_a_dry_run_says_what_would_go_and_removes_nothing(shared_url: str) -> None:
    fill(shared_url, [NOW - 40 * DAY, NOW - 35 * DAY, NOW])
    result = cli("store", "prune", "--older-than", "30d", "--dry-run", "--store", shared_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("would remove 2 events older than ")
    assert len(stamps_in(shared_url)) == 3


@pytest.mark.parametrize("age", ["30x", "30", "6m", "0d", "-1d", "", "1e3d", "99999999999w"])
def test_a_bad_age_is_one_line_and_exit_2(age: str, tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    result = cli("store", "prune", "--older-than", age, "--store", f"sqlite:///{path}")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: Invalid value for '--older-than'")
    assert result.stderr.count("\n") == 1
    assert not path.exists()


def test_prune_needs_an_age(tmp_path: Path) -> None:
    result = cli("store", "prune", "--store", f"sqlite:///{tmp_path / 'e.db'}")
    assert result.exit_code == 2 and "--older-than" in result.stderr


def test_sqlite_deletes_in_short_transactions(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from closedloop.store.sqlite import _backend as _sqlite

    url = f"sqlite:///{tmp_path / 'events.db'}"
    fill(url, [NOW - 40 * DAY + i for i in range(1000)] + [NOW])
    statements: list[str] = []
    connect = _sqlite._connect

    def traced(path: Path) -> sqlite3.Connection:
        conn = connect(path)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(_sqlite, "BATCH", 64)
    monkeypatch.setattr(_sqlite, "_connect", traced)
    with cl.open_store(url, read_only=True) as store:
        assert prune(store, NOW - DAY).events.events == 1000
    assert statements.count("COMMIT") >= 1000 // 64
    assert stamps_in(url) == [NOW]


def test_sqlite_reuses_the_space_that_pruning_freed(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    path = tmp_path / "events.db"
    fill(url, [NOW - 40 * DAY + i for i in range(5000)])
    with cl.open_store(url) as store:
        prune(store, NOW - DAY)
        freed = store_info(store).free_bytes
        assert freed is not None and freed > 0
    with sqlite3.connect(path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
    with cl.open_store(url) as store:
        for i in range(4000):
            store.record(event(10_000 + i, ts=NOW))
        assert store.flush()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA page_count").fetchone()[0] <= pages  # the file did not grow
    assert len(stamps_in(url)) == 4000


@pytest.fixture
def pg_store(pg_url: str) -> Iterator[cl.Store]:
    store = cl.open_store(pg_url)
    yield store
    store.close()


MIDNIGHT = 1_790_035_200.0  # 2026-09-22T00:00:00Z


def partitions(schema: str) -> list[str]:
    rows = pg_rows("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                   "JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON "
                   "n.oid = p.relnamespace WHERE n.nspname = %s AND p.relname = 'events'",
                   schema)
    return sorted(r[0] for r in rows)


def test_postgresql_drops_whole_days_and_keeps_the_cutoffs_day(pg_store: cl.Store,
                                                              pg_url: str) -> None:
    schema = schema_of(pg_url)
    stamps = [MIDNIGHT - 2 * DAY + 5, MIDNIGHT - DAY + 5, MIDNIGHT - 1, MIDNIGHT + 60,
              MIDNIGHT + 11 * 3600, MIDNIGHT + DAY + 5]
    for i, ts in enumerate(stamps):
        pg_store.record(event(i, ts=ts))
    assert pg_store.flush()
    before = MIDNIGHT + 12 * 3600  # noon: the morning's events are older, and kept
    dry = prune(pg_store, before, dry_run=True)
    assert dry.events.partitions == ("events_20260920", "events_20260921")
    assert len(partitions(schema)) == 5
    report = prune(pg_store, before)
    assert report.events.events == 3
    assert report.events.kept_from == MIDNIGHT
    assert partitions(schema) == ["events_20260922", "events_20260923", "events_default"]
    assert [e.ts for e in pg_store.events()] == stamps[3:]


def test_postgresql_deletes_late_events_of_a_dropped_day(pg_url: str) -> None:
    writer = open_backend(pg_url)  # remembers the partitions it made
    try:
        writer.write_batch([event(0, ts=MIDNIGHT - DAY + 5), event(1, ts=MIDNIGHT + 5)])
        with cl.open_store(pg_url) as other:
            assert prune(other, MIDNIGHT).events.partitions == ("events_20260921",)
            writer.write_batch([event(2, ts=MIDNIGHT - DAY + 50)])  # late: lands in the default
            assert pg_rows(f'SELECT count(*) FROM "{schema_of(pg_url)}".events_default') == [(1,)]
            assert prune(other, MIDNIGHT).events.events == 1
            assert [e.ts for e in other.events()] == [MIDNIGHT + 5]
    finally:
        writer.close()


def test_a_partition_dropped_by_its_own_writer_is_made_again_for_late_events(pg_url: str) -> None:
    with cl.open_store(pg_url) as store:
        store.record(event(0, ts=MIDNIGHT - DAY + 5))
        assert store.flush()
        prune(store, MIDNIGHT)
        store.record(event(1, ts=MIDNIGHT - DAY + 50))
        assert store.flush()
    assert pg_rows(f'SELECT count(*) FROM "{schema_of(pg_url)}".events_default') == [(0,)]
    assert "events_20260921" in partitions(schema_of(pg_url))


def test_control_history_goes_but_never_a_stop_in_force(shared_url: str) -> None:
    old = NOW - 100 * DAY
    fill(shared_url, [NOW])
    with cl.open_store(shared_url) as store:
        ledger: Any = ledger_for_store(store, redis_url=None)
        ledger.clock = lambda: old
        ledger.put(Stop(task_type="halted", kind=StopKind.HALTED, reason="bad", by="t", at=old))
        ledger.put(Stop(task_type="long", kind=StopKind.PAUSED, reason="p", by="t", at=old,
                        until=NOW + DAY))
        ledger.put(Stop(task_type="expired", kind=StopKind.PAUSED, reason="p", by="t", at=old,
                        until=old + 300))
        ledger.put(Stop(task_type="lifted", kind=StopKind.HALTED, reason="x", by="t", at=old))
        ledger.lift("lifted", reason="fixed", by="ops")
        ledger.publish("old-process", {"openai/gpt": {"rate": 1.0}})
        ledger.clock = time.time
        ledger.put(Stop(task_type="recent", kind=StopKind.PAUSED, reason="p", by="t", at=NOW,
                        until=NOW + 600))
        dry = prune(store, NOW - 30 * DAY, dry_run=True)
        report = prune(store, NOW - 30 * DAY)
        assert dry.control == report.control == 5  # 3 history records, a pause, a snapshot
        assert {s.task_type for s in ledger.stops()} == {"halted", "long", "recent"}
        assert ledger.get("halted") is not None and ledger.get("halted").kind is StopKind.HALTED
        kept = {(h["event"], h["task_type"]) for h in ledger.history(limit=100)}
        assert kept == {("halted", "halted"), ("paused", "long"), ("paused", "recent")}
        assert ledger.published(max_age=1e12) == {}


def test_a_store_without_control_tables_prunes_its_events(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    fill(url, [NOW - 40 * DAY, NOW])
    with cl.open_store(url) as store:
        report = prune(store, NOW - DAY)
    assert (report.events.events, report.control) == (1, 0)




def test_postgresql_reports_a_large_partition_by_its_statistics_instead_of_counting(
    pg_store: cl.Store, pg_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from closedloop.store.postgres import _backend as _postgres

    for i in range(5):
        pg_store.record(event(i, ts=MIDNIGHT - DAY + i))
    pg_store.record(event(9, ts=MIDNIGHT - 2 * DAY))
    assert pg_store.flush()
    with psycopg.connect(PG_URL, autocommit=True) as conn:  # statistics: 5 rows
        conn.execute(f'ANALYZE "{schema_of(pg_url)}".events_20260921')
    monkeypatch.setattr(_postgres, "COUNT_UP_TO", 2)  # "large" is more than 2 rows here
    dry = prune(pg_store, MIDNIGHT, dry_run=True)
    assert (dry.events.events, dry.events.approximate) == (6, True)
    result = cli("store", "prune", "--older-than", "1h", "--store", pg_url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("removed about 6 events older than ")
    assert list(pg_store.events()) == []
