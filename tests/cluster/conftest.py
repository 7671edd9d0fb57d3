"""Fixtures for tests/cluster come from tests/cluster/plugin.py (see there for the list).

tests/conftest.py registers that plugin for the whole suite (`pytest_plugins = ["tests.cluster.plugin"]`),
so tests/operator and the Helm tests get the same fixtures. Registering it here as well keeps
`pytest tests/cluster` self-contained; pytest ignores a plugin that is already registered.
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.import_plugin("tests.cluster.plugin")
