"""``closedloop traces``, ``scores`` and ``replay`` on every store (``--store postgresql://...``
included), and what is particular to the SQLite and PostgreSQL span stores."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

import closedloop as cl
from closedloop.cli import main
from closedloop.store import SpanBackend, SQLiteSpanStore, open_backend
from closedloop.telemetry import StoredSpan, StoreExporter, Telemetry, span_store_for

from .conftest import PG_URL
from .test_spans import T0, step


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), prog_name="closedloop")


REGIONS = {1: "eu-west-1", 2: "mars-1", 3: "eu-west-1"}


def propose(task: int, attempt: cl.Attempt) -> dict[str, Any]:
    return {"id": task, "region": REGIONS[task]}


def provision(proposal: dict[str, Any]) -> dict[str, Any]:
    return {"region": "nowhere" if proposal["region"].startswith("mars") else proposal["region"]}


def landed(intent: int, result: dict[str, Any]) -> bool:
    return bool(result["region"] == REGIONS[intent])


def known_region(proposal: dict[str, Any]) -> str | None:
    return None if proposal["region"].startswith("eu-") else f"unknown region {proposal['region']}"


def _record(url: str) -> list[str]:
    """Three traced steps of ``provision`` through the loop; their trace ids, oldest first."""
    with cl.open_store(url) as store:
        pipeline = Telemetry([StoreExporter(store)], flush_interval=60.0)
        loop = cl.Loop(propose, task_type="provision", executor=provision, verifiers=[landed],
                       store=store, telemetry=pipeline)
        ids = [loop.run(task).trace_id for task in REGIONS]
        pipeline.shutdown()
    return ids


def test_traces_scores_and_replay_work_on_sqlite_and_postgresql(shared_url: str) -> None:
    any_url = shared_url  # a memory:// store lives in one store object: no command can open it
    ids = _record(any_url)
    listed = invoke("traces", "list", "--store", any_url, "--limit", "2", "--json")
    assert listed.exit_code == 0, listed.output
    first = json.loads(listed.stdout)
    assert [t["trace_id"] for t in first["traces"]] == [ids[2], ids[1]]
    assert [t["outcome"] for t in first["traces"]] == ["succeeded", "failed"]
    rest = json.loads(invoke("traces", "list", "--store", any_url, "--json", "--limit", "2",
                             "--cursor", first["next_cursor"]).stdout)
    assert rest == {"traces": [dict(rest["traces"][0], trace_id=ids[0])], "next_cursor": None}

    shown = invoke("traces", "show", ids[1], "--store", any_url)
    assert shown.exit_code == 0, shown.output
    assert "outcome=failed" in shown.stdout and "verdict.passed=False" in shown.stdout

    added = invoke("scores", "add", ids[1], "quality", "wrong_region", "--store", any_url)
    assert added.exit_code == 0, added.output
    assert added.stderr == ""  # the trace is known: no warning
    scores = json.loads(invoke("scores", "list", "--store", any_url, "--json").stdout)
    assert [(s["trace_id"], s["label"]) for s in scores] == [(ids[1], "wrong_region")]

    replayed = invoke("replay", "--task-type", "provision", "--store", any_url, "--json",
                      "--validator", "store.test_cli_spans:known_region")
    assert replayed.exit_code == 0, replayed.output
    (check,) = json.loads(replayed.stdout)["checks"]
    assert (check["replayed"], check["caught_verification_failures"]) == (3, 1)


def test_traces_list_ends_a_page_with_the_next_pages_cursor(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    ids = _record(url)
    page = invoke("traces", "list", "--store", url, "--limit", "2")
    assert page.exit_code == 0, page.output
    assert ids[2] in page.stdout and ids[0] not in page.stdout and page.stderr == ""
    hint = page.stdout.splitlines()[-1]
    assert hint.startswith("more: --cursor ")
    rest = invoke("traces", "list", "--store", url, "--cursor", hint.split()[-1])
    assert ids[0] in rest.stdout and "more:" not in rest.stdout


def test_traces_list_prints_aligned_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    with cl.open_store(url) as store:
        span_store_for(store).write_spans(step(1, task_type="a") + step(2, spans=12,
                                                                       task_type="longer.type"))
    lines = invoke("traces", "list", "--store", url).stdout.splitlines()
    assert lines[0].split() == ["trace", "id", "started", "task", "type", "outcome", "spans", "ms"]
    assert len({line.index(" 20") for line in lines[1:]}) == 1  # the start times line up
    assert {line.index("  succeeded") for line in lines[1:]} == {lines[0].index("  outcome")}
    assert [line[lines[0].index("spans"):lines[0].index("spans") + 5] for line in lines[1:]] == [
        "   12", "    3"]  # counts right-aligned under their header


def test_a_cursor_no_listing_gave_is_a_usage_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'events.db'}"
    _record(url)
    result = invoke("traces", "list", "--store", url, "--cursor", "[red]nope")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: cursor '[red]nope' is not one a trace listing gave"


# ----- SQLite --------------------------------------------------------------------------------
def test_a_sqlite_store_opened_read_only_lists_traces_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    with cl.open_store(f"sqlite:///{path}") as store:
        span_store_for(store).write_spans(step(1))
    reader = cl.open_store(f"sqlite:///{path}", read_only=True)
    spans = span_store_for(reader)
    assert [t.trace_id for t in spans.traces().traces] == [f"{1:032x}"]
    with pytest.raises(cl.StoreError, match="opened read-only"):
        spans.write_spans(step(2))
    reader.close()


def test_a_sqlite_store_of_schema_2_lists_the_traces_it_already_had(tmp_path: Path) -> None:
    from closedloop.store.sqlite import MIGRATIONS

    path = tmp_path / "v2.db"
    db = sqlite3.connect(path)
    for migration in MIGRATIONS[:2]:
        db.executescript(migration)
    db.execute("PRAGMA user_version = 2")
    rows = [s.to_row() for s in step(1, task_type="plan") + step(2, outcome="failed")
            + [StoredSpan(trace_id=f"{3:032x}", span_id="1" * 16, parent_id=None, name="user",
                          kind=0, start_ns=T0 + 9000, end_ns=T0 + 9001, status=0,
                          status_message=None, attributes={})]]
    db.executemany("INSERT INTO spans VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    db.commit()
    db.close()
    with cl.open_store(f"sqlite:///{path}") as store:  # migrates
        listed = span_store_for(store).traces().traces
    assert [(t.trace_id[-1], t.spans, t.task_type, t.outcome) for t in listed] == [
        ("3", 1, None, None), ("2", 3, "deploy", "failed"), ("1", 3, "plan", "succeeded")]


def test_spans_of_a_sqlite_store_that_cannot_open_yet_are_refused_until_it_opens(
        tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    spans = SQLiteSpanStore(blocker / "events.db", defer=True)  # no error yet
    with pytest.raises(cl.StoreError, match="is a file, not a folder"):
        spans.write_spans(step(1))
    blocker.unlink()
    spans.write_spans(step(1))
    assert len(spans.trace(f"{1:032x}")) == 3


# ----- PostgreSQL ----------------------------------------------------------------------------
def _tables(schema: str) -> set[str]:
    with psycopg.connect(PG_URL) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s",
                            (schema,)).fetchall()
    return {r[0] for r in rows}


def test_postgresql_keeps_a_partition_per_day_and_prune_drops_whole_days(
        pg_url: str, pg_schema: str) -> None:
    day = 86_400 * 10**9
    with cl.open_store(pg_url) as store:
        spans = span_store_for(store)
        for d in range(3):
            spans.write_spans(step(d, start=T0 - d * day))
        days = {t for t in _tables(pg_schema) if t.startswith("spans_")}
        assert len(days) == 3
        # the oldest day whole (dropped), and a trace early in the next (deleted)
        pruned = spans.prune((T0 - day) / 1e9 + 1.0)
        assert (pruned.spans, pruned.traces) == (3 + 3, 2)
        oldest = "spans_" + time.strftime("%Y%m%d", time.gmtime((T0 - 2 * day) // 10**9))
        assert {t for t in _tables(pg_schema) if t.startswith("spans_")} == days - {oldest}
        assert [t.trace_id[-1] for t in spans.traces().traces] == ["0"]


def test_a_writer_makes_a_day_again_that_another_process_pruned(pg_url: str) -> None:
    day = 86_400 * 10**9
    writer = open_backend(pg_url)
    pruner = open_backend(pg_url)
    assert isinstance(writer, SpanBackend) and isinstance(pruner, SpanBackend)
    try:
        mine = writer.span_store()
        mine.write_spans(step(1, start=T0 - 5 * day))  # it knows that day's partition now
        pruner.span_store().prune(T0 / 1e9)
        mine.write_spans(step(2, start=T0 - 5 * day))  # the partition is gone: made again
        assert [t.trace_id[-1] for t in mine.traces().traces] == ["2"]
    finally:
        writer.close()
        pruner.close()


def test_postgresql_stores_text_it_cannot_hold_with_a_replacement_character(
        pg_url: str) -> None:
    odd = StoredSpan(trace_id="ab" * 16, span_id="cd" * 8, parent_id=None, name="nul\x00here",
                     kind=0, start_ns=T0, end_ns=T0 + 1, status=2,
                     status_message="lone \ud800 surrogate",
                     attributes={"closedloop.task_type": "t\x00t"})
    with cl.open_store(pg_url) as store:
        spans = span_store_for(store)
        spans.write_spans([odd])
        (back,) = spans.trace("ab" * 16)
    assert (back.name, back.status_message) == ("nul\ufffdhere", "lone \ufffd surrogate")
    assert back.attributes == {"closedloop.task_type": "t\x00t"}  # JSON text keeps it


def test_a_postgresql_store_of_schema_2_gains_its_span_tables_when_opened(
        pg_url: str, pg_schema: str) -> None:
    with cl.open_store(pg_url):
        pass
    with psycopg.connect(PG_URL, autocommit=True) as conn:  # back to schema version 2
        for table in ("spans", "traces", "scores"):
            conn.execute(f'DROP TABLE "{pg_schema}".{table}')
        conn.execute(f'DELETE FROM "{pg_schema}".schema_version WHERE version > 2')
    assert "spans" not in _tables(pg_schema)
    with cl.open_store(pg_url) as store:
        span_store_for(store).write_spans(step(1))
        assert len(span_store_for(store).traces().traces) == 1


def test_spans_of_a_postgresql_store_unreachable_at_start_up_are_written_once_it_answers(
        pg_url: str) -> None:
    from closedloop.store._registry import DeferredBackend
    from closedloop.store.postgres import open_backend as open_pg

    deferred = DeferredBackend(pg_url, open_pg, create=True,
                               error=cl.StoreError("server down at start-up"))
    spans = deferred.span_store()
    spans.write_spans(step(1))  # the server answers now: the store opens on first use
    assert [t.trace_id for t in spans.traces().traces] == [f"{1:032x}"]
    deferred.close()


def test_the_demo_on_postgresql_records_traces_and_scores_that_report_shows(pg_url: str) -> None:
    demo = invoke("demo", "--requests", "4", "--seed", "3", "--json", "--store", pg_url)
    assert demo.exit_code == 0, demo.output
    listed = json.loads(invoke("traces", "list", "--store", pg_url, "--json").stdout)
    assert len(listed["traces"]) == 4
    assert {t["task_type"] for t in listed["traces"]} == {"ec2.provision"}
    scored = json.loads(invoke("scores", "list", "--store", pg_url, "--json").stdout)
    assert {s["trace_id"] for s in scored} == {t["trace_id"] for t in listed["traces"]}
    report = json.loads(invoke("report", "--store", pg_url, "--json").stdout)
    assert report["scores"][0]["task_type"] == "ec2.provision"
