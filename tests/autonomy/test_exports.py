"""The autonomy and learn packages' public surfaces are sorted and complete, and cheap to
import: the loop imports ``closedloop.autonomy`` on every start-up."""

from __future__ import annotations

import os
import subprocess
import sys
from types import ModuleType

import pytest

from closedloop import autonomy, learn


@pytest.mark.parametrize("package", [autonomy, learn])
def test_all_is_sorted_and_names_only_real_members(package: ModuleType) -> None:
    names = package.__all__
    assert names == sorted(names, key=lambda n: (not n.isupper(), n))
    assert [n for n in names if not hasattr(package, n)] == []


def test_importing_the_loop_imports_no_level_machinery() -> None:
    code = ("import sys, closedloop.loop, closedloop.autonomy, closedloop.learn; "
            "print(sorted(m for m in sys.modules if m.startswith(('closedloop.autonomy.', "
            "'closedloop.learn.', 'closedloop._autonomy_state'))))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this tree's closedloop
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env=env)
    assert done.stdout.strip() == "[]"
