"""Per-recipient outcomes against Postfix (docs/delivery.md, "Recipients the upstream refuses"): Postfix
refuses one recipient for good (550) and one for now (450) and accepts a third. In pass-through mode the
app hears each refusal at its RCPT and the third recipient gets the message; when the route waits for the
content, the app hears 250, the third recipient gets the message and the sender a DSN naming the other
two. Delivery is counted behind Postfix, at its sink."""

from __future__ import annotations

import email
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import PostfixSubmission, TLSFiles
from tests.peers.common import require_binaries
from tests.peers.postfix import POSTFIX_BINARIES
from tests.support.relay import message, raw_session, running_relay, submit, write_config

pytestmark = pytest.mark.integration

GONE, BUSY = "gone@refusing.test", "busy@refusing.test"


@pytest.fixture(scope="module")
def refusing_postfix(peer_workdir: Path, ca: TLSFiles) -> Iterator[PostfixSubmission]:
    require_binaries("Postfix with Cyrus SASL (postfix, sasl2-bin)", *POSTFIX_BINARIES)
    access = {GONE: "550 5.1.1 No such user here", BUSY: "450 4.2.2 Mailbox busy, try later"}
    with PostfixSubmission(peer_workdir, ca, recipient_access=access) as peer:
        yield peer


def _policies(postfix: PostfixSubmission, ca: TLSFiles, *, content_dependent: bool) -> list[dict[str, Any]]:
    policies: list[dict[str, Any]] = [
        {"name": "it/postfix", "gateway": {"host": postfix.host, "port": postfix.port},
         "tls": {"caFile": str(ca.ca_file)}, "type": "PLAIN", "user": "alice",
         "password": postfix.users["alice"]},
    ]  # fmt: skip
    if content_dependent:  # a binding with credentials of its own: the route waits for the header
        policies.append({"name": "it/bulk", "scope": {"binding": "bulk"}, "user": "bob",
                         "password": postfix.users["bob"]})  # fmt: skip
    return policies


def _accepted() -> str:
    return f"ok-{uuid.uuid4().hex[:12]}@refusing.test"


async def test_pass_through_each_recipient_hears_postfix(
    refusing_postfix: PostfixSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "relay.yaml", {"policies": _policies(refusing_postfix, ca, content_dependent=False)}
    )
    ok = _accepted()
    async with running_relay(config) as relay:
        outcome = await submit(relay.port, [ok, GONE, BUSY], message(subject="pass-through"))
    assert outcome.rcpt_replies[ok][0] == 250, outcome
    assert outcome.rcpt_replies[GONE][0] == 550 and "5.1.1" in outcome.rcpt_replies[GONE][1], outcome
    assert outcome.rcpt_replies[BUSY][0] == 450 and "4.2.2" in outcome.rcpt_replies[BUSY][1], outcome
    assert outcome.code == 250 and outcome.relay_id is not None, outcome
    [arrived] = refusing_postfix.sink.wait_for(1, rcpt=ok, timeout=30)
    assert arrived.rcpt_tos == (ok,)
    assert b"Subject: pass-through" in arrived.content


async def test_content_dependent_delivers_to_the_accepted_and_sends_the_sender_a_dsn(
    refusing_postfix: PostfixSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "relay.yaml", {"policies": _policies(refusing_postfix, ca, content_dependent=True)}
    )
    ok, sender = _accepted(), f"app-{uuid.uuid4().hex[:8]}@sender.test"
    async with running_relay(config) as relay:
        outcome = await submit(relay.port, [ok, GONE], message(subject="content-dependent"), mail_from=sender)
        metrics = relay.metrics.render().decode()
    assert [code for code, _ in outcome.rcpt_replies.values()] == [250, 250], outcome
    assert outcome.code == 250 and "refused 1 of 2 recipients" in outcome.reply[1], outcome
    [arrived] = refusing_postfix.sink.wait_for(1, rcpt=ok, timeout=30)
    assert arrived.rcpt_tos == (ok,)
    [dsn] = refusing_postfix.sink.wait_for(1, rcpt=sender, timeout=30)
    assert dsn.mail_from in ("", "<>")
    report = email.message_from_bytes(dsn.content)
    assert report.get_content_type() == "multipart/report", dsn.content[:500]
    text = dsn.content.decode("ascii", "replace")
    assert f"Final-Recipient: rfc822;{GONE}" in text and "Status: 5.1.1" in text
    assert "Subject: content-dependent" in text
    assert 'outbound_relay_dsn_total{result="sent"} 1.0' in metrics
    # Nobody got it twice: the refused recipient got nothing, the accepted one one copy.
    assert refusing_postfix.sink.messages_to(GONE) == []


