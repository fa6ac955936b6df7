"""The InfluxDB sink, against a real InfluxDB 1.x (and a local server for the /api/v2 wire
format, which Debian's 1.6 does not have): what lands, counts, outages and recovery."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from prometheus_client import CollectorRegistry

import closedloop as cl
from closedloop.store import SinkStats
from closedloop.telemetry import InfluxSink, Metrics

from .conftest import OwnInfluxd
from .test_line_protocol import make_event

pytestmark = pytest.mark.requires("influxd")

SECRET = "sk-proj-" + "A1b2C3d4E5f6G7h8I9j0" * 2


def _agent(x: int, attempt: cl.Attempt) -> dict[str, int]:
    attempt.record_usage(1000, 200, cached_input_tokens=100, model="gpt-4o-2024-08-06",
                         provider="openai")
    if x % 5 == 4:
        raise RuntimeError(f"provider said no for key {SECRET} at step {x}")
    return {"x": x}


def _wait(predicate: Any, what: str, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit} s: {what}")
        time.sleep(0.02)


def test_configure_sends_every_step_with_its_tags_fields_and_redacted_text(
        influxd: OwnInfluxd, db: str) -> None:
    rt = cl.configure(store="memory://", influxdb=influxd.url(db))
    loop = cl.Loop(_agent, task_type="plan", agent_id="planner", agent_version="v2",
                   prompt_version="p7", labels={"tier": "gold"})
    for i in range(20):
        with contextlib.suppress(RuntimeError):
            loop.run(i)
    assert rt.flush(30)
    assert rt.store.sink_stats() == {"influxdb": SinkStats(
        written=20, queued=0, held=0, dropped=0, rejected=0, failures=0)}
    rows = influxd.rows(db, "SELECT * FROM closedloop_step")
    assert len(rows) == 20
    ok = [r for r in rows if r["outcome"] == "succeeded"]
    bad = [r for r in rows if r["outcome"] == "error"]
    assert len(ok) == 16 and len(bad) == 4
    first = ok[0]
    assert (first["task_type"], first["agent"], first["agent_version"], first["prompt_version"],
            first["label_tier"], first["model"], first["provider"]) == (
        "plan", "planner", "v2", "p7", "gold", "gpt-4o-2024-08-06", "openai")
    assert (first["succeeded"], first["attempts"], first["input_tokens"],
            first["output_tokens"], first["cached_input_tokens"]) == (1, 1, 1000, 200, 100)
    assert first["cost_usd"] == pytest.approx((900 * 2.5 + 100 * 1.25 + 200 * 10) / 1e6)
    assert first["error_type"] is None and first["error_message"] is None
    assert all(r["error_type"] == "agent" and r["succeeded"] == 0 for r in bad)
    assert all(SECRET not in r["error_message"] and "provider said no" in r["error_message"]
               for r in bad)
    # the step's own time, and one point per step even when steps share a microsecond
    stored = {e.step_id: e for e in rt.store.events()}
    assert {r["step_id"] for r in rows} == set(stored)


def test_influxql_answers_the_designs_questions(influxd: OwnInfluxd, db: str) -> None:
    cl.configure(store="memory://", influxdb=influxd.url(db))
    for task, steps in (("plan", 10), ("apply", 5)):
        loop = cl.Loop(_agent, task_type=task)
        for i in range(steps):
            with contextlib.suppress(RuntimeError):
                loop.run(i)
    assert cl.current_runtime().flush(30)
    success = {r["task_type"]: r for r in influxd.rows(
        db, 'SELECT mean("succeeded") AS success_rate, count("succeeded") AS steps '
            'FROM "closedloop_step" GROUP BY "task_type"')}
    assert success["plan"]["success_rate"] == 0.8 and success["plan"]["steps"] == 10
    assert success["apply"]["success_rate"] == 0.8 and success["apply"]["steps"] == 5
    per_success = {r["task_type"]: r["cost_per_success"] for r in influxd.rows(
        db, 'SELECT sum("cost_usd") / sum("succeeded") AS cost_per_success '
            'FROM "closedloop_step" GROUP BY "task_type"')}
    assert per_success["plan"] == pytest.approx(10 * 0.004375 / 8)


def test_a_wrong_password_is_refused_counted_and_not_retried(influxd: OwnInfluxd,
                                                            db: str) -> None:
    url = influxd.url(db).replace("cl-test-pw", "wrong")
    sink = InfluxSink(url, flush_interval=60)
    sink.submit_many([make_event(step_id=str(i)) for i in range(3)])
    assert sink.flush(30)
    sink.close()
    assert sink.stats() == SinkStats(written=0, queued=0, held=0, dropped=0, rejected=3,
                                     failures=0)
    assert influxd.query(db, "SELECT * FROM closedloop_step") == []


def test_a_missing_database_is_refused_with_the_fix_in_the_log(
        influxd: OwnInfluxd, caplog: pytest.LogCaptureFixture) -> None:
    sink = InfluxSink(influxd.url("no_such_db"), flush_interval=60)
    sink.submit_many([make_event()])
    assert sink.flush(30)
    sink.close()
    assert sink.stats().rejected == 1
    assert "CREATE DATABASE" in caplog.text and "cl-test-pw" not in caplog.text


def test_an_outage_holds_points_tries_once_per_delay_and_recovers(own_influxd: OwnInfluxd,
                                                                  ) -> None:
    db = own_influxd.create_db()
    sink = InfluxSink(own_influxd.url(db), flush_interval=60, retry_delays=(3600.0,),
                      timeout=2.0)
    sink.submit_many([make_event(step_id="before")])
    assert sink.flush(30)
    own_influxd.stop()
    for i in range(5):  # five batches while the server is down: one request, not five
        sink.submit_many([make_event(step_id=f"down-{i}", ts=1_700_000_001.0 + i)])
        assert not sink.flush(30)
    assert sink.stats() == SinkStats(written=1, queued=0, held=5, dropped=0, rejected=0,
                                     failures=1)
    own_influxd.start()
    sink._retry_at = 0.0  # the hour is up
    assert sink.flush(30)
    assert sink.stats() == SinkStats(written=6, queued=0, held=0, dropped=0, rejected=0,
                                     failures=1)
    sink.close()
    assert {r["step_id"] for r in own_influxd.rows(db, "SELECT * FROM closedloop_step")} == {
        "before", *(f"down-{i}" for i in range(5))}


def test_what_an_outage_holds_is_bounded_and_what_remains_at_close_is_counted(
        tmp_path: Path) -> None:
    sink = InfluxSink("http://127.0.0.1:9/?db=x", flush_interval=60, max_held=10,
                      retry_delays=(3600.0,), timeout=1.0)
    sink.submit_many([make_event(step_id=str(i)) for i in range(25)])
    assert not sink.flush(30)
    assert sink.stats() == SinkStats(written=0, queued=0, held=10, dropped=15, rejected=0,
                                     failures=1)
    sink.close()
    assert sink.stats() == SinkStats(written=0, queued=0, held=0, dropped=25, rejected=0,
                                     failures=2)
    assert not sink.submit_many([make_event()])  # closed: dropped and counted
    assert sink.stats().dropped == 26


def test_sink_counts_are_prometheus_metrics(influxd: OwnInfluxd, db: str) -> None:
    store = cl.open_store("memory://")
    good = InfluxSink(influxd.url(db), flush_interval=60)
    store.add_sink(good)
    registry = CollectorRegistry()
    Metrics(registry).watch(store=store)
    store.record(make_event())
    assert store.flush(10) and good.flush(30)
    value = registry.get_sample_value
    assert value("closedloop_sink_events_written_total", {"sink": "influxdb"}) == 1
    assert value("closedloop_sink_events_not_written_total",
                 {"sink": "influxdb", "reason": "dropped"}) == 0
    bad = InfluxSink(influxd.url(db).replace("cl-test-pw", "nope"), flush_interval=60)
    store.remove_sink(good)
    store.add_sink(bad)
    store.record(make_event())
    assert store.flush(10) and bad.flush(30)
    assert value("closedloop_sink_events_not_written_total",
                 {"sink": "influxdb", "reason": "rejected"}) == 1
    store.close()
    good.close()
    bad.close()


class _DiskFull:
    """A backend whose disk is full: every write fails, as SQLite's would."""

    url = "test://full"

    def write_batch(self, events: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    def iter_events(self, query: Any) -> Iterator[cl.StepEvent]:
        return iter(())

    def count(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_the_store_hands_events_over_even_while_it_cannot_write(influxd: OwnInfluxd,
                                                               db: str) -> None:
    store = cl.Store(_DiskFull())
    sink = InfluxSink(influxd.url(db), flush_interval=60)
    store.add_sink(sink)
    store.record(make_event(step_id="while-down"))
    assert not store.flush(10)
    assert store.stats().held == 1
    assert sink.flush(30)
    assert [r["step_id"] for r in influxd.rows(db, "SELECT * FROM closedloop_step")] == [
        "while-down"]
    sink.close()
    store.remove_sink(sink)
    store.close(1)


# ---- the /api/v2 wire format -----------------------------------------------------------------

class V2Server:
    """Answers each write with the next scripted status, keeping each request."""

    def __init__(self) -> None:
        self.statuses: deque[tuple[int, dict[str, str]]] = deque()
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str], str]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = urlsplit(self.path)
                owner.requests.append((parts.path, parse_qs(parts.query), dict(self.headers),
                                       body.decode()))
                status, headers = owner.statuses.popleft() if owner.statuses else (204, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def v2() -> Iterator[V2Server]:
    server = V2Server()
    yield server
    server.close()


def test_v2_writes_to_the_bucket_with_the_token(v2: V2Server) -> None:
    sink = InfluxSink(v2.url + "/?bucket=steps&org=acme", token="tok-123", flush_interval=60)
    assert sink.api == "v2"
    sink.submit_many([make_event(), make_event(step_id="s2")])
    assert sink.flush(10)
    sink.close()
    [(path, params, headers, body)] = v2.requests
    assert path == "/api/v2/write"
    assert params == {"bucket": ["steps"], "org": ["acme"], "precision": ["ns"]}
    assert headers["Authorization"] == "Token tok-123"
    lines = body.splitlines()
    assert len(lines) == 2 and all(line.startswith("closedloop_step,") for line in lines)
    # microseconds, then the counter that keeps two steps of one microsecond apart
    assert lines[0].endswith(" 1700000000123456001") and lines[1].endswith(
        " 1700000000123456002")


def test_v2_honours_retry_after_and_retries_a_5xx(v2: V2Server) -> None:
    v2.statuses.extend([(429, {"Retry-After": "120"})])
    sink = InfluxSink(v2.url, bucket="b", org="o", token="t", flush_interval=60,
                      retry_delays=(0.01,), precision="ms")
    sink.submit_many([make_event()])
    assert not sink.flush(10)
    assert sink._retry_at - time.monotonic() > 100  # told to wait two minutes: waits
    sink._retry_at = 0.0  # the two minutes are up
    v2.statuses.append((503, {}))
    assert not sink.flush(10)
    _wait(lambda: sink.flush(10), "the retry after a 503")
    sink.close()
    assert sink.stats() == SinkStats(written=1, queued=0, held=0, dropped=0, rejected=0,
                                     failures=2)
    assert [r[1]["precision"] for r in v2.requests] == [["ms"]] * 3
    assert v2.requests[-1][3].endswith(" 1700000000123\n")


@pytest.mark.parametrize(("url", "settings", "message"), [
    ("", {}, "URL is empty"),
    ("ftp://x", {"db": "d"}, "http(s)://HOST"),
    ("http://h:99999", {"db": "d"}, "bad port"),
    ("http://h:8086", {}, "needs a database"),
    ("http://h:8086", {"api": "v2"}, "needs a bucket"),
    ("http://h:8086?db=d", {"precision": "minutes"}, "precision"),
])
def test_bad_settings_are_one_line_config_errors(url: str, settings: dict[str, Any],
                                                 message: str) -> None:
    with pytest.raises(cl.ConfigError, match="InfluxDB") as err:
        InfluxSink(url, **settings)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_environment_configures_the_runtimes_sink(influxd: OwnInfluxd, db: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOSEDLOOP_INFLUXDB_URL", f"http://127.0.0.1:{influxd.port}")
    monkeypatch.setenv("CLOSEDLOOP_INFLUXDB_DB", db)
    monkeypatch.setenv("CLOSEDLOOP_INFLUXDB_USERNAME", "admin")
    monkeypatch.setenv("CLOSEDLOOP_INFLUXDB_PASSWORD", "cl-test-pw")
    rt = cl.reset()
    cl.Loop(lambda x, a: x, task_type="env").run(1)
    [sink] = rt.sinks
    assert isinstance(sink, InfluxSink) and sink.db == db
    assert rt.flush(30)
    assert influxd.rows(db, "SELECT count(succeeded) FROM closedloop_step")[0]["count"] == 1


def test_configure_without_influxdb_sends_nowhere_and_rejects_a_non_sink() -> None:
    rt = cl.configure(store="memory://")
    assert rt.sinks == ()
    with pytest.raises(cl.ConfigError, match="influxdb must be"):
        cl.configure(influxdb=42)  # type: ignore[arg-type]


def test_flushing_every_queue_at_once_reaches_the_sinks_too(v2: V2Server) -> None:
    """What SIGTERM does (``flush_all``): the store's last events reach its sink and are
    sent, though the sink's own queue was empty when the flush began."""
    from closedloop._batching import flush_all

    store = cl.open_store("memory://", flush_interval=60)
    sink = InfluxSink(v2.url, bucket="b", flush_interval=60)
    store.add_sink(sink)
    for i in range(3):
        store.record(make_event(step_id=str(i)))
    assert flush_all(10)
    assert sink.stats().written == 3
    store.close()
    sink.close()


def test_a_forked_child_starts_with_nothing_held_and_its_own_counts(v2: V2Server) -> None:
    import os

    v2.statuses.append((503, {}))
    sink = InfluxSink(v2.url, bucket="b", flush_interval=60, retry_delays=(3600.0,))
    sink.submit_many([make_event()])
    assert not sink.flush(10) and sink.stats().held == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports what it inherited, then leaves without cleanup
        st = sink.stats()
        os.write(write, f"{st.held},{st.failures},{st.written}".encode())
        os._exit(0)
    os.close(write)
    assert os.read(read, 100).decode() == "0,0,0"
    os.close(read)
    os.waitpid(pid, 0)
    assert sink.stats().held == 1  # the parent still holds its own
    sink._retry_at = 0.0
    assert sink.flush(10)
    sink.close()


def test_replacing_the_runtime_sends_what_its_sink_had_and_closes_it(v2: V2Server) -> None:
    store = cl.open_store("memory://")
    first = cl.configure(store=store, influxdb=f"{v2.url}/?bucket=b")
    [sink] = first.sinks
    assert list(store.sinks) == [sink]
    cl.Loop(lambda x, a: x, task_type="t").run(1)
    cl.configure(store=store)  # the same store, no InfluxDB any more
    assert list(store.sinks) == []
    assert isinstance(sink, InfluxSink) and sink.stats().written == 1
    assert not sink.submit_many([make_event()])  # closed
    assert len(v2.requests) == 1
    store.close()


def test_a_sink_given_to_two_runtimes_in_turn_stays_attached(v2: V2Server) -> None:
    store = cl.open_store("memory://")
    sink = InfluxSink(v2.url, bucket="b", flush_interval=60)
    cl.configure(store=store, influxdb=sink)
    cl.configure(store=store, influxdb=sink)
    assert list(store.sinks) == [sink]
    cl.Loop(lambda x, a: x, task_type="t").run(1)
    assert cl.current_runtime().flush(10)
    assert sink.stats().written == 1
    cl.reset()
    sink.close()
    store.close()


def test_a_bad_url_is_shown_without_its_password() -> None:
    with pytest.raises(cl.ConfigError) as err:
        InfluxSink("http://writer:s3cret@host:99999/?db=x")
    assert "s3cr" not in str(err.value) and "writer" in str(err.value)
