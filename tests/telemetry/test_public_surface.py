"""The telemetry and integrations packages' ``__all__`` is sorted and complete."""

from __future__ import annotations

from types import ModuleType

import pytest

from closedloop import integrations, telemetry


@pytest.mark.parametrize("package", [telemetry, integrations])
def test_all_is_sorted_and_complete(package: ModuleType) -> None:
    public = {name for name in dir(package)  # dir(): members are imported on first use
              if not name.startswith("_") and not isinstance(getattr(package, name), ModuleType)
              and name not in ("annotations", "TYPE_CHECKING", "Any")}
    assert package.__all__ == sorted(package.__all__)
    assert set(package.__all__) == public
