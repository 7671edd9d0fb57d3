"""Envelopes a real client (swaks) sends that the relay must answer at the right command: a non-ASCII
address without SMTPUTF8 is refused at MAIL or RCPT with 553 5.6.7 (RFC 6531 3.5), never accepted and
then failed at DATA; an error that would repeat on retry is a 5xx. (With SMTPUTF8, see test_delivery.py:
relayed when the upstream offers it, refused for good with 553 5.6.7 when it does not.)"""

from __future__ import annotations

from pathlib import Path

from aiosmtpd.smtp import Envelope
from hypothesis import given, settings
from hypothesis import strategies as st

from outbound_relay.delivery import _unsendable
from outbound_relay.session import envelope_path
from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, message, running_relay, submit, write_config
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


@settings(max_examples=300, deadline=None)
@given(
    local=st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
    domain=st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
    smtp_utf8=st.booleans(),
)
def test_an_address_accepted_at_rcpt_can_always_be_sent_upstream(
    local: str, domain: str, smtp_utf8: bool
) -> None:
    """Whatever passes the RCPT checks must encode for the upstream's MAIL/RCPT as one command line: a
    failure there would come at DATA, after 250 to RCPT, and repeat on every retry; a control character
    would end or garble the command."""
    address = f"{local}@{domain}"
    envelope = Envelope()
    envelope.smtp_utf8 = smtp_utf8
    refusal = _unsendable(address, envelope)
    if refusal is not None:
        assert refusal.startswith(("553 5.6.7 ", "553 5.1.3 "))
        return
    encoded = envelope_path(address, smtp_utf8)
    assert encoded.startswith(b"<") and encoded.endswith(b">")
    assert not any(byte < 0x20 or byte == 0x7F for byte in encoded), encoded


async def test_a_bounce_with_the_null_sender_is_relayed(tls: TLSFiles, config_path: Path) -> None:
    """MAIL FROM:<> (RFC 5321 4.5.5) reaches the upstream as the null sender, not as a failure at DATA."""
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["a@example.com"], message(), mail_from="")
    assert outcome.code == 250, outcome
    assert up.received[0].mail_from == "<>"  # how the aiosmtpd upstream records MAIL FROM:<>


@given(raw=st.binary(min_size=1, max_size=20).filter(lambda b: not _is_utf8(b)))
def test_an_address_that_is_not_utf8_is_refused_even_with_smtputf8(raw: bytes) -> None:
    """aiosmtpd decodes such bytes with surrogateescape; they must be refused at MAIL or RCPT (RFC 6531
    asks for UTF-8), so that no hook, log line or upstream command ever gets a lone surrogate."""
    envelope = Envelope()
    envelope.smtp_utf8 = True
    address = raw.decode("utf-8", "surrogateescape") + "@example.com"
    refusal = _unsendable(address, envelope)
    assert refusal is not None and refusal.startswith("553 "), refusal


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
