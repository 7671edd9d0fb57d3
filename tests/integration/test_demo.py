"""`make demo`, README's first command, runs to the end and shows what it says it shows."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.controlplane import go_missing

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.cluster
@pytest.mark.skipif(go_missing() is not None, reason=str(go_missing()))
def test_demo_runs_end_to_end() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert out.count("-> 250 ") == 6  # three domains, without and with the cluster
    for mechanism in ("LOGIN", "PLAIN", "XOAUTH2"):
        line = rf'auth_attempts_total{{mechanism="{mechanism}",policy="[\w/.-]+",result="success"}} 1.0'
        assert re.search(line, out), mechanism
    assert "domain-bird-com             domain=bird.com             XOAUTH2" in out
    assert "arrived behind Dovecot: 3 message(s)" in out
    assert out.rstrip().endswith("demo succeeded")
    # Passwords from the seed are in play: none may be printed.
    assert "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA" not in out
