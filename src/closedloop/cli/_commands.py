"""Imports every command module so that each registers itself on ``main``."""
from closedloop.cli import (
    _approvals,  # noqa: F401
    _check,  # noqa: F401
    _control,  # noqa: F401
    _demo,  # noqa: F401
    _report,  # noqa: F401
    _scores,  # noqa: F401
    _serve,  # noqa: F401
    _store,  # noqa: F401
    _traces,  # noqa: F401
)
