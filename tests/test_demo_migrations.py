"""The migrations demo end to end on the real PostgreSQL, against the agent's fault ledger.

One run of ``TASKS`` seeded tasks (seed ``SEED`` injects every kind of fault in them) is shared
by the module: its schema is kept (``keep=True``) so the tests can read what it left, and
dropped by the fixture afterwards. Each test checks one thing a user of the demo relies on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import closedloop as cl
from closedloop import approvals
from closedloop.cli import main
from closedloop.demo import MigrationModel, MigrationRates, generate_tasks
from closedloop.demo._migmodel import (
    BASE_ROWS,
    BASE_TABLES,
    FaultCategory,
    LedgerEntry,
    MigrationLedger,
    MigrationStep,
    expected_result,
)
from closedloop.demo._migrations import (
    SCHEMA_PREFIX,
    ApplyMigration,
    MigrationFailed,
    MigrationSummary,
    StaysInSchema,
    read_schema,
    run_migrations_demo,
)
from closedloop.loop import Attempt

psycopg = pytest.importorskip("psycopg")  # the postgres extra: .ci/run installs it

pytestmark = [pytest.mark.slow, pytest.mark.requires("psycopg")]

PG_URL = os.environ.get("CLOSEDLOOP_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
TASKS = 10
SEED = 10
"""Seed 10's first ten tasks hold every fault category (checked by a test below)."""


def connect() -> Any:
    try:
        return psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        from _services import unavailable

        unavailable(f"PostgreSQL at {PG_URL} is not reachable: {exc}")


def drop(schema: str) -> None:
    with connect() as conn:
        conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
            psycopg.sql.Identifier(schema)))


def schema_exists(schema: str) -> bool:
    with connect() as conn:
        return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s",
                            (schema,)).fetchone() is not None


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MigrationSummary, str]]:
    connect().close()
    url = f"sqlite:///{tmp_path_factory.mktemp('migdemo') / 'events.db'}"
    summary = run_migrations_demo(TASKS, SEED, url, pg_url=PG_URL, keep=True)
    try:
        yield summary, url
    finally:
        drop(summary.schema)


@pytest.fixture
def summary(shared: tuple[MigrationSummary, str]) -> MigrationSummary:
    return shared[0]


@pytest.fixture
def store(shared: tuple[MigrationSummary, str]) -> Iterator[cl.Store]:
    s = cl.open_store(shared[1])
    yield s
    s.close()


def tables(schema: str) -> dict[tuple[str, str], str]:
    with connect() as conn:
        return read_schema(conn, schema)


# ---- the summary against the ledger ---------------------------------------------------------


def test_the_seeded_tasks_inject_every_kind_of_fault(summary: MigrationSummary) -> None:
    injected = summary.ledger.counts()
    assert all(injected[c.value] >= 1 for c in FaultCategory), injected


def test_every_task_ends_where_its_fault_must_be_caught(summary: MigrationSummary) -> None:
    by_task = summary.ledger.by_task()
    assert sorted(by_task) == list(range(TASKS))
    expected = {t: expected_result(entries, summary.max_attempts)
                for t, entries in by_task.items()}
    assert summary.outcomes == expected
    # and the fault categories land in the right rows, with nothing left over
    for t, entries in by_task.items():
        category = entries[-1].category
        want = {None: "succeeded", FaultCategory.DESTRUCTIVE: "awaiting_approval",
                FaultCategory.WRONG_SCHEMA: "compensated",
                FaultCategory.MIDWAY: "rolled_back",
                FaultCategory.SYNTAX: "failed_validation"}[category]
        assert summary.outcomes[t] == want, (t, entries)


