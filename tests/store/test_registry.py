"""The scheme registry: which backend a URL opens, and how a package adds one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import closedloop as cl
from closedloop.store import (
    EventBackend,
    EventQuery,
    MemoryBackend,
    SQLiteBackend,
    _registry,
    open_backend,
    register_scheme,
)

from .test_contract import SRC, event


@pytest.fixture
def restore_registry() -> Iterator[None]:
    saved = dict(_registry._factories)
    yield
    _registry._factories.clear()
    _registry._factories.update(saved)


def test_builtin_schemes_open_their_backends(tmp_path: Path) -> None:
    assert isinstance(open_backend("memory://"), MemoryBackend)
    sqlite = open_backend(f"sqlite:///{tmp_path / 'e.db'}")
    assert isinstance(sqlite, SQLiteBackend) and sqlite.path == tmp_path / "e.db"


def test_an_unknown_scheme_names_the_known_ones_and_the_extra() -> None:
    with pytest.raises(cl.ConfigError) as caught:
        cl.open_store("mysql://user:s3cret@db/x")
    message = str(caught.value)
    assert "scheme 'mysql'" in message
    assert "known schemes: memory, postgres, postgresql, sqlite" in message
    assert "pip install 'closedloop[postgres]'" in message
    assert "'closedloop.stores' entry point group" in message
    assert "s3cret" not in message and "user:***@db" in message
    assert len(message.splitlines()) == 1


def test_a_registered_scheme_serves_open_store(restore_registry: None) -> None:
    opened: list[tuple[str, bool]] = []

    def factory(url: str, *, create: bool) -> EventBackend:
        opened.append((url, create))
        return MemoryBackend()

    register_scheme("Mine", factory)
    with cl.open_store("mine://somewhere") as store:
        assert isinstance(store.backend, MemoryBackend)
    cl.open_store("mine://else", create=False).close()
    assert opened == [("mine://somewhere", True), ("mine://else", False)]


def test_a_factory_named_by_import_path_is_imported_on_first_use(
    restore_registry: None,
) -> None:
    register_scheme("byname", "closedloop.store.memory:MemoryBackend")
    with pytest.raises(TypeError):  # MemoryBackend takes no URL: the path was resolved
        open_backend("byname://")
    register_scheme("missing", "closedloop_no_such_module:factory")
    with pytest.raises(cl.ConfigError, match="cannot import its backend"):
        open_backend("missing://")


PLUGIN = '''
from closedloop.store import MemoryBackend

class PluginBackend(MemoryBackend):
    def __init__(self, url, create):
        super().__init__()
        self.url = url
        self.create = create

def open_backend(url, *, create):
    return PluginBackend(url, create)
'''

USE_PLUGIN = """
    import closedloop as cl
    from closedloop.store import _registry
    assert "plug" not in _registry.known_schemes()
    with cl.open_store("memory://"):
        pass
    assert not _registry._entry_points_loaded  # known schemes never scan packages
    with cl.open_store("plug://x") as store:
        print(type(store.backend).__name__, store.url, store.backend.create)
"""


def test_an_installed_package_adds_a_scheme_through_an_entry_point(tmp_path: Path) -> None:
    site = tmp_path / "site"
    dist = site / "closedloop_plug-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "closedloop_plug.py").write_text(PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: closedloop-plug\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[closedloop.stores]\nplug = closedloop_plug:open_backend\n")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(USE_PLUGIN)],
        env={"PYTHONPATH": f"{SRC}{os.pathsep}{site}", "PATH": os.environ.get("PATH", "")},
        capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "PluginBackend plug://x True"


def test_a_deferred_store_holds_events_until_its_backend_opens(
    restore_registry: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))  # a dead letter would go there
    attempts: list[int] = []
    inner = MemoryBackend()

    def flaky(url: str, *, create: bool) -> EventBackend:
        attempts.append(1)
        if len(attempts) < 3:
            raise cl.StoreError("cannot open store flaky://: server starting")
        return inner

    register_scheme("flaky", flaky)
    with pytest.raises(cl.StoreError, match="server starting"):
        cl.open_store("flaky://")  # without defer, opening fails
    store = cl.open_store("flaky://", defer=True)
    try:
        store.record(event(1))
        store.record(event(2))
        assert store.flush(timeout=30)
        assert list(inner.iter_events(EventQuery())) == [event(1), event(2)]
        assert len(attempts) == 3
    finally:
        store.close()
