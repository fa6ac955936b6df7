"""Lazy re-exports (PEP 562): a package names its public members without importing them.

``import closedloop`` and ``closedloop --version`` stay fast, and optional backends (redis,
opentelemetry, prometheus_client, boto3, jsonschema, sqlglot) are imported only when a name
that needs them is first used. A package lists, per private module, the names it re-exports;
the first access imports that one module and caches the value on the package, so later
accesses are plain attribute reads. Static type checkers read the package's
``if TYPE_CHECKING:`` imports instead, so a misspelt name is still an error for them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(
    package: str, modules: Mapping[str, Sequence[str]]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, from ``{module: (name, ...)}``.

    ``module`` is relative to ``package`` (``"._redis"``). Besides the listed names, an
    attribute that names a subpackage or submodule (``closedloop.control``) imports it, as if
    the package had imported it eagerly.
    """
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            if name.startswith("_"):
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            try:
                return importlib.import_module(f"{package}.{name}")
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":  # the submodule exists, its import failed
                    raise
                raise AttributeError(
                    f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(module, package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return __getattr__, __dir__
