"""The package version, single-sourced for pyproject and ``closedloop --version``."""

__version__ = "0.1.0"
