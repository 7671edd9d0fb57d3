"""Suite-wide fixtures: the real control plane (tests/cluster/plugin.py) is available to every directory.

Hypothesis profiles: the default (100 examples a property) for `make test` and CI; `fuzz`, for
`make fuzz`, runs the parser and wire-format properties far longer (HYPOTHESIS_PROFILE=fuzz)."""

import os

from hypothesis import settings

pytest_plugins = ["tests.cluster.plugin"]

settings.register_profile("fuzz", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
