"""Tests of the peers themselves, spoken to with plain aiosmtplib (no relay code), so that a failing
relay test can be blamed on the relay and not on its upstream."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from tests.peers import (
    DovecotSubmission,
    PeerError,
    PostfixRelay,
    PostfixSubmission,
    RecordingSink,
    TLSFiles,
    require_binaries,
)
from tests.peers.dovecot import DOVECOT
from tests.peers.postfix import POSTFIX_BINARIES

pytestmark = pytest.mark.integration

SENDER = "sender@client.test"


def unique_rcpt() -> str:
    # Peers are shared by the session; a recipient of its own lets a test count only its own mail.
    return f"rcpt-{uuid.uuid4().hex[:12]}@upstream.test"


def message(rcpt: str) -> str:
    return (
        f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: peer test\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@client.test>\r\n\r\nhello\r\n"
    )


@contextlib.asynccontextmanager
async def session(
    host: str, port: int, ca: TLSFiles, *, starttls: bool = True
) -> AsyncIterator[aiosmtplib.SMTP]:
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, tls_context=ca.client_context())
    async with smtp:
        await smtp.ehlo()
        if starttls:
            await smtp.starttls()
            # The server forgets the first EHLO on STARTTLS and advertises AUTH only after a new one;
            # aiosmtplib's auth_* methods do not send it for us.
            await smtp.ehlo()
        yield smtp


async def authenticate(smtp: aiosmtplib.SMTP, mechanism: str, user: str, secret: str) -> None:
    if mechanism == "PLAIN":
        await smtp.auth_plain(user, secret)
    elif mechanism == "LOGIN":
        await smtp.auth_login(user, secret)
    else:
        await smtp.auth_xoauth2(user, secret)


# -- Dovecot submission ------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "XOAUTH2"])
async def test_dovecot_auth_then_message_reaches_sink(
    dovecot: DovecotSubmission, ca: TLSFiles, mechanism: str
) -> None:
    user, password = "alice", dovecot.users["alice"]
    secret = dovecot.make_token(user) if mechanism == "XOAUTH2" else password
    rcpt = unique_rcpt()
    async with session(dovecot.host, dovecot.port, ca) as smtp:
        assert mechanism.lower() in smtp.server_auth_methods, smtp.esmtp_extensions
        await authenticate(smtp, mechanism, user, secret)
        errors, _ = await smtp.sendmail(SENDER, [rcpt], message(rcpt))
        assert errors == {}
    [received] = dovecot.sink.wait_for(1, rcpt=rcpt)
    assert received.mail_from == SENDER
    assert b"Subject: peer test" in received.content


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_dovecot_wrong_password_is_535(
    dovecot: DovecotSubmission, ca: TLSFiles, mechanism: str
) -> None:
    async with session(dovecot.host, dovecot.port, ca) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await authenticate(smtp, mechanism, "alice", "not-the-password")
    assert failure.value.code == 535


@pytest.mark.parametrize(
    ("token_kind", "reason"),
    [
        ("expired", "Token has expired"),
        ("foreign-key", "Incorrect JWT signature"),
        ("other-user", "Username 'alice' did not match 'bob'"),
        ("garbage", "Not a JWT token"),
    ],
)
async def test_dovecot_bad_token_is_535(
    dovecot: DovecotSubmission, ca: TLSFiles, token_kind: str, reason: str
) -> None:
    token = {
        "expired": dovecot.make_token("alice", expired=True),
        "foreign-key": dovecot.make_token("alice", key=b"k" * 32),
        "other-user": dovecot.make_token("bob"),
        "garbage": "not-a-jwt",
    }[token_kind]
    async with session(dovecot.host, dovecot.port, ca) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_xoauth2("alice", token)
    assert failure.value.code == 535
    # Refused for the reason the test means, not because token validation is broken altogether.
    await asyncio.to_thread(dovecot.wait_for_log, f"Local validation failed: {reason}")


async def test_dovecot_refuses_auth_before_starttls(dovecot: DovecotSubmission, ca: TLSFiles) -> None:
    async with session(dovecot.host, dovecot.port, ca, starttls=False) as smtp:
        assert not smtp.supports_extension("auth")
        assert smtp.supports_extension("starttls")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_plain("alice", dovecot.users["alice"])
    assert failure.value.code == 530  # 5.7.0 TLS required


async def test_dovecot_allows_more_sessions_per_user_than_its_default(
    dovecot: DovecotSubmission, ca: TLSFiles
) -> None:
    # The relay pools several sessions per identity; Dovecot's stock limit is 10 per user and IP.
    async with contextlib.AsyncExitStack() as stack:
        sessions = await asyncio.gather(
            *(stack.enter_async_context(session(dovecot.host, dovecot.port, ca)) for _ in range(12))
        )
        await asyncio.gather(*(s.auth_plain("bob", dovecot.users["bob"]) for s in sessions))
        rcpt = unique_rcpt()
        await asyncio.gather(*(s.sendmail(SENDER, [rcpt], message(rcpt)) for s in sessions))
    assert len(dovecot.sink.wait_for(12, rcpt=rcpt)) == 12


async def test_dovecot_relays_to_a_given_target(peer_workdir: Path, ca: TLSFiles) -> None:
    # Benchmarks point Dovecot at Postfix's smtp-sink instead of its own RecordingSink.
    require_binaries("Dovecot submission (dovecot-core, dovecot-submissiond)", DOVECOT)
    with (
        RecordingSink() as target,
        DovecotSubmission(peer_workdir, ca, relay_to=(target.host, target.port)) as dovecot,
    ):
        with pytest.raises(PeerError, match="not to a RecordingSink"):
            _ = dovecot.sink
        rcpt = unique_rcpt()
        async with session(dovecot.host, dovecot.port, ca) as smtp:
            await smtp.auth_plain("alice", dovecot.users["alice"])
            errors, _ = await smtp.sendmail(SENDER, [rcpt], message(rcpt))
            assert errors == {}
        [received] = await target.wait_for_async(1, rcpt)
    assert received.mail_from == SENDER


# -- Postfix + Cyrus SASL ----------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_postfix_auth_then_message_reaches_sink(
    postfix: PostfixSubmission, ca: TLSFiles, mechanism: str
) -> None:
    rcpt = unique_rcpt()
    async with session(postfix.host, postfix.port, ca) as smtp:
        assert mechanism.lower() in smtp.server_auth_methods, smtp.esmtp_extensions
        await authenticate(smtp, mechanism, "alice", postfix.users["alice"])
        errors, _ = await smtp.sendmail(SENDER, [rcpt], message(rcpt))
        assert errors == {}
    [received] = postfix.sink.wait_for(1, rcpt=rcpt)
    assert received.mail_from == SENDER


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_postfix_wrong_password_is_535(
    postfix: PostfixSubmission, ca: TLSFiles, mechanism: str
) -> None:
    async with session(postfix.host, postfix.port, ca) as smtp:
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await authenticate(smtp, mechanism, "alice", "not-the-password")
    assert failure.value.code == 535


async def test_postfix_refuses_auth_and_mail_before_starttls(
    postfix: PostfixSubmission, ca: TLSFiles
) -> None:
    async with session(postfix.host, postfix.port, ca, starttls=False) as smtp:
        assert not smtp.supports_extension("auth")
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as failure:
            await smtp.auth_plain("alice", postfix.users["alice"])
        assert failure.value.code == 530, failure.value  # 5.7.0 Must issue a STARTTLS command first
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.mail(SENDER)
        assert refused.value.code == 530, refused.value


async def test_postfix_refuses_relaying_without_auth(postfix: PostfixSubmission, ca: TLSFiles) -> None:
    rcpt = unique_rcpt()
    async with session(postfix.host, postfix.port, ca) as smtp:
        await smtp.mail(SENDER)
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as failure:
            await smtp.rcpt(rcpt)
    assert failure.value.code == 554


# -- Postfix as a SASL client (the benchmark's reference relay) ---------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_postfix_relay_authenticates_to_dovecot(
    dovecot: DovecotSubmission, ca: TLSFiles, peer_workdir: Path, mechanism: str
) -> None:
    require_binaries("Postfix with Cyrus SASL (postfix, sasl2-bin)", *POSTFIX_BINARIES)
    relay = PostfixRelay(
        dovecot.host, dovecot.port, "carol", dovecot.users["carol"], peer_workdir, ca, mechanism=mechanism
    )
    rcpt = unique_rcpt()
    with relay:
        # No TLS, no AUTH on the way in: Postfix adds both on the way out.
        async with aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False) as smtp:
            errors, _ = await smtp.sendmail(SENDER, [rcpt], message(rcpt))
            assert errors == {}
        [received] = await dovecot.sink.wait_for_async(1, rcpt)
    assert b"ESMTPSA" in received.content  # Dovecot's Received: line says TLS + AUTH were used
    await asyncio.to_thread(dovecot.wait_for_log, f"Login: user=<carol>, method={mechanism}")


@pytest.mark.parametrize("reuse", [False, True], ids=["default", "tls-reuse"])
async def test_postfix_relay_tls_connection_reuse(
    dovecot: DovecotSubmission, ca: TLSFiles, peer_workdir: Path, reuse: bool
) -> None:
    """At its defaults Postfix opens a TLS connection, and logs in, for every delivery; with
    `tls_connection_reuse` a burst of mail shares connections: fewer logins at Dovecot than messages,
    and Postfix logs `conn_use=` on the deliveries that reused one."""
    require_binaries("Postfix with Cyrus SASL (postfix, sasl2-bin)", *POSTFIX_BINARIES)
    user, sessions, per_session = "bob", 4, 6
    relay = PostfixRelay(
        dovecot.host, dovecot.port, user, dovecot.users[user], peer_workdir, ca, tls_connection_reuse=reuse
    )
    rcpt = unique_rcpt()

    def logins() -> int:
        return dovecot.log_file.read_text(errors="replace").count(f"Login: user=<{user}>")

    async def burst() -> None:
        # Several sessions at once, so that the relayhost has a backlog in Postfix's active queue: the
        # hint on which it keeps connections for reuse (smtp_connection_cache_on_demand).
        async with aiosmtplib.SMTP(hostname=relay.host, port=relay.port, start_tls=False) as smtp:
            for _ in range(per_session):
                errors, _ = await smtp.sendmail(SENDER, [rcpt], message(rcpt))
                assert errors == {}

    with relay:
        before = logins()
        await asyncio.gather(*(burst() for _ in range(sessions)))
        await dovecot.sink.wait_for_async(sessions * per_session, rcpt, timeout=60)
        delivered = await asyncio.to_thread(relay.wait_for_log_count, " status=sent ", sessions * per_session)
        upstream_logins = logins() - before
    reused = [line for line in delivered if "conn_use=" in line]
    if reuse:
        assert 1 <= upstream_logins < sessions * per_session, upstream_logins
        assert len(reused) == sessions * per_session - upstream_logins, delivered
    else:
        assert upstream_logins == sessions * per_session
        assert reused == []
