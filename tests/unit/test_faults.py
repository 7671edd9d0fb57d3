"""The relay against a fault-injecting upstream (tests/support/faulty.py): whatever the upstream does
wrong, the app hears a reply of the right class, and nothing is reported delivered that was not."""

from __future__ import annotations

from pathlib import Path

from tests.support.faulty import Faults, FaultyUpstream, plain_policy
from tests.support.relay import message, running_relay, submit, write_config


async def test_a_connection_dropped_mid_data_is_a_temporary_failure(config_path: Path) -> None:
    async with FaultyUpstream(Faults(drop_after_data_bytes=2000)) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message(body="line\r\n" * 1000))
    assert outcome.code // 100 == 4, outcome
    assert up.messages == []


async def test_an_upstream_too_slow_to_answer_is_a_temporary_failure(config_path: Path) -> None:
    async with FaultyUpstream(Faults(delays={"MAIL": 3})) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)], "upstream": {"timeoutSeconds": 0.5}})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message())
    assert outcome.code == 451, outcome


async def test_starttls_advertised_then_refused_sends_nothing_in_clear(config_path: Path) -> None:
    async with FaultyUpstream(Faults(starttls_refused=True)) as up:
        policy = plain_policy(up.port, type="PLAIN", user="u", password="secret-pw")
        policy["tls"] = {"mode": "starttls"}
        write_config(config_path, {"policies": [policy]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message())
    assert outcome.code // 100 == 4, outcome
    verbs = [command[:4].upper() for command in up.commands]
    assert b"MAIL" not in verbs and b"AUTH" not in verbs, up.commands


async def test_an_upstream_cap_on_recipients_does_not_defer_for_ever(config_path: Path) -> None:
    rcpts = ["a@example.net", "b@example.net", "c@example.net"]
    async with FaultyUpstream(Faults(max_rcpts=2)) as up:
        limits = {"recipientsPerTransaction": 2}
        write_config(config_path, {"policies": [plain_policy(up.port)], "limits": limits})
        async with running_relay(config_path) as relay:
            first = await submit(relay.port, rcpts, message())
            left = [rcpt for rcpt, (code, _) in first.rcpt_replies.items() if code != 250]
            second = await submit(relay.port, left, message())
    assert first.code == 250 and second.code == 250, (first, second)
    delivered = sorted(rcpt for m in up.messages for rcpt in m.rcpt_tos)
    assert delivered == [rcpt.encode() for rcpt in rcpts]  # each once, none lost
