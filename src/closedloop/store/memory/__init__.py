"""The in-process backend (``memory://``): events, spans, scores and control state in the
process's memory, for tests and for agents that keep nothing. It implements the same ports
as the SQLite and PostgreSQL backends and passes the same contract suite.
"""

from closedloop.store.memory._approvals import MemoryApprovals
from closedloop.store.memory._autonomy import MemoryLevelStore
from closedloop.store.memory._backend import MemoryBackend
from closedloop.store.memory._spans import MemorySpanStore

__all__ = ["MemoryApprovals", "MemoryBackend", "MemoryLevelStore", "MemorySpanStore"]