async def test_content_dependent_a_recipient_postfix_defers_holds_back_the_message(
    refusing_postfix: PostfixSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    """Postfix's 450 stays a 4xx for the app, and nobody gets the message (the retry gives no copy twice)."""
    config = write_config(
        tmp_path / "relay.yaml", {"policies": _policies(refusing_postfix, ca, content_dependent=True)}
    )
    ok, later = _accepted(), _accepted()
    async with running_relay(config) as relay:
        deferred = await submit(relay.port, [ok, GONE, BUSY], message(subject="deferred"))
        outcome = await submit(relay.port, [later], message(subject="after"))
    assert deferred.reply is not None and deferred.reply[0] == 450, deferred
    assert "4.2.2" in deferred.reply[1] and "nothing was sent" in deferred.reply[1], deferred
    assert outcome.code == 250, outcome  # the session the relay closed mid-DATA was not reused
    refusing_postfix.sink.wait_for(1, rcpt=later, timeout=30)
    assert refusing_postfix.sink.messages_to(ok) == []


async def test_dsn_parameters_reach_postfix_which_reports_as_they_ask(
    refusing_postfix: PostfixSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    """Postfix offers DSN, so the relay passes RET, ENVID, NOTIFY and ORCPT on unchanged. Postfix's next
    hop (the sink) does not offer it, so Postfix itself sends the `relayed` DSN that NOTIFY=SUCCESS asks
    for, carrying the ENVID and ORCPT it got from the relay."""
    config = write_config(
        tmp_path / "relay.yaml", {"policies": _policies(refusing_postfix, ca, content_dependent=False)}
    )
    ok, sender, envid = _accepted(), f"app-{uuid.uuid4().hex[:8]}@sender.test", f"Env{uuid.uuid4().hex[:8]}"
    commands = (
        f"EHLO app\r\nMAIL FROM:<{sender}> RET=HDRS ENVID={envid}\r\n"
        f"RCPT TO:<{ok}> NOTIFY=SUCCESS ORCPT=rfc822;first+2Bcontact@refusing.test\r\n"
        "DATA\r\nSubject: dsn passthrough\r\n\r\nbody\r\n.\r\n"
    ).encode()
    async with running_relay(config) as relay:
        replies = await raw_session(relay.port, commands)
    assert b"250-DSN" in replies and replies[-2].startswith(b"250 "), replies
    [arrived] = refusing_postfix.sink.wait_for(1, rcpt=ok, timeout=30)
    assert b"Subject: dsn passthrough" in arrived.content
    [report] = refusing_postfix.sink.wait_for(1, rcpt=sender, timeout=30)
    text = report.content.decode("ascii", "replace")
    status = text.split("Content-Type: message/delivery-status", 1)[-1].split("\n--", 1)[0]
    print(f"\nWhat the app sent the relay:\n{commands.decode()}\nPostfix's DSN to the sender:{status}")
    assert f"Original-Envelope-Id: {envid}" in text, text
    assert "Original-Recipient: rfc822;first+contact@refusing.test" in text, text
    assert f"Final-Recipient: rfc822; {ok}" in text and "Action: relayed" in text, text  # Postfix's spacing
