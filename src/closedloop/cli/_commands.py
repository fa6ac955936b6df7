"""Imports every command module so that each registers itself on ``main``."""
from closedloop.cli import _report  # noqa: F401
