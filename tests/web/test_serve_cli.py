"""``closedloop serve`` as a command: what it needs installed, what it refuses, and that it
still stops as before (SIGTERM 0) with the app running in its thread."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import closedloop as cl

_BLOCK = ("import sys; sys.modules.update(dict.fromkeys({modules!r})); "
          "from closedloop.cli import main; main(prog_name='closedloop')")


def _db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    return url


def _without(modules: tuple[str, ...], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _BLOCK.format(modules=modules), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("module", ["starlette", "uvicorn"])
def test_the_api_without_its_extra_names_it_in_one_line(tmp_path: Path, module: str) -> None:
    proc = _without((module,), "serve", "--api", "--port", "0", "--store", _db(tmp_path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert err.count("\n") == 1, err
    assert "needs the 'api' extra: pip install 'closedloop[api]'" in err


def test_without_the_extra_serve_still_serves_metrics_on_loopback(tmp_path: Path) -> None:
    proc = _without(("starlette",), "serve", "--port", "0", "--store", _db(tmp_path))
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)/metrics", first)
        assert match, first
        assert "approvals API" not in first
        answer = httpx.get(match.group(0), timeout=10, trust_env=False)
        assert answer.status_code == 200 and b"closedloop" in answer.content
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and rest == ""


def test_without_the_extra_a_token_cannot_be_honoured(tmp_path: Path) -> None:
    proc = _without(("uvicorn",), "serve", "--port", "0", "--token", "t" * 32,
                    "--store", _db(tmp_path))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "'api' extra" in err and "t" * 32 not in err


def test_no_metrics_and_no_api_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "closedloop", "serve", "--no-metrics",
                           "--no-api", "--store", _db(tmp_path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 2 and "nothing to serve" in done.stderr


def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "closedloop", "serve", "--port",
                               str(port), "--store", _db(tmp_path)], capture_output=True,
                              text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in done.stderr


def test_the_listening_socket_lets_asyncio_turn_nagle_off() -> None:
    # asyncio disables Nagle's algorithm only on IPPROTO_TCP sockets; without it a response
    # (head, then body) waits for the client's delayed ACK (bench/approvals_http.py)
    import socket

    from closedloop.web import bind

    sock = bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()