def test_the_summary_counts_equal_the_ledger_s(summary: MigrationSummary) -> None:
    expected = summary.ledger.expected_outcomes(summary.max_attempts)
    injected = summary.ledger.counts()
    assert summary.succeeded == expected["succeeded"] == summary.migrations_recorded
    assert summary.failed_validation == expected["failed_validation"]
    assert len(summary.awaiting_approval) == expected["awaiting_approval"] \
        == injected["destructive"]
    assert summary.compensated == expected["compensated"] == injected["wrong_schema"]
    assert summary.rolled_back == expected["rolled_back"] == injected["midway"]
    assert (summary.compensation_failed, summary.rollback_leaked, summary.blocked,
            summary.errors) == (0, 0, 0, 0), summary.first_error
    reasked = sum(1 for e in summary.ledger.by_task().values()
                  if len(e) > 1 and e[-1].category is not FaultCategory.SYNTAX)
    assert summary.reasked_fixed == reasked >= 1
    assert summary.base_intact
    assert summary.to_dict()["expected"] == expected


# ---- what the database holds afterwards -----------------------------------------------------


def test_clean_migrations_are_applied_and_faulty_ones_leave_nothing(
        summary: MigrationSummary) -> None:
    now = tables(summary.schema)
    for task in generate_tasks(TASKS, SEED):
        present = {k: now.get(k) for k in task.expected_columns()}
        if summary.outcomes[task.index] == "succeeded":
            assert present == task.expected_columns(), task
        else:  # validation, approval, compensation and rollback: no trace of it
            assert set(present.values()) == {None}, (task, summary.outcomes[task.index])
            assert not any(t == task.table and c.startswith(task.columns[-1][0])
                           for t, c in now if task.kind == "add_column"), task
    added = {t for t, _ in now} - {"customers", "orders", "schema_migrations"}
    assert added == {t.table for t in generate_tasks(TASKS, SEED)
                     if t.kind == "create_table" and summary.outcomes[t.index] == "succeeded"}


def test_succeeded_migrations_are_recorded_and_the_base_rows_are_intact(
        summary: MigrationSummary) -> None:
    s = psycopg.sql.Identifier(summary.schema)
    with connect() as conn:
        versions = [r[0] for r in conn.execute(psycopg.sql.SQL(
            "SELECT version FROM {}.schema_migrations ORDER BY version").format(s))]
        rows = {t: conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {}.{}").format(
            s, psycopg.sql.Identifier(t))).fetchone()[0] for t in BASE_ROWS}
    assert versions == [t + 1 for t, o in sorted(summary.outcomes.items()) if o == "succeeded"]
    assert rows == BASE_ROWS


# ---- what the store holds -------------------------------------------------------------------


def test_destructive_migrations_wait_as_durable_requests(summary: MigrationSummary,
                                                         store: cl.Store) -> None:
    destructive = {t for t, e in summary.ledger.by_task().items()
                   if e[-1].category is FaultCategory.DESTRUCTIVE}
    assert {p.task for p in summary.awaiting_approval} == destructive
    page = approvals.list_requests(status="pending", store=store)
    assert {r.request_id for r in page.requests} == {p.approval_id
                                                     for p in summary.awaiting_approval}
    for request in page.requests:
        assert request.destructive and request.task_type == "pg.migrate"
        assert "destroys data" in (request.risk or {})["summary"]
    assert all("destroys data" in p.risk for p in summary.awaiting_approval)


def test_every_task_is_a_run_of_recorded_steps(summary: MigrationSummary,
                                               store: cl.Store) -> None:
    runs = store.runs().list_runs(limit=100).runs
    assert len(runs) == TASKS == summary.runs
    assert {r.outcome for r in runs} == {"succeeded"}
    assert sum(r.compensated for r in runs) == summary.compensated
    events = list(store.events())
    by_type: dict[str, list[cl.StepEvent]] = {}
    for e in events:
        by_type.setdefault(e.task_type, []).append(e)
    assert len(by_type["pg.inspect"]) == TASKS
    assert len(by_type["pg.record"]) == summary.succeeded
    migrate = by_type["pg.migrate"]
    compensations = [e for e in migrate if e.agent_id == "closedloop.compensate"]
    assert [e.outcome for e in compensations] == ["compensated"] * summary.compensated
    steps = [e for e in migrate if e.agent_id == "migration-agent"]
    assert len(steps) == TASKS
    assert sum(e.error_type == "executor" for e in steps) == summary.rolled_back
    assert sum(e.error_type == "verification" for e in steps) == summary.compensated
    assert all(e.run_id for e in events)
    assert summary.events_written == len(events)


