"""The top-level package's public surface is curated: ``__all__`` is sorted and complete."""

from __future__ import annotations

from types import ModuleType

import closedloop as cl

INCLUDED_PRIVATE_MEMBERS = {"__version__"}


def test_all_is_sorted() -> None:
    assert cl.__all__ == sorted(cl.__all__)


def test_every_public_name_is_exported() -> None:
    # dir(), not vars(): the members are imported on first use (closedloop._lazy)
    public = {
        name
        for name in dir(cl)
        if (not name.startswith("_") or name in INCLUDED_PRIVATE_MEMBERS)
        and not isinstance(getattr(cl, name), ModuleType)  # subpackages: by attribute
    }
    assert set(cl.__all__) == public


def test_every_exported_name_exists() -> None:
    assert [name for name in cl.__all__ if not hasattr(cl, name)] == []


def test_the_loop_exports_its_stage_actions_for_observers() -> None:
    # third-party tracers and gates switch on these types; they must not need a private import
    from closedloop import loop

    assert {"Act", "Action", "Admit", "Approve", "Propose", "Validate", "Verify"} <= set(
        loop.__all__)
    assert all(hasattr(loop, name) for name in loop.__all__)
