"""Prometheus' promtool (Debian package prometheus, which hack/setup installs)."""

from __future__ import annotations

import os
import shutil

import pytest


def promtool() -> str:
    """The path of promtool; fails under CI (`CI=true`) when it is missing, else skips."""
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool missing (Debian package prometheus); hack/setup installs it")
        pytest.skip("promtool missing (Debian package prometheus); run hack/setup")
    return found
