"""The guide's examples run as written: docs/validators.md is executed block by block."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).parent.parent.parent / "docs" / "validators.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_guide_has_examples() -> None:
    assert len(python_blocks(GUIDE.read_text())) >= 3


def test_the_guide_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the verifier example writes a file
    namespace: dict[str, object] = {"__name__": "guide"}
    for n, block in enumerate(python_blocks(GUIDE.read_text()), 1):
        exec(compile(block, f"{GUIDE.name}[block {n}]", "exec"), namespace)
    assert (tmp_path / "deployed.json").exists()
