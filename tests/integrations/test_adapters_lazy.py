"""Importing closedloop (and its integrations) never imports an agent framework."""

from __future__ import annotations

import subprocess
import sys

FRAMEWORKS = ("pydantic_ai", "agents", "langgraph", "langchain_core")


def test_importing_the_integrations_imports_no_framework() -> None:
    code = ("import sys, closedloop, closedloop.integrations as i; "
            "names = dir(i); "
            f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_an_adapter_is_imported_on_first_use() -> None:
    from closedloop import integrations

    assert "pydantic_ai_tool" in dir(integrations)
    assert callable(integrations.pydantic_ai_tool)
