"""Suite-wide fixtures: the real control plane (tests/cluster/plugin.py) is available to every directory."""

pytest_plugins = ["tests.cluster.plugin"]
