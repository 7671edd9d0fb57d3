"""The relay end to end against an in-process aiosmtpd upstream that requires STARTTLS and AUTH."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from outbound_relay.server import RelayServer
from tests.peers.certs import TLSFiles
from tests.support.relay import message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream

SEED_TOKEN = "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"
SEED_USER = "test@contoso.onmicrosoft.com"


def seed_policies(port: int, tls: TLSFiles, **tls_extra: Any) -> list[dict[str, Any]]:
    """The seed's three Domain stanzas, pointed at one local upstream."""
    common = {
        "gateway": {"host": "127.0.0.1", "port": port},
        "tls": {"caFile": str(tls.ca_file), **tls_extra},
    }
    return [
        {"name": "seed/messagesystems", "scope": {"domain": "messagesystems.com"}, "type": "LOGIN",
         "user": "msys", "password": "msys-password", **common},
        {"name": "seed/sparkpost", "scope": {"domain": "sparkpost.com"}, "type": "PLAIN",
         "user": "sparkpost", "password": "sparkpost-password", **common},
        {"name": "seed/bird", "scope": {"domain": "bird.com"}, "type": "XOAUTH2",
         "user": SEED_USER, "password": SEED_TOKEN, **common},
    ]  # fmt: skip


def upstream_for(tls: TLSFiles, **kwargs: Any) -> AuthUpstream:
    return AuthUpstream(
        tls,
        users={"msys": "msys-password", "sparkpost": "sparkpost-password"},
        tokens={SEED_USER: SEED_TOKEN},
        **kwargs,
    )


@contextlib.asynccontextmanager
async def seeded_relay(
    up: AuthUpstream, tls: TLSFiles, config_path: Path, **tls_extra: Any
) -> AsyncIterator[RelayServer]:
    """The relay running on `seed_policies`, all pointed at `up`."""
    write_config(config_path, {"policies": seed_policies(up.port, tls, **tls_extra)})
    async with running_relay(config_path) as relay:
        yield relay


