"""A halted task type never executes under real faults, and status/resume see what agents see.

Each fault is real: a redis-server of the test's own, killed and restarted empty (never the
shared one's data), a store on a small tmpfs that fills up, and a subprocess whose file
descriptors run out. Each test asserts that the executor was not called while halted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import closedloop as cl
from _doubles import Executor
from closedloop.cli import main
from closedloop.control import (
    CachedLedger,
    FaultControl,
    RedisLedger,
    SQLiteLedger,
    StopKind,
    ledger_for_store,
)

from .conftest import OwnRedis, _unavailable


def _loop(fc: FaultControl, executor: Executor, *, verified: object = True) -> cl.Loop:
    return cl.Loop(lambda task, attempt: task, task_type="provision", max_attempts=1,
                   executor=executor, verifiers=[lambda task, result: verified],
                   guards=[fc], store=None)


def _guard(ledger: object) -> FaultControl:
    return FaultControl(ledger=ledger, sinks=[], halt_after=1, recheck=0.0,  # type: ignore[arg-type]
                        retry_every=3600.0)


@pytest.fixture
def shared(own_redis: OwnRedis, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> tuple[OwnRedis, str]:
    """Agents configured the documented way: ``CLOSEDLOOP_REDIS_URL`` and a store file."""
    monkeypatch.setenv("CLOSEDLOOP_REDIS_URL", own_redis.url)
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    cl.open_store(store_url).close()
    return own_redis, store_url


def _ledger(store_url: str) -> CachedLedger:
    store = cl.open_store(store_url)
    try:
        ledger = ledger_for_store(store)
    finally:
        store.close()
    assert isinstance(ledger, CachedLedger)
    ledger.retry_every = 0.0  # try Redis on every read: no waiting in tests
    return ledger


# ----- Redis -----------------------------------------------------------------------------------

def test_a_halt_holds_while_redis_is_down_and_after_it_restarts_empty(
        shared: tuple[OwnRedis, str], caplog: pytest.LogCaptureFixture) -> None:
    server, store_url = shared
    executor = Executor()
    fc = _guard(_ledger(store_url))
    assert _loop(fc, executor, verified="instance type is wrong").run(1).outcome \
        is cl.Outcome.FAILED
    assert executor.calls == 1
    seen_by_others = RedisLedger(server.url).get("provision")
    assert seen_by_others is not None
    assert seen_by_others.kind is StopKind.HALTED

    server.stop()
    assert _loop(fc, executor).run(2).outcome is cl.Outcome.HALTED
    assert "unreachable" in fc.status()["degraded"]
    assert server.url in fc.status()["ledger"]
    # never silent: the warning says where control state went
    assert f"Redis at {server.url} unreachable" in caplog.text
    assert "events.db" in caplog.text
    restarted_agent = _guard(_ledger(store_url))
    assert _loop(restarted_agent, executor).run(3).outcome is cl.Outcome.HALTED

    server.start()  # no persistence: Redis comes back empty
    assert _loop(restarted_agent, executor).run(4).outcome is cl.Outcome.HALTED
    assert executor.calls == 1
    refilled = RedisLedger(server.url).get("provision")
    assert refilled is not None
    assert refilled.kind is StopKind.HALTED


def test_status_and_resume_see_the_halts_agents_raise(shared: tuple[OwnRedis, str]) -> None:
    server, store_url = shared
    executor = Executor()
    fc = _guard(_ledger(store_url))
    _loop(fc, executor, verified=False).run(1)
    runner = CliRunner()
    status = runner.invoke(main, ["status", "--store", store_url, "--json"])
    assert status.exit_code == 0, status.output
    data = json.loads(status.output)
    assert [(s["task_type"], s["kind"]) for s in data["stops"]] == [("provision", "halted")]
    assert server.url in data["source"]

    server.stop()  # during the incident Redis is gone: the store still shows and lifts it
    down = runner.invoke(main, ["status", "--store", store_url, "--json"])
    assert down.exit_code == 0, down.output
    assert [s["task_type"] for s in json.loads(down.output)["stops"]] == ["provision"]
    assert "unreachable" in json.loads(down.output)["degraded"]
    refused = runner.invoke(main, ["resume", "provision", "--reason", "fixed",
                                   "--store", store_url])
    assert refused.exit_code == 1
    assert len(refused.output.strip().splitlines()) == 1
    assert "Redis" in refused.output
    assert _loop(fc, executor).run(2).outcome is cl.Outcome.HALTED

    server.start()
    resumed = runner.invoke(main, ["resume", "provision", "--reason", "AMI fixed",
                                   "--by", "alice", "--store", store_url])
    assert resumed.exit_code == 0, resumed.output
    assert _loop(fc, executor).run(3).outcome is cl.Outcome.SUCCEEDED
    assert executor.calls == 2
    after = json.loads(runner.invoke(main, ["status", "--store", store_url, "--json"]).output)
    assert after["stops"] == []
    assert (after["history"][0]["event"], after["history"][0]["by"]) == ("resumed", "alice")


def test_status_history_shows_each_stop_and_resume_once(shared: tuple[OwnRedis, str]) -> None:
    _, store_url = shared
    _loop(_guard(_ledger(store_url)), Executor(), verified=False).run(1)
    runner = CliRunner()
    resumed = runner.invoke(main, ["resume", "provision", "--reason", "fixed", "--by", "bob",
                                   "--store", store_url])
    assert resumed.exit_code == 0, resumed.output
    status = json.loads(runner.invoke(main, ["status", "--store", store_url, "--json"]).output)
    assert [h["event"] for h in status["history"]] == ["resumed", "halted"]


def test_a_halt_on_one_machine_stops_another_and_a_resume_anywhere_lifts_both(
        own_redis: OwnRedis, tmp_path: Path) -> None:
    def ledger(name: str) -> CachedLedger:
        store = cl.open_store(tmp_path / name / "events.db")
        found = ledger_for_store(store, redis_url=own_redis.url)
        store.close()
        assert isinstance(found, CachedLedger)
        found.retry_every = 0.0
        return found

    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cl.open_store(tmp_path / name / "events.db").close()
    url_b = f"sqlite:///{tmp_path / 'b' / 'events.db'}"
    executor = Executor()
    fc_a, fc_b = _guard(ledger("a")), _guard(ledger("b"))
    _loop(fc_a, executor, verified=False).run(1)
    assert _loop(fc_b, executor).run(2).outcome is cl.Outcome.HALTED

    own_redis.stop()  # machine b keeps the halt it saw, also in an agent started now
    assert _loop(fc_b, executor).run(3).outcome is cl.Outcome.HALTED
    assert _loop(_guard(ledger("b")), executor).run(4).outcome is cl.Outcome.HALTED
    own_redis.start()

    result = CliRunner().invoke(main, ["resume", "provision", "--reason", "fixed on b",
                                       "--store", url_b, "--redis", own_redis.url])
    assert result.exit_code == 0, result.output
    assert _loop(fc_a, executor).run(5).outcome is cl.Outcome.SUCCEEDED
    assert SQLiteLedger(tmp_path / "a" / "events.db").get("provision") is None
    assert executor.calls == 2


def test_an_unreachable_or_malformed_redis_url_is_one_line(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    cl.open_store(store_url).close()
    runner = CliRunner()
    bad = runner.invoke(main, ["status", "--store", store_url, "--redis", "redis://:x:y:z"])
    assert bad.exit_code == 2
    assert len(bad.output.strip().splitlines()) == 1
    assert "Redis URL" in bad.output
    gone = runner.invoke(main, ["resume", "provision", "--reason", "x", "--store", store_url,
                                "--redis", "redis://127.0.0.1:1/0"])
    assert gone.exit_code == 1
    assert len(gone.output.strip().splitlines()) == 1
    assert "cannot reach control state in Redis at redis://127.0.0.1:1/0" in gone.output


# ----- a full disk -----------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs of the test's own (needs root, as in CI and the dev container)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        _unavailable(f"cannot mount a tmpfs for the disk-full test: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb", buffering=0) as f, pytest.raises(OSError, match="No space left"):  # noqa: PT012 - fill until ENOSPC
        while True:
            f.write(b"\0" * 65536)
    return filler


def test_a_halt_raised_on_a_full_disk_holds_and_is_stored_when_space_returns(
        small_disk: Path) -> None:
    store = cl.open_store(small_disk / "events.db")
    try:
        fc = _guard(ledger_for_store(store))
        fc.recheck = 3600.0  # read once before the disk fills, so the failing step runs
        executor = Executor()
        assert _loop(fc, executor).run(0).outcome is cl.Outcome.SUCCEEDED
        filler = _fill(small_disk)
        _loop(fc, executor, verified=False).run(1)
        assert [s["kind"] for s in fc.status()["unsaved"]] == ["halted"]
        for i in range(3):
            assert _loop(fc, executor).run(2 + i).outcome is cl.Outcome.HALTED
        assert not fc.flush_pending()
        assert executor.calls == 2

        filler.unlink()
        assert fc.flush_pending()
        restarted = _guard(ledger_for_store(store))
        assert _loop(restarted, executor).run(9).outcome is cl.Outcome.HALTED
        assert executor.calls == 2
    finally:
        store.close()


def test_a_halt_that_cannot_be_stored_still_reaches_other_machines(
        small_disk: Path, own_redis: OwnRedis, tmp_path: Path) -> None:
    full = cl.open_store(small_disk / "events.db")
    other = cl.open_store(tmp_path / "other.db")
    try:
        here = _guard(ledger_for_store(full, redis_url=own_redis.url))
        here.recheck = 3600.0  # read once before the disk fills, so the failing step runs
        there = _guard(ledger_for_store(other, redis_url=own_redis.url))
        executor = Executor()
        assert _loop(here, executor).run(0).outcome is cl.Outcome.SUCCEEDED
        _fill(small_disk)
        _loop(here, executor, verified=False).run(1)
        assert [s["kind"] for s in here.status()["unsaved"]] == ["halted"]
        assert _loop(there, executor).run(2).outcome is cl.Outcome.HALTED
        assert executor.calls == 2
    finally:
        full.close()
        other.close()


def test_a_stored_halt_holds_when_the_disk_fills_up(small_disk: Path) -> None:
    store = cl.open_store(small_disk / "events.db")
    try:
        executor = Executor()
        fc = _guard(ledger_for_store(store))
        _loop(fc, executor, verified=False).run(1)
        _fill(small_disk)
        assert _loop(fc, executor).run(2).outcome is cl.Outcome.HALTED
        # a process started on the full disk cannot read the halt: it refuses, too
        restarted = _guard(ledger_for_store(store))
        outcome = _loop(restarted, executor).run(3).outcome
        assert outcome in {cl.Outcome.HALTED, cl.Outcome.CONTROL_UNAVAILABLE}
        assert executor.calls == 1
    finally:
        store.close()


# ----- no file descriptors left ---------------------------------------------------------------

_EXHAUST = textwrap.dedent("""
    import errno, json, os, resource, sys
    import closedloop as cl
    from closedloop.control import FaultControl, SQLiteLedger

    db = sys.argv[1]
    calls = []

    def guard():
        return FaultControl(ledger=SQLiteLedger(db), sinks=[], recheck=0.0, halt_after=1,
                            retry_every=3600.0)

    def run(fc, task_type, n, verified=True):
        loop = cl.Loop(lambda t, a: t, task_type=task_type, max_attempts=1, store=None,
                       executor=lambda p: calls.append((task_type, p)),
                       verifiers=[lambda t, r: verified], guards=[fc])
        return loop.run(n).outcome.value

    known, fresh, deploy = guard(), guard(), guard()
    deploy.recheck = 3600.0  # read once before the descriptors run out
    out = {"before": run(known, "provision", 1), "deploy_before": run(deploy, "deploy", 0)}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(64, hard), hard))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError as exc:
        out["emfile"] = exc.errno == errno.EMFILE
    out["known"] = run(known, "provision", 2)
    out["fresh"] = run(fresh, "provision", 3)
    out["deploy_fails"] = run(deploy, "deploy", 4, verified=False)
    out["deploy_after"] = run(deploy, "deploy", 5)
    out["deploy_unsaved"] = len(deploy.status()["unsaved"])
    for fd in held:
        os.close(fd)
    out["deploy_stored"] = deploy.flush_pending()
    out["fresh_after"] = run(fresh, "provision", 6)
    out["calls"] = calls
    print(json.dumps(out))
