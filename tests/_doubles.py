"""Test doubles shared by several test modules."""

from __future__ import annotations


class Executor:
    """The action under guard; counts how often it ran."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, proposal: object) -> object:
        self.calls += 1
        return proposal
