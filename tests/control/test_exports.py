"""The control package's public surface is sorted and complete."""

from __future__ import annotations

from closedloop import control


def test_all_is_sorted_and_names_only_real_members() -> None:
    assert control.__all__ == sorted(control.__all__, key=lambda n: (not n.isupper(), n))
    for name in control.__all__:
        assert hasattr(control, name), name


def test_every_public_member_is_exported() -> None:
    public = {n for n in vars(control) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(control.__all__)
