"""The relay against real upstream servers from Debian: Dovecot submission (PLAIN, LOGIN, XOAUTH2 with
local JWT validation) and Postfix with Cyrus SASL (PLAIN, LOGIN), both requiring STARTTLS.
Delivery is counted behind each server, at its sink, not at the relay's 250."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.peers import DovecotSubmission, PostfixSubmission, TLSFiles
from tests.support.relay import message, running_relay, submit, write_config

pytestmark = pytest.mark.integration


def unique(domain: str) -> str:
    return f"r-{uuid.uuid4().hex[:12]}@{domain}"


def policy(host: str, port: int, ca: TLSFiles, **auth: Any) -> dict[str, Any]:
    return {
        "name": "it/upstream",
        "gateway": {"host": host, "port": port},
        "tls": {"caFile": str(ca.ca_file)},
        **auth,
    }


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_dovecot_password_mechanisms(
    dovecot: DovecotSubmission, ca: TLSFiles, tmp_path: Path, mechanism: str
) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        {"policies": [policy(dovecot.host, dovecot.port, ca, type=mechanism, user="alice",
                             password=dovecot.users["alice"])]},
    )  # fmt: skip
    rcpt = unique("dovecot.test")
    async with running_relay(config) as relay:
        outcome = await submit(relay.port, [rcpt], message(subject=f"via {mechanism}"))
    assert outcome.code == 250, outcome
    [arrived] = dovecot.sink.wait_for(1, rcpt=rcpt)
    assert f"Subject: via {mechanism}".encode() in arrived.content


async def test_dovecot_xoauth2_token(dovecot: DovecotSubmission, ca: TLSFiles, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        {"policies": [policy(dovecot.host, dovecot.port, ca, type="XOAUTH2", user="bob",
                             password=dovecot.make_token("bob"))]},
    )  # fmt: skip
    rcpt = unique("dovecot.test")
    async with running_relay(config) as relay:
        outcome = await submit(relay.port, [rcpt], message())
        metrics = relay.metrics.render().decode()
    assert outcome.code == 250, outcome
    assert len(dovecot.sink.wait_for(1, rcpt=rcpt)) == 1
    assert 'auth_attempts_total{mechanism="XOAUTH2",policy="it/upstream",result="success"} 1.0' in metrics


@pytest.mark.parametrize(
    ("mechanism", "credential"),
    [
        ("PLAIN", "wrong-password"),
        ("LOGIN", "wrong-password"),
        ("XOAUTH2", "expired"),
        ("XOAUTH2", "foreign"),
    ],
)
async def test_dovecot_refusal_is_a_temporary_failure(
    dovecot: DovecotSubmission, ca: TLSFiles, tmp_path: Path, mechanism: str, credential: str
) -> None:
    if credential == "expired":
        secret = dovecot.make_token("carol", expired=True)
    elif credential == "foreign":
        secret = dovecot.make_token("carol", key=b"k" * 32)
    else:
        secret = credential
    config = write_config(
        tmp_path / "relay.yaml",
        {"policies": [policy(dovecot.host, dovecot.port, ca, type=mechanism, user="carol", password=secret)]},
    )
    rcpt = unique("dovecot.test")
    async with running_relay(config) as relay:
        outcome = await submit(relay.port, [rcpt], message())
        metrics = relay.metrics.render().decode()
    assert outcome.code == 454, outcome
    assert "authentication to upstream" in outcome.reply[1]
    assert secret not in outcome.reply[1]
    failures = f'auth_attempts_total{{mechanism="{mechanism}",policy="it/upstream",result="failure"}} 1.0'
    assert failures in metrics
    assert dovecot.sink.messages_to(rcpt) == []


async def test_dovecot_pooled_session_many_messages(
    dovecot: DovecotSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        {"policies": [policy(dovecot.host, dovecot.port, ca, type="PLAIN", user="alice",
                             password=dovecot.users["alice"])]},
    )  # fmt: skip
    rcpts = [unique("dovecot.test") for _ in range(20)]
    async with running_relay(config) as relay:
        for rcpt in rcpts:
            assert (await submit(relay.port, [rcpt], message())).code == 250
        metrics = relay.metrics.render().decode()
    for rcpt in rcpts:
        assert len(dovecot.sink.wait_for(1, rcpt=rcpt)) == 1
    # One TLS handshake and one AUTH carried all twenty messages.
    assert 'auth_attempts_total{mechanism="PLAIN",policy="it/upstream",result="success"} 1.0' in metrics


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_postfix_cyrus_sasl(
    postfix: PostfixSubmission, ca: TLSFiles, tmp_path: Path, mechanism: str
) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        {"policies": [policy(postfix.host, postfix.port, ca, type=mechanism, user="alice",
                             password=postfix.users["alice"])]},
    )  # fmt: skip
    rcpt = unique("postfix.test")
    async with running_relay(config) as relay:
        outcome = await submit(relay.port, [rcpt], message(subject=f"postfix {mechanism}"))
    assert outcome.code == 250, outcome
    [arrived] = postfix.sink.wait_for(1, rcpt=rcpt, timeout=30)
    assert f"Subject: postfix {mechanism}".encode() in arrived.content


async def test_postfix_wrong_password(postfix: PostfixSubmission, ca: TLSFiles, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "relay.yaml",
        {
            "policies": [
                policy(postfix.host, postfix.port, ca, type="PLAIN", user="alice", password="nope-nope")
            ]
        },
    )
    rcpt = unique("postfix.test")
    async with running_relay(config) as relay:
        outcome = await submit(relay.port, [rcpt], message())
    assert outcome.code == 454, outcome
    assert "nope-nope" not in outcome.reply[1]
    assert postfix.sink.messages_to(rcpt) == []