async def test_seed_domains_authenticate_with_their_mechanisms(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up, seeded_relay(up, tls, config_path) as relay:
        for rcpt in ("a@messagesystems.com", "b@sparkpost.com", "c@bird.com"):
            outcome = await submit(relay.port, [rcpt], message())
            assert outcome.code == 250, outcome
    seen = {(r.rcpt_tos[0], r.mechanism, r.login) for r in up.received}
    assert seen == {
        ("a@messagesystems.com", "LOGIN", "msys"),
        ("b@sparkpost.com", "PLAIN", "sparkpost"),
        ("c@bird.com", "XOAUTH2", SEED_USER),
    }


async def test_upstream_reply_reaches_client_and_is_counted(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up, seeded_relay(up, tls, config_path) as relay:
        outcome = await submit(relay.port, ["b@sparkpost.com"], message())
        assert outcome.data_reply == (250, "2.0.0 Ok: queued as 1")
        metrics = relay.metrics.render().decode()
    assert 'outbound_relay_messages_total{result="delivered"} 1.0' in metrics
    assert (
        'outbound_relay_auth_attempts_total{mechanism="PLAIN",policy="seed/sparkpost",result="success"} 1.0'
        in (metrics)
    )
    assert 'outbound_relay_auth_duration_seconds_count{policy="seed/sparkpost"} 1.0' in metrics


async def test_pooled_session_carries_many_messages(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up, seeded_relay(up, tls, config_path) as relay:
        for i in range(10):
            assert (await submit(relay.port, [f"u{i}@sparkpost.com"], message())).code == 250
    assert len(up.received) == 10
    assert up.state.connections == 1
    assert len(up.auth_log) == 1


async def test_concurrency_is_capped_by_max_connections(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        up.state.data_delay = 0.05
        policies = seed_policies(up.port, tls)
        policies[1]["maxConnections"] = 2
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            outcomes = await asyncio.gather(
                *(submit(relay.port, [f"u{i}@sparkpost.com"], message()) for i in range(8))
            )
    assert [o.code for o in outcomes] == [250] * 8
    assert up.state.connections == 2


async def test_wrong_password_is_a_temporary_failure_without_the_password(
    tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with upstream_for(tls) as up:
        policies = seed_policies(up.port, tls)
        policies[1]["password"] = "wrong-password-123"
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@sparkpost.com"], message())
            metrics = relay.metrics.render().decode()
    assert outcome.code == 454
    assert "authentication to upstream 127.0.0.1" in outcome.reply[1]
    assert "wrong-password-123" not in outcome.reply[1]
    assert 'auth_attempts_total{mechanism="PLAIN",policy="seed/sparkpost",result="failure"} 1.0' in metrics
    assert 'outbound_relay_messages_total{result="deferred"} 1.0' in metrics
    assert not up.received
    assert "wrong-password-123" not in caplog.text


async def test_bad_xoauth2_token_is_a_temporary_failure(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        policies = seed_policies(up.port, tls)
        policies[2]["password"] = "expired-token"
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["c@bird.com"], message())
    assert outcome.code == 454
    assert "XOAUTH2" in outcome.reply[1]
    assert "expired-token" not in outcome.reply[1]


async def test_upstream_down_is_a_temporary_failure(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        port = up.port
    write_config(config_path, {"policies": seed_policies(port, tls)})
    async with running_relay(config_path) as relay:
        outcome = await submit(relay.port, ["b@sparkpost.com"], message())
    assert outcome.code == 451
    assert "cannot reach upstream" in outcome.reply[1]


async def test_untrusted_certificate_is_refused(tls: TLSFiles, config_path: Path, tmp_path: Path) -> None:
    import trustme

    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    async with upstream_for(tls) as up:
        policies = seed_policies(up.port, tls)
        policies[1]["tls"] = {"caFile": str(other_ca)}
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@sparkpost.com"], message())
    assert outcome.code == 451
    assert "TLS with upstream" in outcome.reply[1]
    assert not up.auth_log


async def test_verify_false_accepts_an_untrusted_certificate(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        policies = seed_policies(up.port, tls)
        policies[1]["tls"] = {"verify": False}
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["b@sparkpost.com"], message())).code == 250


async def test_implicit_tls(tls: TLSFiles, config_path: Path) -> None:
    async with (
        upstream_for(tls, implicit_tls=True) as up,
        seeded_relay(up, tls, config_path, mode="implicit") as relay,
    ):
        assert (await submit(relay.port, ["b@sparkpost.com"], message())).code == 250
    assert up.received[0].mechanism == "PLAIN"


async def test_no_starttls_offered_means_no_credentials_sent(tls: TLSFiles, config_path: Path) -> None:
    async with (
        upstream_for(tls, require_tls=False, offer_starttls=False) as up,
        seeded_relay(up, tls, config_path) as relay,
    ):
        outcome = await submit(relay.port, ["b@sparkpost.com"], message())
    assert outcome.code == 454
    assert "does not offer STARTTLS" in outcome.reply[1]
    assert not up.auth_log


async def test_tls_none_sends_auth_in_clear_only_when_explicit(
    tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        upstream_for(tls, require_tls=False) as up,
        seeded_relay(up, tls, config_path, mode="none") as relay,
    ):
        assert (await submit(relay.port, ["b@sparkpost.com"], message())).code == 250
        metrics = relay.metrics.render().decode()
    assert "outbound_relay_plaintext_auth_total 1.0" in metrics
    assert "over plaintext" in caplog.text


async def test_recipient_of_another_route_gets_452(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up, seeded_relay(up, tls, config_path) as relay:
        outcome = await submit(relay.port, ["a@sparkpost.com", "b@bird.com", "c@sparkpost.com"], message())
    assert outcome.rcpt_replies["a@sparkpost.com"][0] == 250
    assert outcome.rcpt_replies["b@bird.com"][0] == 452
    assert outcome.rcpt_replies["b@bird.com"][1].startswith("4.5.3")
    assert outcome.rcpt_replies["c@sparkpost.com"][0] == 250
    assert outcome.code == 250
    assert up.received[0].rcpt_tos == ("a@sparkpost.com", "c@sparkpost.com")


async def test_upstream_rcpt_refusal_is_passed_back(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        up.state.rcpt_replies["nobody@sparkpost.com"] = "550 5.1.1 No such user"
        async with seeded_relay(up, tls, config_path) as relay:
            single = await submit(relay.port, ["nobody@sparkpost.com"], message())
            mixed = await submit(relay.port, ["ok@sparkpost.com", "nobody@sparkpost.com"], message())
            after = await submit(relay.port, ["ok@sparkpost.com"], message())
    # The route does not depend on the message: each RCPT hears the upstream's own reply.
    assert single.rcpt_replies == {"nobody@sparkpost.com": (550, "5.1.1 No such user")}
    assert single.data_reply is None
    assert mixed.rcpt_replies["nobody@sparkpost.com"] == (550, "5.1.1 No such user")
    assert mixed.code == 250
    assert after.code == 250
    assert [r.rcpt_tos for r in up.received] == [("ok@sparkpost.com",), ("ok@sparkpost.com",)]


async def test_upstream_data_refusal_is_passed_back(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        up.state.data_reply = "554 5.6.0 Content rejected"
        async with seeded_relay(up, tls, config_path) as relay:
            outcome = await submit(relay.port, ["b@sparkpost.com"], message())
            metrics = relay.metrics.render().decode()
    assert outcome.data_reply == (554, "5.6.0 Content rejected")
    assert 'outbound_relay_messages_total{result="rejected"} 1.0' in metrics


async def test_binding_header_selects_scope_and_is_removed(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        up.state.users["bulk-user"] = "bulk-password"
        policies = seed_policies(up.port, tls)
        policies.append({"name": "bulk", "scope": {"bindingGroup": "marketing"}, "user": "bulk-user",
                         "password": "bulk-password"})  # fmt: skip
        write_config(config_path, {"bindingGroups": {"marketing": ["bulk-a"]}, "policies": policies})
        async with running_relay(config_path) as relay:
            assert (
                await submit(relay.port, ["x@sparkpost.com"], message(headers={"X-Binding": "bulk-a"}))
            ).code == 250
            assert (await submit(relay.port, ["y@sparkpost.com"], message())).code == 250
    first, second = up.received
    # The binding group (level 4) is more specific than the Domain stanza (level 5).
    assert first.login == "bulk-user"
    assert second.login == "sparkpost"
    assert b"X-Binding" not in first.content
    assert b"Subject: hello" in first.content


async def test_route_without_gateway_is_a_temporary_failure(tls: TLSFiles, config_path: Path) -> None:
    write_config(config_path, {"policies": [{"name": "p", "type": "PLAIN", "user": "u", "password": "pw"}]})
    async with running_relay(config_path) as relay:
        outcome = await submit(relay.port, ["a@b.org"], message())
    assert outcome.code == 451
    assert "no gateway" in outcome.reply[1]


async def test_incomplete_auth_settings_are_a_temporary_failure(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        policies = seed_policies(up.port, tls)
        del policies[1]["password"]
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@sparkpost.com"], message())
    assert outcome.code == 451
    assert "needs a password" in outcome.reply[1]


async def test_dropped_idle_session_is_not_reused(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up, seeded_relay(up, tls, config_path) as relay:
        assert (await submit(relay.port, ["a@sparkpost.com"], message())).code == 250
        for session in up._sessions:  # the upstream drops its idle sessions
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0.05)
        assert (await submit(relay.port, ["b@sparkpost.com"], message())).code == 250
    assert len(up.received) == 2
    assert up.state.connections == 2


async def test_metrics_endpoint_serves_prometheus_text(tls: TLSFiles, config_path: Path) -> None:
    import urllib.request

    write_config(config_path, {})
    async with running_relay(config_path) as relay:
        url = f"http://127.0.0.1:{relay.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    for name in (
        "outbound_relay_messages_total",
        "outbound_relay_auth_attempts_total",
        "outbound_relay_delivery_duration_seconds_bucket",
        "outbound_relay_upstream_connections",
        "outbound_relay_config_reloads_total",
        "outbound_relay_hook_errors_total",
        "outbound_relay_config_info",
    ):
        assert name in body


def relay_generation(relay: RelayServer) -> str:
    return relay.generation.short_digest


async def test_suspended_policy_defers_its_mail(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        policies = seed_policies(up.port, tls)
        global_policy = {
            "name": "global",
            **{k: v for k, v in policies[1].items() if k not in ("name", "scope")},
        }
        policies[1] = {"name": "seed/sparkpost", "scope": {"domain": "sparkpost.com"},
                       "suspended": "Secret mail/sparkpost-smtp has no key password"}  # fmt: skip
        write_config(config_path, {"policies": [*policies, global_policy]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@sparkpost.com"], message())
            other = await submit(relay.port, ["b@elsewhere.org"], message())
    assert outcome.code == 451
    assert "has no key password" in outcome.reply[1]
    assert other.code == 250
    assert [r.rcpt_tos for r in up.received] == [("b@elsewhere.org",)]


async def test_421_on_a_reused_session_is_retried_on_a_fresh_one(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up, seeded_relay(up, tls, config_path) as relay:
        assert (await submit(relay.port, ["a@sparkpost.com"], message())).code == 250
        up.state.mail_replies.append("421 4.4.2 idle too long, closing")
        outcome = await submit(relay.port, ["b@sparkpost.com"], message())
    assert outcome.code == 250, outcome
    assert [r.rcpt_tos for r in up.received] == [("a@sparkpost.com",), ("b@sparkpost.com",)]
    assert up.state.connections == 2


async def test_421_on_a_fresh_session_is_a_temporary_failure(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        up.state.mail_replies.append("421 4.3.2 going down")
        async with seeded_relay(up, tls, config_path) as relay:
            outcome = await submit(relay.port, ["b@sparkpost.com"], message())
    assert outcome.code == 451, outcome
    assert "421 4.3.2 going down" in outcome.reply[1]
    assert up.received == []


async def test_unexpected_success_code_is_never_passed_on(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        up.state.rcpt_replies["odd@sparkpost.com"] = "252 2.1.5 Cannot verify, will try"
        async with seeded_relay(up, tls, config_path) as relay:
            outcome = await submit(relay.port, ["odd@sparkpost.com"], message())
    assert outcome.code == 451, outcome
    assert "upstream answered 252 to RCPT" in outcome.reply[1]


async def test_smtputf8_address_is_relayed_when_the_upstream_offers_it(
    tls: TLSFiles, config_path: Path
) -> None:
    async with (
        upstream_for(tls, smtputf8=True) as up,
        seeded_relay(up, tls, config_path) as relay,
        aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False) as client,
    ):
        await client.mail("app@example.org", options=["SMTPUTF8"])
        await client.rcpt("jörg@sparkpost.com", encoding="utf-8")
        response = await client.data(message())
    assert response.code == 250
    assert up.received[0].rcpt_tos == ("jörg@sparkpost.com",)


async def test_smtputf8_address_is_refused_when_the_upstream_lacks_it(
    tls: TLSFiles, config_path: Path
) -> None:
    async with (
        upstream_for(tls) as up,
        seeded_relay(up, tls, config_path) as relay,
        aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False) as client,
    ):
        await client.mail("app@example.org", options=["SMTPUTF8"])
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:  # at RCPT: pass-through
            await client.rcpt("jörg@sparkpost.com", encoding="utf-8")
    assert refused.value.code == 553
    assert "5.6.7" in refused.value.message
    assert up.received == []


async def test_a_bug_in_the_relay_is_a_temporary_failure(
    tls: TLSFiles, config_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from outbound_relay.session import UpstreamSession

    async def broken(*args: object) -> str:
        raise RuntimeError("a bug")

    monkeypatch.setattr(UpstreamSession, "send", broken)
    monkeypatch.setattr(UpstreamSession, "begin", broken)
    async with upstream_for(tls) as up, seeded_relay(up, tls, config_path) as relay:
        outcome = await submit(relay.port, ["b@sparkpost.com"], message())
        metrics = relay.metrics.render().decode()
    assert outcome.reply == (451, "4.3.0 Internal error in the relay; try again later")
    assert 'outbound_relay_messages_total{result="deferred"} 1.0' in metrics


def test_wire_data_has_only_crlf_line_ends() -> None:
    from outbound_relay.session import encode_data

    # CRs before a line end join it: the header block does not end early.
    assert encode_data(b"From: a@b\r\r\nSubject: s\r\n\r\nbody") == (
        b"From: a@b\r\nSubject: s\r\n\r\nbody\r\n.\r\n"
    )
    assert encode_data(b"Subject: s\n\n.hidden\nend") == b"Subject: s\r\n\r\n..hidden\r\nend\r\n.\r\n"
    assert encode_data(b"a\r.\rb") == b"a\r\n..\r\nb\r\n.\r\n"


async def test_max_connections_change_applies_on_reload(tls: TLSFiles, config_path: Path) -> None:
    async with upstream_for(tls) as up:
        up.state.data_delay = 0.05
        policies = seed_policies(up.port, tls)
        policies[1]["maxConnections"] = 1
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            await asyncio.gather(*(submit(relay.port, [f"a{i}@sparkpost.com"], message()) for i in range(4)))
            assert up.state.connections == 1
            policies[1]["maxConnections"] = 3
            write_config(config_path, {"policies": policies})
            assert await relay.reload()
            outcomes = await asyncio.gather(
                *(submit(relay.port, [f"b{i}@sparkpost.com"], message()) for i in range(6))
            )
    assert [o.code for o in outcomes] == [250] * 6
    assert up.state.connections == 3
