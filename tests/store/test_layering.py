"""``store/`` owns every table: the control and telemetry layers reach spans, scores, pauses and
halts through the store's ports, never by opening a database themselves."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "closedloop"
DRIVERS = {"sqlite3", "psycopg", "psycopg_pool"}


@pytest.mark.parametrize("layer", ["control", "telemetry"])
def test_a_layer_outside_the_store_imports_no_database_driver(layer: str) -> None:
    found = []
    for path in sorted((PACKAGE / layer).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.name}: {n}" for n in names if n.split(".")[0] in DRIVERS]
    assert found == []
