"""The SMTP benchmark's own logic: the relay.yaml of each relay row, and the ratios and table it prints
(the runs themselves are `make bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from bench.__main__ import parse, settings_from
from bench.smtp_bench import RELAY_IDLE_TIMEOUT, RelayProcess
from bench.smtp_report import ratios, render
from outbound_relay.config import UpstreamSettings, parse_config
from tests.peers import DovecotSubmission
from tests.peers.certs import TLSFiles


@pytest.fixture
def upstream(tmp_path: Path, tls: TLSFiles) -> DovecotSubmission:
    # Not started: the relay's config needs only its address, a user and the CA; relay_to spares it
    # the RecordingSink it would otherwise create.
    dovecot = DovecotSubmission(tmp_path, tls, relay_to=("127.0.0.1", 25))
    dovecot.tls = tls  # what start() would set
    return dovecot


def test_relay_at_its_defaults_sets_nothing_but_the_policy(
    tmp_path: Path, upstream: DovecotSubmission
) -> None:
    relay = RelayProcess(tmp_path, upstream, pool_size=None, idle_timeout=None)
    config = parse_config(yaml.safe_load(relay.config()))
    [policy] = config.policies
    assert policy.max_connections is None
    assert config.upstream == UpstreamSettings()
    assert policy.gateway is not None and policy.gateway.port == upstream.port


def test_tuned_relay_sets_pool_and_idle_timeout(tmp_path: Path, upstream: DovecotSubmission) -> None:
    config = parse_config(yaml.safe_load(RelayProcess(tmp_path, upstream, pool_size=20).config()))
    assert config.policies[0].max_connections == 20
    assert config.upstream.idle_timeout_seconds == RELAY_IDLE_TIMEOUT


def test_cli_switches_rows_off() -> None:
    assert settings_from(parse([])).postfix_reuse is True
    settings = settings_from(parse(["--quick", "--no-postfix-reuse", "--no-relay-defaults"]))
    assert settings.postfix_reuse is False
    assert settings.relay_defaults is False
    assert settings.rounds == 1


def _row(path: str, delivered: int, seconds: float, error: str | None = None) -> dict[str, Any]:
    return {
        "path": path,
        "messages": delivered,
        "seconds": seconds,
        "delivered": delivered,
        "error": error,
        "upstream_logins": 0,
        "reused": None,
        "rss_peak_mb": None,
        "relay_cpu_ms": None,
        "rate": delivered / seconds,
    }


def _results(**throughput: dict[str, Any] | None) -> dict[str, Any]:
    rows = {"sink_alone": _row("tools alone", 1000, 0.1), **throughput}
    return {
        "mode": "quick",
        "started": "2026-01-01T00:00:00+0000",
        "settings": {"sessions": 20, "size": 2048, "relay_args": []},
        "machine": {"cpus": 2, "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [1.0, 1.0, 1.0]},
        "throughput": {**rows, "rounds": {"ceiling": [rows["ceiling"]], "relay": [rows["relay"]]}},
        "latency": {"rate": 100.0},
        "memory_mb": {"idle": 39.0, "idle_after_load": 41.0, "load_rss_peak": 45.0, "load_hwm": 46.0},
    }


def _cells(table: str, label: str) -> list[str]:
    """The ratio cells of a relay row: its last line in the table, the ratios section's."""
    [*_, line] = (line for line in table.splitlines() if line.startswith(label))
    return line.split()[-3:]


def test_ratios_against_both_postfix_rows_and_the_ceiling() -> None:
    results = _results(
        ceiling=_row("ceiling", 1600, 1.0),
        relay=_row("relay", 2000, 1.0),
        relay_defaults=_row("relay, defaults", 1000, 1.0),
        postfix=_row("postfix", 100, 1.0),
        postfix_reuse=_row("postfix, TLS reuse", 400, 1.0),
    )
    found = ratios(results)
    assert found["relay"] == pytest.approx({"postfix": 20.0, "postfix_reuse": 5.0, "ceiling": 1.25})
    assert found["relay_defaults"] == pytest.approx({"postfix": 10.0, "postfix_reuse": 2.5, "ceiling": 0.625})
    table = render(results)
    assert "(b') Postfix, smtp_tls_connection_reuse" in table
    assert _cells(table, "(a) outbound-relay") == ["20.0x", "5.0x", "125%"]
    assert _cells(table, "(a') outbound-relay") == ["10.0x", "2.5x", "62%"]


def test_a_failed_or_skipped_reference_gives_no_ratio() -> None:
    results = _results(
        ceiling=_row("ceiling", 1600, 1.0),
        relay=_row("relay", 2000, 1.0),
        postfix=_row("postfix", 10, 1.0, error="nothing arrived at the sink for 60 s"),
    )
    assert ratios(results) == {
        "relay": {"postfix": None, "postfix_reuse": None, "ceiling": pytest.approx(1.25)}
    }
    table = render(results)  # results saved before the defaults and reuse rows existed render too
    assert "(a') outbound-relay, relay.yaml defaults" in table and "skipped" in table
    assert "n/a" in table
