"""Running external checkers (ruff, terraform) with a deadline and bounded output.

Output goes to anonymous temporary files, not pipes, so a chatty program can neither fill a
pipe and stall nor make us hold more than ``max_output`` bytes of it in memory. On timeout the
whole process group is killed and :class:`~closedloop.validate.CheckTimeout` is raised.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from closedloop._errors import CheckTimeout, ConfigError
from closedloop._verdict import Issue, Severity, Verdict

IfMissing = Literal["skip", "unknown"]


@dataclass(frozen=True, slots=True)
class ToolOutput:
    """What an external checker printed (each stream cut at ``max_output`` bytes)."""

    returncode: int
    stdout: str
    stderr: str
    truncated: bool


def find_binary(candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` found on ``PATH`` (or an existing path), else ``None``."""
    for name in candidates:
        if os.sep in name and Path(name).is_file():
            return name
        found = shutil.which(name)
        if found:
            return found
    return None


def missing(what: str, policy: IfMissing, check: str) -> Verdict:
    """The verdict when a checker's binary is absent: a recorded skip, or unknown (blocks)."""
    reason = f"{what} not found on PATH; the check did not run"
    if policy == "unknown":
        return Verdict.cannot_tell(reason, check=check)
    return Verdict.ok(Issue(code="skipped", message=reason, severity=Severity.WARNING),
                      check=check)


def check_policy(policy: str) -> IfMissing:
    """Validate an ``if_missing`` option."""
    if policy not in ("skip", "unknown"):
        raise ConfigError(f"if_missing must be 'skip' or 'unknown', got {policy!r}")
    return "skip" if policy == "skip" else "unknown"


def _read(stream: IO[bytes], limit: int) -> tuple[str, bool]:
    stream.seek(0)
    data = stream.read(limit + 1)
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def run_tool(
    argv: Sequence[str],
    *,
    timeout: float,
    max_output: int,
    cwd: str | Path | None = None,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ToolOutput:
    """Run ``argv`` to completion within ``timeout`` seconds, capturing bounded output."""
    full_env = None if env is None else {**os.environ, **env}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(  # noqa: S603 - a fixed argv (no shell), the binary is ours
            list(argv), cwd=cwd, env=full_env, stdout=out, stderr=err,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.communicate(stdin.encode() if stdin is not None else None, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise CheckTimeout(
                f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} did not finish "
                f"within {timeout:g} s and was killed"
            ) from None
        stdout, cut_out = _read(out, max_output)
        stderr, cut_err = _read(err, max_output)
    return ToolOutput(proc.returncode, stdout, stderr, cut_out or cut_err)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited just now
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
