"""A credential travels only as its own policy says: a wider scope's `tls: {mode: none}` or
`verify: false` never carries a narrower policy's password (docs/relay-config.md, allowInsecureAuth)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from outbound_relay.cli import explain_route
from outbound_relay.config import RelayConfig
from outbound_relay.scopes import ScopeIndex
from tests.peers.certs import TLSFiles
from tests.support.relay import message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream


def _policies(
    port: int, tls: TLSFiles, *, wide_tls: dict[str, Any], **domain_extra: Any
) -> list[dict[str, Any]]:
    return [
        {"name": "t/internal", "gateway": {"host": "127.0.0.1", "port": port},
         "tls": {"caFile": str(tls.ca_file), **wide_tls}},
        {"name": "t/sparkpost", "scope": {"domain": "sparkpost.com"}, "type": "PLAIN",
         "user": "u", "password": "p", **domain_extra},
    ]  # fmt: skip


@pytest.mark.parametrize("wide_tls", [{"mode": "none"}, {"verify": False}])
async def test_a_wider_scopes_weak_tls_defers_instead_of_exposing_the_password(
    tls: TLSFiles, config_path: Path, wide_tls: dict[str, Any]
) -> None:
    async with AuthUpstream(tls, users={"u": "p"}, require_tls=False) as up:
        write_config(config_path, {"policies": _policies(up.port, tls, wide_tls=wide_tls)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@sparkpost.com"], message())
            metrics = relay.metrics.render().decode()
    code, text = outcome.reply  # at RCPT: the route does not depend on the message
    assert code == 454, outcome
    assert "allowInsecureAuth" in text and "t/sparkpost" in text and "t/internal" in text
    assert up.auth_log == []  # the password never left
    assert "outbound_relay_plaintext_auth_total 0.0" in metrics


async def test_allow_insecure_auth_in_the_credentials_policy_lets_them_go_counted_and_warned_once(
    tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with AuthUpstream(tls, users={"u": "p"}, require_tls=False) as up:
        policies = _policies(up.port, tls, wide_tls={"mode": "none"}, allowInsecureAuth=True)
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            for _ in range(2):
                assert (await submit(relay.port, ["b@sparkpost.com"], message())).code == 250
            await relay.pool.close()  # a new session authenticates again
            assert (await submit(relay.port, ["b@sparkpost.com"], message())).code == 250
            metrics = relay.metrics.render().decode()
    assert [entry[1:] for entry in up.auth_log][-1] == ("u", True)
    assert "outbound_relay_plaintext_auth_total 2.0" in metrics
    assert caplog.text.count("over plaintext, as policy t/sparkpost") == 1


def test_explain_shows_why_auth_is_deferred_or_who_allows_it(tls: TLSFiles) -> None:
    refused = RelayConfig.model_validate({"policies": _policies(25, tls, wide_tls={"mode": "none"})})
    text = explain_route(ScopeIndex(refused), "x@sparkpost.com", None)
    assert "deferred (4xx)" in text and "allowInsecureAuth" in text
    allowed = RelayConfig.model_validate(
        {"policies": _policies(25, tls, wide_tls={"mode": "none"}, allowInsecureAuth=True)}
    )
    text = explain_route(ScopeIndex(allowed), "x@sparkpost.com", None)
    assert "AUTH goes without verified TLS, as policy t/sparkpost" in text


@pytest.mark.parametrize("wide_tls", [{"mode": "none"}, {"verify": False}])
def test_an_oauth2_access_token_is_held_back_like_a_password(wide_tls: dict[str, Any]) -> None:
    """An access token obtained with a policy's oauth2 block is that policy's credential: a wider scope's
    weak TLS does not carry it either, unless the oauth2 policy allows it itself."""
    oauth2 = {"tokenUrl": "https://login.example.com/token", "clientId": "c", "clientSecret": "s"}

    def route(**extra: Any) -> Any:
        policies = [
            {"name": "t/internal", "gateway": {"host": "127.0.0.1", "port": 2525}, "tls": wide_tls},
            {"name": "t/o365", "scope": {"domain": "contoso.com"}, "type": "XOAUTH2", "user": "u",
             "oauth2": oauth2, **extra},
        ]  # fmt: skip
        return ScopeIndex(RelayConfig.model_validate({"policies": policies})).route("contoso.com", "default")

    exposure = route().auth_exposure()
    assert exposure is not None and "t/o365" in exposure and "t/internal" in exposure
    assert route(allowInsecureAuth=True).auth_exposure() is None


async def test_a_narrower_policy_cannot_point_wider_credentials_at_its_own_gateway(
    tls: TLSFiles, config_path: Path
) -> None:
    """Each setting falls back on its own, so a policy that sets only a gateway would take the wider
    scope's password with it: whoever may write that policy would receive the credentials. They go only
    to a gateway of their own policy or a wider one; the mail is deferred, never sent to the other."""
    async with (
        AuthUpstream(tls, users={"u": "p"}) as legit,
        AuthUpstream(tls, users={"u": "p"}) as attacker,
    ):
        policies = [
            {"name": "t/global", "type": "PLAIN", "user": "u", "password": "p",
             "gateway": {"host": "127.0.0.1", "port": legit.port}, "tls": {"caFile": str(tls.ca_file)}},
            {"name": "t/redirect", "scope": {"domain": "sparkpost.com"},
             "gateway": {"host": "127.0.0.1", "port": attacker.port}},
        ]  # fmt: skip
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            redirected = await submit(relay.port, ["b@sparkpost.com"], message())
            elsewhere = await submit(relay.port, ["b@example.org"], message())
        text = explain_route(
            ScopeIndex(RelayConfig.model_validate({"policies": policies})), "x@sparkpost.com", None
        )
    assert redirected.code == 454, redirected
    assert "t/redirect" in redirected.reply[1] and "t/global" in redirected.reply[1]
    assert attacker.auth_log == []  # the password never reached the narrower policy's gateway
    assert elsewhere.code == 250 and [entry[1:] for entry in legit.auth_log] == [("u", True)]
    assert "deferred (4xx)" in text and "more specific than" in text
