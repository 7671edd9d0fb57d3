"""Envelopes a real client (swaks) sends that the relay must answer at the right command: a non-ASCII
address without SMTPUTF8 is refused at MAIL or RCPT with 553 5.6.7 (RFC 6531 3.5), never accepted and
then failed at DATA; an error that would repeat on retry is a 5xx. (With SMTPUTF8, see test_delivery.py:
relayed when the upstream offers it, refused for good with 553 5.6.7 when it does not.)"""

from __future__ import annotations

from pathlib import Path

from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, running_relay, write_config
from tests.support.swaks import swaks
from tests.support.upstream import AuthUpstream


async def test_non_ascii_recipient_without_smtputf8_is_refused_at_rcpt(
    tls: TLSFiles, config_path: Path
) -> None:
    async with AuthUpstream(tls, users={"u": "p"}, smtputf8=True) as up:
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            run = await swaks(relay.port, "--to", "ü@sparkpost.com")
    code, text = run.reply_to("RCPT")
    assert code == 553, run.transcript
    assert text.startswith("5.6.7 ") and "SMTPUTF8" in text, run.transcript
    assert not any(code == 451 for code, _ in run.replies), run.transcript
    assert up.received == []


async def test_non_ascii_sender_without_smtputf8_is_refused_at_mail(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "p"}, smtputf8=True) as up:
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            run = await swaks(relay.port, "--to", "a@sparkpost.com", "--from", "jörg@example.org")
    code, text = run.reply_to("MAIL")
    assert code == 553, run.transcript
    assert text.startswith("5.6.7 "), run.transcript
    assert up.received == []
