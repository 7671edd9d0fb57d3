"""STARTTLS on the app's side (`listen.tls`): offered only when configured, and a client that verifies
the certificate (Python's smtplib with a default context, as Django's EMAIL_USE_TLS does) upgrades,
authenticates and sends."""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path

import pytest

from outbound_relay.config import ConfigError
from outbound_relay.generation import Generation
from outbound_relay.server import RelayServer
from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, running_relay, write_config
from tests.support.upstream import AuthUpstream


def _send(port: int, context: ssl.SSLContext | None) -> tuple[bool, tuple[int, bytes]]:
    """smtplib as an app configured with "use TLS" and credentials: (STARTTLS offered, reply to NOOP)."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.org", "a@example.com", "over TLS"
    msg.set_content("hello\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        offered = client.has_extn("starttls")
        if context is not None:
            client.starttls(context=context)
            client.ehlo()
            client.login("app", "whatever")
            client.send_message(msg)
        return offered, client.noop()


async def test_starttls_is_offered_and_verified_when_configured(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        listen = {"port": 0, "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)}}
        write_config(config_path, {"listen": listen, "policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            offered, _ = await asyncio.to_thread(_send, relay.port, tls.client_context())
    assert offered
    assert [r.rcpt_tos for r in up.received] == [("a@example.com",)]


async def test_a_client_that_does_not_trust_the_certificate_refuses_it(
    tls: TLSFiles, config_path: Path
) -> None:
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        listen = {"port": 0, "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)}}
        write_config(config_path, {"listen": listen, "policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            with pytest.raises(ssl.SSLCertVerificationError):
                await asyncio.to_thread(_send, relay.port, ssl.create_default_context())
    assert up.received == []


async def test_starttls_is_not_offered_by_default(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            offered, (code, _) = await asyncio.to_thread(_send, relay.port, None)
    assert not offered
    assert code == 250


def test_listen_tls_files_must_exist_and_be_a_certificate(tls: TLSFiles, config_path: Path) -> None:
    write_config(config_path, {"listen": {"port": 0, "tls": {"certFile": "nope.crt", "keyFile": "k"}}})
    with pytest.raises(ConfigError, match=r"listen\.tls\.certFile .*nope\.crt"):
        Generation.load(config_path)
    (config_path.parent / "garbage.pem").write_text("not a certificate\n")
    files = {"certFile": "garbage.pem", "keyFile": str(tls.key_file)}
    write_config(config_path, {"listen": {"port": 0, "tls": files}})
    with pytest.raises(ConfigError, match=r"listen\.tls: certificate .*garbage\.pem"):
        RelayServer(Generation.load(config_path))


def _auth_offered_after_starttls(port: int, context: ssl.SSLContext) -> bool:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.starttls(context=context)
        client.ehlo()
        return client.has_extn("auth")


@pytest.mark.parametrize(("client_auth", "offered"), [("accept", True), ("none", False)])
async def test_client_auth_none_offers_no_auth_after_starttls_either(
    tls: TLSFiles, config_path: Path, client_auth: str, offered: bool
) -> None:
    files = {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)}
    write_config(config_path, {"listen": {"port": 0, "clientAuth": client_auth, "tls": files}})
    async with running_relay(config_path) as relay:
        got = await asyncio.to_thread(_auth_offered_after_starttls, relay.port, tls.client_context())
    assert got is offered


def _starttls_mid_transaction(port: int, context: ssl.SSLContext) -> None:
    """MAIL and RCPT (the upstream transaction opens at RCPT), then STARTTLS, then gone."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo()
        client.mail("app@example.org")
        assert client.rcpt("a@example.com")[0] == 250
        client.starttls(context=context)


async def test_starttls_in_a_transaction_releases_its_upstream_session(
    tls: TLSFiles, config_path: Path
) -> None:
    """TLS gives aiosmtpd a new session: the transaction opened before it must not keep its upstream
    session (and a permit of maxConnections) for as long as the relay runs."""
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        listen = {"port": 0, "tls": {"certFile": str(tls.cert_file), "keyFile": str(tls.key_file)}}
        policy = {**catch_all_policy(up.port, tls), "maxConnections": 2}
        config = {"listen": listen, "upstream": {"timeoutSeconds": 5}, "policies": [policy]}
        write_config(config_path, config)
        async with running_relay(config_path) as relay:
            for _ in range(3):
                await asyncio.to_thread(_starttls_mid_transaction, relay.port, tls.client_context())
            await asyncio.sleep(0.2)
            offered, _ = await asyncio.to_thread(_send, relay.port, tls.client_context())
    assert offered
    assert [r.rcpt_tos for r in up.received] == [("a@example.com",)]
