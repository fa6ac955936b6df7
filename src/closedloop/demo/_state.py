"""The approve demo's EC2 between processes: moto's state in a file, and the demo's worker.

``closedloop demo --autonomy approve`` leaves its requests waiting in the store; a person
approves them later and ``closedloop worker --app closedloop.demo:worker`` executes them, in
another process. The simulated EC2 must outlive the demo's process as a real one would, so
the demo keeps moto's EC2 state in a file next to the store (:func:`state_path_for`:
``DB.ec2`` for ``sqlite:///DB``, or ``$CLOSEDLOOP_DEMO_EC2``), and every execution of the
worker loads it, acts, and writes it back under an exclusive file lock
(:class:`PersistedExecutor`): two workers see one EC2.

The file is a pickle of moto's objects, written by the demo for the demo (mode 0600,
replaced atomically): load only a file your own demo wrote.
"""

from __future__ import annotations

import atexit
import os
import pickle
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from closedloop._errors import ConfigError
from closedloop.demo._ec2 import Action, DemoEnvironment, Ec2Executor
from closedloop.loop import Attempt, Loop

STATE_ENV = "CLOSEDLOOP_DEMO_EC2"
"""A path for the demo's EC2 state file, overriding the one next to a SQLite store."""
_FORMAT = "closedloop-demo-ec2/1"


def state_path_for(store_url: str) -> Path | None:
    """Where the demo keeps its EC2 state for the store at ``store_url``: ``$CLOSEDLOOP_DEMO_EC2``
    if set, else ``DB.ec2`` next to a SQLite file; None for any other store."""
    given = os.environ.get(STATE_ENV)
    if given:
        return Path(given)
    if store_url.startswith("sqlite:///"):
        path = store_url[len("sqlite:///"):].split("?", 1)[0]
        if path and path != ":memory:":
            return Path(path + ".ec2")
    return None


class Ec2State:
    """moto's EC2 state and the demo's environment, in the file at ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state's exclusive lock (a ``.lock`` file next to it)."""
        import fcntl

        fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def save(self, env: DemoEnvironment) -> None:
        """Write this process's moto EC2 state and ``env`` (atomically)."""
        from moto.backends import get_backend

        data = pickle.dumps({"format": _FORMAT, "env": asdict(env),
                             "ec2": dict(get_backend("ec2"))})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load(self) -> DemoEnvironment:
        """Replace this process's moto EC2 state with the file's; the demo's environment."""
        from moto.backends import get_backend

        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            raise ConfigError(f"no demo EC2 state at {self.path}: run `closedloop demo "
                              "--autonomy approve --store sqlite:///PATH` first") from None
        data: Any = pickle.loads(raw)  # noqa: S301 - the demo's own file, see the module doc
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ConfigError(f"{self.path} is not a closedloop demo EC2 state file")
        live = get_backend("ec2")
        live.clear()
        live.update(data["ec2"])
        env = data["env"]
        return DemoEnvironment(vpc_id=env["vpc_id"], subnet_id=env["subnet_id"],
                               security_groups=dict(env["security_groups"]),
                               production_instance_ids=tuple(env["production_instance_ids"]))


class PersistedExecutor:
    """The demo's executor over EC2 kept in a file: under the state's lock, load it, apply the
    plan (:class:`~closedloop.demo.Ec2Executor`, idempotent per approval request), write it
    back."""

    name = "ec2"

    def __init__(self, state: Ec2State, client: Any) -> None:
        self._state = state
        self._client = client

    def __call__(self, proposal: str) -> Action:
        with self._state.locked():
            env = self._state.load()
            action = Ec2Executor(self._client, env)(proposal)
            self._state.save(env)
        return action


def _proposes_nothing(task: object, attempt: Attempt) -> str:
    raise RuntimeError("the demo's worker executes approved plans; it proposes none")


def worker() -> Loop:
    """The demo's loop for ``closedloop worker --app closedloop.demo:worker``: it executes the
    approved requests of ``closedloop demo --autonomy approve`` against the demo's EC2 (kept in
    the file next to the store the worker is given with ``--store``) and verifies them."""
    from closedloop.demo._ec2 import InstanceMatchesRequest, LocalEc2
    from closedloop.demo._plan import destructive_plan, plan_schema
    from closedloop.demo._run import AGENT_ID, TASK_TYPE
    from closedloop.store import default_store

    store = default_store()
    path = state_path_for(store.url)
    if path is None:
        raise ConfigError(f"the demo's EC2 state has no place next to {store.url}: set "
                          f"{STATE_ENV}=PATH, as for the demo")
    state = Ec2State(path)
    with state.locked():
        env = state.load()
    ec2 = LocalEc2()
    ec2.start()
    atexit.register(ec2.stop)
    return Loop(_proposes_nothing, task_type=TASK_TYPE, agent_id=AGENT_ID,
                validators=[plan_schema], risk_rules=[destructive_plan],
                executor=PersistedExecutor(state, ec2.client),
                verifiers=[InstanceMatchesRequest(ec2.client, env)], autonomy="approve",
                store=store)
