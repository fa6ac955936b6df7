"""The curl examples of docs/approvals.md ("HTTP API and notifications"), run as written by
bash against a real ``closedloop serve``: each ```sh block must exit 0 and print what its
``# prints:`` line says, and the store must show their effect afterwards."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

import closedloop as cl
from closedloop.approvals import approvals_for

from .conftest import TOKEN, make_request, start_serve, stored

DOC = Path(__file__).resolve().parents[2] / "docs" / "approvals.md"
pytestmark = pytest.mark.slow


def _blocks() -> list[str]:
    text = DOC.read_text()
    section = text.split("## HTTP API and notifications", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_examples() -> None:
    blocks = _blocks()
    assert len(blocks) >= 8
    assert all("# prints:" in b for b in blocks)


def test_the_curl_examples_work_as_written(tmp_path: Path) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed (apt-get install curl)"
    url = f"sqlite:///{tmp_path / 'agents.db'}"
    cl.open_store(url).close()
    ids = {"ID": make_request(url).request_id, "ID2": make_request(url).request_id,
           "MINE": make_request(url, requested_by="deploy-bot@build-7").request_id,
           "EXPIRED": make_request(url, created=time.time() - 120, expires_in=60).request_id,
           "CRASHED": make_request(url).request_id}
    with cl.open_store(url) as store:
        approvals = approvals_for(store)
        approvals.decide(ids["CRASHED"], approve=True, by="bob")
        assert approvals.claim(ids["CRASHED"], by="worker", lease_s=1.0) is not None
        approvals.reap(now=time.time() + 60)
    served = start_serve(url)
    try:
        env = {**os.environ, **ids, "CLOSEDLOOP_URL": served.url,
               "CLOSEDLOOP_API_TOKEN": TOKEN, "NO_PROXY": "127.0.0.1"}
        for block in _blocks():
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], env=env,
                                  capture_output=True, text=True, timeout=60, check=False)
            assert done.returncode == 0, (block, done.stderr)
            for expected in re.findall(r"# prints: (.+)", block):
                assert expected.strip() in done.stdout, (block, done.stdout)
    finally:
        assert served.stop() == 0
    assert stored(url, ids["ID"]).status.value == "approved"
    rejected = stored(url, ids["ID2"])
    assert (rejected.status.value, rejected.revise) == ("rejected", True)
    assert stored(url, ids["MINE"]).status.value == "pending"
    assert stored(url, ids["EXPIRED"]).status.value == "expired"
    assert stored(url, ids["CRASHED"]).status.value == "approved"
