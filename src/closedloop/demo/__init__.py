"""``closedloop demo``: the design's provisioning story, end to end, on this machine.

An infrastructure agent backed by a seeded simulated LLM (:class:`SimulatedModel`) proposes
EC2 provisioning plans for seeded requests; a :class:`~closedloop.Loop` validates them
(:func:`plan_schema`, :func:`no_destructive_actions`), executes them with real boto3 against a
local EC2 API (moto, :class:`LocalEc2`), and verifies the launched instances against the
requests (:class:`InstanceMatchesRequest`). With ``autonomy="approve"`` every plan waits as a
durable approval request (destructive ones marked by :func:`destructive_plan`), and
``closedloop worker --app closedloop.demo:worker`` (:func:`worker`) executes the approved ones
against the demo's EC2, kept in a file between processes (:class:`Ec2State`). The model's
:class:`FaultLedger` is the ground truth to check the recorded events against. Needs the
extra: ``pip install 'closedloop[demo]'`` (only :func:`run_demo` and the boto3/pydantic parts
need it; the model is pure Python).

The migrations scenario (``closedloop demo --scenario migrations``, docs/demo.md):
:class:`MigrationModel`, a seeded schema-migration agent with a :class:`MigrationLedger` of
its injected faults, and :func:`run_migrations_demo`, which runs each of its tasks as a
:class:`~closedloop.Run` of guarded steps on a real PostgreSQL, in a schema of its own.
Needs ``pip install 'closedloop[postgres,validators]'``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from closedloop._errors import ConfigError as _ConfigError
from closedloop.demo._migmodel import (
    MigrationLedger,
    MigrationModel,
    MigrationRates,
    MigrationTask,
    generate_tasks,
)
from closedloop.demo._model import (
    FaultCategory,
    FaultKind,
    FaultLedger,
    FaultRates,
    LedgerEntry,
    ProvisionRequest,
    SimulatedModel,
    expected_result,
    generate_requests,
)
from closedloop.demo._run import (
    AGENT_ID,
    AUTONOMY_LEVELS,
    TASK_TYPE,
    DemoSummary,
    Waiting,
    require_demo_extras,
    run_demo,
)
from closedloop.demo._run import INSTALL_HINT as _INSTALL_HINT

if TYPE_CHECKING:
    from closedloop.demo._ec2 import (
        REQUEST_TAG,
        Action,
        DemoEnvironment,
        Ec2Executor,
        InstanceMatchesRequest,
        LocalEc2,
    )
    from closedloop.demo._migrations import MigrationSummary, run_migrations_demo
    from closedloop.demo._plan import (
        destructive_plan,
        no_destructive_actions,
        plan_schema,
        required_tags,
    )
    from closedloop.demo._state import Ec2State, PersistedExecutor, state_path_for, worker

__all__ = [
    "AGENT_ID",
    "AUTONOMY_LEVELS",
    "REQUEST_TAG",
    "TASK_TYPE",
    "Action",
    "DemoEnvironment",
    "DemoSummary",
    "Ec2Executor",
    "Ec2State",
    "FaultCategory",
    "FaultKind",
    "FaultLedger",
    "FaultRates",
    "InstanceMatchesRequest",
    "LedgerEntry",
    "LocalEc2",
    "MigrationLedger",
    "MigrationModel",
    "MigrationRates",
    "MigrationSummary",
    "MigrationTask",
    "PersistedExecutor",
    "ProvisionRequest",
    "SimulatedModel",
    "Waiting",
    "destructive_plan",
    "expected_result",
    "generate_requests",
    "generate_tasks",
    "no_destructive_actions",
    "plan_schema",
    "require_demo_extras",
    "required_tags",
    "run_demo",
    "run_migrations_demo",
    "state_path_for",
    "worker",
]

if not TYPE_CHECKING:  # type checkers read the imports above; at run time, import on use
    from closedloop._lazy import lazy_exports as _lazy_exports

    _import_on_use, __dir__ = _lazy_exports(__name__, {
        "._ec2": ("REQUEST_TAG", "Action", "DemoEnvironment", "Ec2Executor",
                  "InstanceMatchesRequest", "LocalEc2"),
        "._plan": ("destructive_plan", "no_destructive_actions", "plan_schema",
                   "required_tags"),
        "._state": ("Ec2State", "PersistedExecutor", "state_path_for", "worker"),
        "._migrations": ("MigrationSummary", "run_migrations_demo"),
    })

    def __getattr__(name: str) -> Any:
        # boto3, moto and pydantic are an optional extra: import their parts only when asked
        # for, and only what that part needs (the plan validators need pydantic, not boto3)
        try:
            return _import_on_use(name)
        except ImportError as exc:
            raise _ConfigError(f"closedloop.demo.{name} needs {exc.name or exc}: "
                               f"{_INSTALL_HINT}") from None
