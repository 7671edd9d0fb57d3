"""Metrics as Prometheus reads them: documented names, bounded labels, `promtool check metrics` clean."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from outbound_relay.metrics import RelayMetrics
from tests.peers.certs import TLSFiles
from tests.support.promtool import promtool
from tests.support.relay import message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream

CONTRACT = {
    "outbound_relay_messages_total": {"result"},
    "outbound_relay_auth_attempts_total": {"mechanism", "result", "policy"},
    "outbound_relay_auth_duration_seconds_bucket": {"policy", "le"},
    "outbound_relay_delivery_duration_seconds_bucket": {"le"},
    "outbound_relay_upstream_connections": {"state"},
    "outbound_relay_config_reloads_total": {"result"},
    "outbound_relay_hook_errors_total": {"kind"},
    "outbound_relay_oauth2_token_requests_total": {"result"},
    "outbound_relay_oauth2_token_expiry_seconds": set(),
    "outbound_relay_config_info": {"generation"},
    "outbound_relay_config_revision_info": {"revision"},
    "outbound_relay_build_info": {"version", "python"},
    "process_resident_memory_bytes": set(),
    "process_cpu_seconds_total": set(),
    "python_info": {"implementation", "major", "minor", "patchlevel", "version"},
}


def samples(text: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = re.match(r"^(\w+)(?:\{(.*)\})? ", line)
        if match and not line.startswith("#"):
            labels = {pair.split("=")[0] for pair in match.group(2).split(",")} if match.group(2) else set()
            found.setdefault(match.group(1), set()).update(labels)
    return found


async def test_metrics_after_traffic_pass_promtool(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "pw"}) as up:
        write_config(
            config_path,
            {"revision": "7",
             "policies": [{"name": "mail/p", "type": "PLAIN", "user": "u", "password": "pw",
                           "gateway": {"host": "127.0.0.1", "port": up.port},
                           "tls": {"caFile": str(tls.ca_file)}}]},
        )  # fmt: skip
        async with running_relay(config_path) as relay:
            for i in range(3):
                assert (await submit(relay.port, [f"user{i}@example.com"], message())).code == 250
            text = relay.metrics.render().decode()
    check = subprocess.run(  # noqa: ASYNC221 - the relay is stopped by now
        [promtool(), "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout + check.stderr == ""  # no lint warnings either
    found = samples(text)
    for name, labels in CONTRACT.items():
        assert found.get(name) == labels, (name, found.get(name))
    # No addresses or users in any label value; the policy's name is bounded by the config.
    assert "example.com" not in text
    assert '"u"' not in text
    assert (
        'outbound_relay_auth_attempts_total{mechanism="PLAIN",policy="mail/p",result="success"} 1.0' in text
    )
    assert 'outbound_relay_config_revision_info{revision="7"} 1.0' in text
    assert float(re.findall(r"^process_resident_memory_bytes (\S+)$", text, re.M)[0]) > 10e6


def test_config_revision_follows_the_config_and_is_absent_without_one() -> None:
    metrics = RelayMetrics()
    metrics.set_generation("aaa", "3")
    metrics.set_generation("bbb", "4")
    text = metrics.render().decode()
    assert 'outbound_relay_config_revision_info{revision="4"} 1.0' in text
    assert 'revision="3"' not in text
    metrics.set_generation("ccc")  # a hand-written relay.yaml: no revision, no series
    assert "outbound_relay_config_revision_info{" not in metrics.render().decode()


def test_two_relays_in_one_process_each_export_process_metrics() -> None:
    texts = [RelayMetrics().render().decode() for _ in range(2)]
    for text in texts:
        assert "process_open_fds" in text
        assert 'outbound_relay_build_info{python="' in text and 'version="0.' in text


def test_config_info_keeps_one_generation() -> None:
    metrics = RelayMetrics()
    metrics.set_generation("aaa")
    metrics.set_generation("bbb")
    text = metrics.render().decode()
    assert 'outbound_relay_config_info{generation="bbb"} 1.0' in text
    assert 'generation="aaa"' not in text
