"""A user's app for the approval tests and benchmark: one gated loop whose executor appends
what it executed to a log file (``APPROVAL_LOG``), one line per execution.

``closedloop worker --app approval_app:loop`` imports it (from the working directory). With
``APPROVAL_SLOW`` set to a file name, the executor writes that file and then sleeps, so a
test can kill the process while it executes. ``APPROVAL_LEASE`` sets the lease (seconds).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import closedloop as cl
from closedloop.approvals import proposal_digest


def agent(task: dict[str, Any], attempt: cl.Attempt) -> dict[str, Any]:
    return {"action": "launch", "n": task["n"]}


def execute(proposal: dict[str, Any]) -> dict[str, Any]:
    key = cl.current_idempotency_key()
    line = json.dumps({"key": key, "digest": proposal_digest(proposal),
                       "pid": os.getpid()})
    slow = os.environ.get("APPROVAL_SLOW")
    if slow:
        with open(slow, "w", encoding="utf-8") as f:
            f.write(str(os.getpid()))
        time.sleep(3600)
    fd = os.open(os.environ["APPROVAL_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"launched": proposal["n"]}


loop = cl.Loop(agent, task_type="launch", agent_id="launcher", executor=execute,
               autonomy="approve", guards=(),
               approval=cl.ApprovalPolicy(lease=float(os.environ.get("APPROVAL_LEASE", "30"))))
