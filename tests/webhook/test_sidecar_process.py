"""The injected sidecar's command line, run as the kubelet would run it: the real `outbound-relay serve` with
exactly the args the webhook injects (only the config path moved to a temporary directory).

Catches what a pure look at the patch cannot: flags the relay does not know, a probe port the relay does not
listen on (relay.metricsPort other than relay.yaml's), and a Pod whose namespace has no rendered Secret yet.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from outbound_operator.injection import CONFIG_FILE, InjectionSettings, sidecar_container
from tests.support.process import terminate
from tests.webhook.conftest import free_port

RELAY = Path(sys.executable).parent / "outbound-relay"
LISTEN_PORT = 2525  # where the sidecar listens (127.0.0.1) until relay.yaml says otherwise


def _metrics_up(port: int, path: str = "/metrics") -> bool:
    """What the sidecar's probes do: GET /metrics (startup, readiness) or /healthz (liveness) on the
    relay-metrics port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@pytest.fixture
def run_sidecar(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        terminate(proc, 10)


def _start(settings: InjectionSettings, config: Path, log: Path) -> subprocess.Popen[bytes]:
    container = sidecar_container(settings)
    args = [str(config) if arg == CONFIG_FILE else arg for arg in container["args"]]
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(RELAY), *args], stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )


def _wait(check: object, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 20) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise AssertionError(
                f"the sidecar exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s:\n{log.read_text(errors='replace')}")
        time.sleep(0.1)


def test_sidecar_serves_probes_on_the_configured_port_without_a_config(
    tmp_path: Path, run_sidecar: list[subprocess.Popen[bytes]]
) -> None:
    """relay.metricsPort != 9425, and a namespace with no rendered Secret: the startup probe still passes
    (the Pod starts instead of failing its probe or waiting in ContainerCreating), and the relay picks
    the config up once the kubelet projects it."""
    metrics_port = free_port()
    settings = InjectionSettings(metrics_port=metrics_port)
    config = tmp_path / "relay.yaml"  # not there yet: the optional Secret source projects nothing
    log = tmp_path / "relay.log"
    proc = _start(settings, config, log)
    run_sidecar.append(proc)
    _wait(lambda: _metrics_up(metrics_port), proc, log, "the startup probe on the configured port")
    assert _metrics_up(metrics_port, "/healthz"), "the liveness probe passes too"

    # Meanwhile every transaction is deferred (the app retries later), not refused for good.
    assert _first_refusal() == 451

    # The Secret appears (the operator rendered the namespace's first policy); relay.yaml says nothing of
    # the metrics port, as the operator renders it: the flag keeps the probes where they are.
    config.write_text(yaml.safe_dump({"policies": []}))
    _wait(lambda: _reloads(metrics_port) >= 1, proc, log, "the relay to load relay.yaml once it appears")
    assert _metrics_up(metrics_port)


def _reloads(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0.0
    for line in text.splitlines():
        if line.startswith('outbound_relay_config_reloads_total{result="success"}'):
            return float(line.split()[-1])
    return 0.0


def _first_refusal() -> int:
    """The code of the first non-2xx reply to a transaction on the sidecar's loopback listener."""
    with smtplib.SMTP("127.0.0.1", LISTEN_PORT, timeout=5) as smtp:
        smtp.ehlo("app")
        code, _ = smtp.mail("app@example.org")
        if code >= 300:
            return code
        code, _ = smtp.rcpt("someone@example.com")
        if code >= 300:
            return code
        code, _ = smtp.data(b"Subject: hi\r\n\r\nHi.\r\n")
        return code