""")


def test_a_halt_holds_when_file_descriptors_run_out(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    cl.open_store(db).close()
    halted = _guard(SQLiteLedger(db))
    _loop(halted, Executor(), verified=False).run(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _EXHAUST, str(db)], capture_output=True,
                          text=True, timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["emfile"]
    assert out["before"] == "halted"
    assert out["known"] == "halted"  # read before: stays in force
    assert out["fresh"] == "control_unavailable"  # never read: refused, not run
    assert out["deploy_fails"] == "failed"
    assert out["deploy_after"] == "halted"  # raised while it could not be stored
    assert out["deploy_unsaved"] == 1
    assert out["deploy_stored"] is True
    assert out["fresh_after"] == "halted"
    assert out["calls"] == [["deploy", 0], ["deploy", 4]]
    stored = SQLiteLedger(db).get("deploy")
    assert stored is not None
    assert stored.kind is StopKind.HALTED



def test_a_redis_password_is_never_printed(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                           caplog: pytest.LogCaptureFixture) -> None:
    store_url = f"sqlite:///{tmp_path / 'events.db'}"
    cl.open_store(store_url).close()
    url = "redis://:hunter2@127.0.0.1:1/0"
    runner = CliRunner()
    status = runner.invoke(main, ["status", "--store", store_url, "--redis", url, "--json"])
    resume = runner.invoke(main, ["resume", "provision", "--reason", "x", "--store", store_url,
                                  "--redis", url])
    bad = runner.invoke(main, ["status", "--store", store_url, "--redis", "redis://:hunter2@h:x"])
    assert status.exit_code == 0, status.output
    assert ":***@127.0.0.1:1/0" in json.loads(status.output)["source"]
    assert (resume.exit_code, bad.exit_code) == (1, 2)
    for text in (status.output, resume.output, bad.output, caplog.text, *capfd.readouterr()):
        assert "hunter2" not in text


def test_agents_starting_again_do_not_repeat_a_stop_in_the_shared_history(
        shared: tuple[OwnRedis, str]) -> None:
    server, store_url = shared
    _loop(_guard(_ledger(store_url)), Executor(), verified=False).run(1)
    for _ in range(3):  # each new agent process puts the store's stops back into Redis
        assert _loop(_guard(_ledger(store_url)), Executor()).run(2).outcome \
            is cl.Outcome.HALTED
    assert [h["event"] for h in RedisLedger(server.url).history()] == ["halted"]