# ---- the parts on their own ------------------------------------------------------------------


@pytest.fixture
def scratch() -> Iterator[tuple[Any, str]]:
    import secrets

    schema = f"{SCHEMA_PREFIX}t{secrets.token_hex(4)}"
    conn = connect()
    conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(schema)))
    conn.execute(psycopg.sql.SQL("CREATE TABLE {}.orders (id bigint, total integer)").format(
        psycopg.sql.Identifier(schema)))
    conn.execute(psycopg.sql.SQL("INSERT INTO {}.orders VALUES (1, 2)").format(
        psycopg.sql.Identifier(schema)))
    try:
        yield conn, schema
    finally:
        conn.close()
        drop(schema)


def test_a_migration_failing_midway_is_rolled_back_whole(scratch: tuple[Any, str]) -> None:
    conn, schema = scratch
    before = read_schema(conn, schema)
    with pytest.raises(MigrationFailed, match="rolled back: NotNullViolation"):
        ApplyMigration(conn, schema)(
            "ALTER TABLE orders ADD COLUMN note text;\n"
            "ALTER TABLE orders ALTER COLUMN note SET NOT NULL;")
    assert read_schema(conn, schema) == before


def test_migrations_land_in_the_demo_s_schema_and_compensation_restores_it(
        scratch: tuple[Any, str]) -> None:
    conn, schema = scratch
    before = read_schema(conn, schema)
    apply = ApplyMigration(conn, schema)
    with cl.Run("t", store=cl.open_store("memory://"), telemetry=None) as run:
        result = apply("CREATE TABLE extra (id int); ALTER TABLE orders ADD COLUMN x date;")
        assert result.changes == ("extra.id was added", "orders.x was added")
        assert read_schema(conn, schema)[("orders", "x")] == "date"
        run.abort("undo")  # the run's rollback runs the registered compensation
    assert run.compensated == 1
    assert read_schema(conn, schema) == before
    assert apply.restored(before).passed


@pytest.mark.parametrize("sql", [
    "ALTER TABLE public.orders ADD COLUMN x int",
    "CREATE TABLE t AS SELECT * FROM public.secret",
    "ALTER TABLE other_db.cl_demo_mig_x.orders ADD COLUMN x int",
    "ALTER TABLE orders ADD COLUMN x int; COMMIT; DROP TABLE public.t",
    "BEGIN",
    "SET search_path TO public",
    "CREATE SCHEMA elsewhere",
    "CREATE FUNCTION f() RETURNS int AS $$ select 1 $$ LANGUAGE sql",
    "GRANT ALL ON orders TO bob",
])
def test_sql_leaving_the_demo_s_schema_or_transaction_is_blocked(sql: str) -> None:
    verdict = StaysInSchema("cl_demo_mig_x")(sql)
    assert not verdict.passed
    assert max(i.severity for i in verdict.issues) >= cl.Severity.CRITICAL, verdict


@pytest.mark.parametrize("sql", [
    "ALTER TABLE cl_demo_mig_x.orders ADD COLUMN x int",
    "ALTER TABLE orders ADD COLUMN x int; ALTER TABLE orders ALTER COLUMN x SET NOT NULL",
    "CREATE TABLE t (id bigint PRIMARY KEY); CREATE INDEX t_i ON t (id)",
    "DROP TABLE orders",  # destructive, yet in its schema: the risk rule gates it
    "UPDATE orders SET total_cents = 0 WHERE id = 1",
])
def test_migrations_of_the_demo_s_schema_pass(sql: str) -> None:
    assert StaysInSchema("cl_demo_mig_x")(sql).passed


def test_tasks_and_the_agent_s_choices_depend_only_on_seed_and_index() -> None:
    assert generate_tasks(20, 3)[:5] == generate_tasks(5, 3)
    assert generate_tasks(5, 3) != generate_tasks(5, 4)

    def proposals(seed: int) -> list[tuple[str, Any]]:
        model = MigrationModel(seed, rates=MigrationRates(syntax=0.5))
        out = []
        for task in generate_tasks(12, seed):
            attempt = Attempt(number=1, trace_id=f"t{task.index}", task_type="pg.migrate")
            out.append((model(MigrationStep(task=task), attempt), model.ledger.entries[-1].kind))
        return out

    assert proposals(5) == proposals(5)


