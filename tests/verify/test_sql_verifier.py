"""The SQL verifier over DB-API connections: SQLite and the real PostgreSQL."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import _services
from closedloop.verify import SqlVerifier

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Callable[[], sqlite3.Connection]:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE users (id INTEGER, name TEXT, active INTEGER)")
        conn.executemany("INSERT INTO users VALUES (?, ?, ?)",
                         [(1, "ada", 1), (2, "bob", 1), (3, "cy", 0)])
    conn.close()
    return lambda: sqlite3.connect(path)


@pytest.fixture
def pg_db() -> Iterator[Callable[[], Any]]:
    psycopg = _services.module("psycopg")
    try:
        admin = psycopg.connect(PG_URL, connect_timeout=3, autocommit=True)
    except psycopg.OperationalError as exc:
        _services.unavailable(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}")
    table = f"users_{uuid.uuid4().hex[:8]}"
    admin.execute(f"CREATE TABLE {table} (id INTEGER, name TEXT, active BOOLEAN)")
    admin.execute(f"INSERT INTO {table} VALUES (1, 'ada', true), (2, 'bob', true), "
                  "(3, 'cy', false)")

    def connect() -> Any:
        return psycopg.connect(PG_URL)

    connect.table = table  # type: ignore[attr-defined]
    yield connect
    admin.execute(f"DROP TABLE {table}")
    admin.close()


def test_sqlite_expected_rows_pass(sqlite_db: Callable[[], sqlite3.Connection]) -> None:
    check = SqlVerifier(sqlite_db, "SELECT id, name FROM users WHERE active = ?",
                        params=(1,), rows=[(2, "bob"), (1, "ada")])
    assert check(None, None).passed


def test_sqlite_missing_and_unexpected_rows_are_all_reported(
    sqlite_db: Callable[[], sqlite3.Connection],
) -> None:
    check = SqlVerifier(sqlite_db, "SELECT id, name FROM users",
                        rows=[(1, "ada"), (2, "bob"), (4, "dee")])
    assert sorted((i.code, i.message) for i in check(None, None).issues) == [
        ("sql_missing_row", "missing row (4, 'dee')"),
        ("sql_unexpected_row", "unexpected row (3, 'cy')"),
    ]


def test_ordered_comparison_reports_rows_out_of_place(
    sqlite_db: Callable[[], sqlite3.Connection],
) -> None:
    check = SqlVerifier(sqlite_db, "SELECT id FROM users ORDER BY id", rows=[(1,), (3,), (2,)],
                        ordered=True)
    assert [i.location for i in check(None, None).issues] == ["row 1", "row 2"]


def test_row_predicate_must_hold_for_every_row(
    sqlite_db: Callable[[], sqlite3.Connection],
) -> None:
    def is_active(row: tuple[Any, ...]) -> bool:
        return bool(row[1])

    (issue,) = SqlVerifier(sqlite_db, "SELECT id, active FROM users",
                           each_row=is_active)(None, None).issues
    assert (issue.code, issue.location) == ("sql_row_predicate", "row 2")


def test_params_and_rows_can_come_from_the_intent(
    sqlite_db: Callable[[], sqlite3.Connection],
) -> None:
    check = SqlVerifier(sqlite_db, "SELECT name FROM users WHERE id = ?",
                        params=lambda intent, result: (intent["id"],),
                        rows=lambda intent, result: [(intent["name"],)])
    assert check({"id": 2, "name": "bob"}, None).passed
    assert not check({"id": 2, "name": "ada"}, None).passed


def test_an_open_connection_is_used_and_left_open(
    sqlite_db: Callable[[], sqlite3.Connection],
) -> None:
    conn = sqlite_db()
    assert SqlVerifier(conn, "SELECT count(*) FROM users", rows=[(3,)])(None, None).passed
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()


def test_unopenable_database_is_unknown(tmp_path: Path) -> None:
    def connect() -> sqlite3.Connection:
        return sqlite3.connect(f"file:{tmp_path}/missing.db?mode=ro", uri=True)

    verdict = SqlVerifier(connect, "SELECT 1", rows=[(1,)])(None, None)
    assert verdict.unknown is not None
    assert verdict.unknown.startswith("cannot read the database")


def test_postgres_expected_rows_pass(pg_db: Any) -> None:
    check = SqlVerifier(pg_db, f"SELECT id, name FROM {pg_db.table} WHERE active = %s",
                        params=(True,), rows=[(1, "ada"), (2, "bob")])
    assert check(None, None).passed


def test_postgres_mismatches_are_reported(pg_db: Any) -> None:
    check = SqlVerifier(pg_db, f"SELECT id FROM {pg_db.table}", rows=[(1,), (2,)])
    assert [i.code for i in check(None, None).issues] == ["sql_unexpected_row"]


def test_postgres_unreachable_is_unknown() -> None:
    psycopg = _services.module("psycopg")

    def connect() -> Any:
        return psycopg.connect("postgresql://postgres@127.0.0.1:9/test", connect_timeout=1)

    assert SqlVerifier(connect, "SELECT 1")(None, None).unknown is not None


def test_postgres_query_bug_raises_as_a_verifier_error(pg_db: Any) -> None:
    psycopg = _services.module("psycopg")
    with pytest.raises(psycopg.errors.UndefinedTable):
        SqlVerifier(pg_db, "SELECT * FROM no_such_table_xyz")(None, None)
