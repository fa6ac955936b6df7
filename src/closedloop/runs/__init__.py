"""Agents with many steps: runs, guarded tools and compensation.

- :class:`Run` groups the steps of one agent task (``with`` / ``async with``): its id in every
  event and span, budgets (steps, tokens, USD, wall time) enforced before each step, halts,
  rollback of registered compensations, and a :class:`RunRecord` in the store
  (``closedloop runs list|show``, the runs section of ``closedloop report``).
- :func:`halt_run` halts a run from any process (``closedloop runs halt``): a
  :class:`RunHalt` in the store, which the run's process polls.
- :func:`tool` turns a function an agent calls into a closed-loop step: arguments validated
  (errors returned to the model as the tool's result, bounded), the autonomy gate, the action,
  verification (a mismatch returned with its differences, the action rolled back), the event
  and a GenAI ``execute_tool`` span.

See docs/runs.md.
"""

from closedloop._runstate import RunHalt, RunHaltStore, RunPage, RunRecord, RunsSummary, RunStore
from closedloop.runs._run import Run, current_run, halt_run
from closedloop.runs._tool import GuardedTool, ToolCall, ToolFeedback, tool

__all__ = [
    "GuardedTool",
    "Run",
    "RunHalt",
    "RunHaltStore",
    "RunPage",
    "RunRecord",
    "RunStore",
    "RunsSummary",
    "ToolCall",
    "ToolFeedback",
    "current_run",
    "halt_run",
    "tool",
]