def test_expected_result_follows_the_autonomy() -> None:
    clean = [LedgerEntry(task=0, trace_id="t", attempt=1)]
    assert expected_result(clean, 3) == "succeeded"
    assert expected_result(clean, 3, "approve") == "awaiting_approval"
    assert expected_result(clean, 3, "suggest") == "suggested"
    assert MigrationLedger(clean).expected_outcomes(3)["succeeded"] == 1


# ---- the command --------------------------------------------------------------------------


def test_the_command_prints_the_summary_and_drops_its_schema(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    out = CliRunner().invoke(main, ["demo", "--scenario", "migrations", "--requests",
                                    str(TASKS), "--seed", str(SEED), "--pg", PG_URL,
                                    "--store", url, "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["expected"]["compensated"] == data["compensated"] >= 1
    assert data["expected"]["rolled_back"] == data["rolled_back"] >= 1
    assert len(data["awaiting_approval"]) == data["expected"]["awaiting_approval"] >= 1
    assert data["expected"]["succeeded"] == data["succeeded"]
    assert data["schema"].startswith(SCHEMA_PREFIX) and not data["kept"]
    assert not schema_exists(data["schema"])

    text = CliRunner().invoke(main, ["demo", "--scenario", "migrations", "--requests", "3",
                                     "--seed", str(SEED), "--pg", PG_URL, "--store", url])
    assert text.exit_code == 0, text.output
    assert "schema migrations on PostgreSQL" in text.output
    assert "Applied, verified, recorded" in text.output and "dropped" in text.output


@pytest.mark.parametrize("autonomy", ["approve", "suggest"])
def test_below_autonomous_nothing_is_applied_unattended(tmp_path: Path, autonomy: str) -> None:
    summary = run_migrations_demo(4, SEED, f"sqlite:///{tmp_path / 'e.db'}", pg_url=PG_URL,
                                  autonomy=autonomy, keep=True)
    try:
        assert summary.outcomes == {t: expected_result(e, 3, autonomy)
                                    for t, e in summary.ledger.by_task().items()}
        assert summary.succeeded == summary.migrations_recorded == 0
        if autonomy == "approve":
            assert len(summary.awaiting_approval) == 4 - summary.failed_validation
        else:
            assert summary.suggested == 4 - summary.failed_validation
        base = {(t, c) for t, cols in BASE_TABLES.items() for c, _ in cols}
        base |= {("schema_migrations", c) for c in ("version", "description", "applied_at")}
        assert set(tables(summary.schema)) == base
        assert summary.base_intact
    finally:
        drop(summary.schema)


def test_an_unreachable_database_is_a_one_line_error_without_the_password() -> None:
    out = CliRunner().invoke(main, ["demo", "--scenario", "migrations", "--requests", "1",
                                    "--pg", "postgresql://postgres:hunter2@127.0.0.1:1/test",
                                    "--store", "memory://"])
    assert out.exit_code != 0
    assert "cannot connect to PostgreSQL" in out.output
    assert "hunter2" not in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_stored_text_in_the_summary_is_printed_literally(
        summary: MigrationSummary, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    from closedloop.cli._demo import _print_migrations
    from closedloop.demo._migrations import Pending

    hostile = "[bold red]FAKE[/] \x1b[2J\nforged line"
    _print_migrations(dataclasses.replace(
        summary, store_url="sqlite:////tmp/[x]\x1b.db", errors=1, first_error=hostile,
        awaiting_approval=[Pending(task=0, approval_id="[u]id[/u]", risk=hostile)]))
    out = capsys.readouterr().out
    assert "\x1b[2J" not in out and "\x1b" not in out.replace("\\x1b", "")
    assert "[bold red]FAKE[/]" in out and "[u]id[/u]" in out
    assert "\\nforged line" in out and "\nforged line" not in out
