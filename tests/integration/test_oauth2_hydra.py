"""XOAUTH2 with tokens from a real authorization server: Ory Hydra issues short-lived RS256 JWT access
tokens (client_credentials, and refresh tokens it rotates at every use), Dovecot accepts a token only
while Hydra's introspection calls it active. Delivery is counted behind Dovecot, at its sink."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from outbound_relay.cli import main
from outbound_relay.metrics import RelayMetrics
from outbound_relay.oauth2 import TokenProvider, TokenUnavailable
from outbound_relay.scopes import OAuth2Source, ScopeIndex
from outbound_relay.server import RelayServer
from outbound_relay.session import auth_xoauth2
from tests.integration.conftest import SHORT_TTL
from tests.peers import DovecotSubmission, TLSFiles
from tests.peers.common import log_tail
from tests.peers.hydra import Client, Hydra
from tests.support.relay import Outcome, message, running_relay, submit, write_config

pytestmark = pytest.mark.integration

# What a token, refresh token or Hydra secret looks like in text: JWTs start with a base64 "{".
TOKEN_MARKS = ("eyJ", "ory_at_", "ory_rt_")


def unique() -> str:
    return f"r-{uuid.uuid4().hex[:12]}@oauth2.test"


def oauth2_policy(
    name: str, hydra: Hydra, dovecot: DovecotSubmission, ca: TLSFiles, *, user: str, **oauth2: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "type": "XOAUTH2",
        "user": user,
        "oauth2": {"tokenUrl": hydra.token_url, "scopes": ["smtp"], "caFile": str(hydra.ca_file), **oauth2},
        "gateway": {"host": dovecot.host, "port": dovecot.port},
        "tls": {"caFile": str(ca.ca_file)},
        "maxConnections": 3,
    }


def client_config(client: Client, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "client-secret").write_text(client.secret + "\n")
    return {"clientId": client.id, "clientSecretFile": "client-secret"}


def counter(relay: RelayServer, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def token_requests(relay: RelayServer, result: str = "success") -> float:
    return counter(relay, "outbound_relay_oauth2_token_requests_total", result=result)


@dataclass
class Bursts:
    outcomes: list[Outcome] = field(default_factory=list)
    rcpts: list[str] = field(default_factory=list)
    token_requests: list[float] = field(default_factory=list)  # made during each burst


async def send_bursts(relay: RelayServer, seconds: float, *, burst: int = 3) -> Bursts:
    """Bursts of `burst` concurrent messages, a pause after each long enough for the pool to close its
    idle sessions (idleTimeoutSeconds: 0.3), so each burst authenticates anew; for `seconds`."""
    sent = Bursts()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = [unique() for _ in range(burst)]
        sent.rcpts += batch
        before = token_requests(relay)
        sent.outcomes += await asyncio.gather(*(submit(relay.port, [r], message()) for r in batch))
        sent.token_requests.append(token_requests(relay) - before)
        await asyncio.sleep(0.8)
    return sent


def assert_no_secrets(text: str, *secrets: str) -> None:
    for mark in (*TOKEN_MARKS, *secrets):
        assert mark not in text, f"{mark[:12]}... appears in {text[:2000]}"


async def test_delivery_across_token_lifetimes(
    hydra: Hydra,
    dovecot_hydra: DovecotSubmission,
    ca: TLSFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    client = hydra.create_client()
    policy = oauth2_policy(
        "it/hydra", hydra, dovecot_hydra, ca, user=client.id, **client_config(client, tmp_path)
    )
    config = write_config(
        tmp_path / "relay.yaml", {"upstream": {"idleTimeoutSeconds": 0.3}, "policies": [policy]}
    )
    lifetimes = 3.5
    issued_before = hydra.issued()
    async with running_relay(config) as relay:
        started = time.monotonic()
        sent = await send_bursts(relay, SHORT_TTL * lifetimes)
        outcomes, rcpts = sent.outcomes, sent.rcpts
        elapsed = time.monotonic() - started
        requests = token_requests(relay)
        auths = counter(
            relay,
            "outbound_relay_auth_attempts_total",
            mechanism="XOAUTH2",
            result="success",
            policy="it/hydra",
        )
        deferred = counter(relay, "outbound_relay_messages_total", result="deferred")
        metrics = relay.metrics.render().decode()
        capsys.readouterr()
        code = await asyncio.to_thread(
            main, ["explain", "--config", str(config), "--rcpt", "x@oauth2.test",
                   "--metrics-port", str(relay.metrics_port)]
        )  # fmt: skip
        explained = capsys.readouterr().out
    print(
        f"TTL {SHORT_TTL}s, {elapsed:.1f}s: {len(outcomes)} messages, {auths:.0f} AUTHs, "
        f"{requests:.0f} token requests, {deferred:.0f} deferred"
    )
    failed = [o for o in outcomes if o.code != 250]
    assert not failed, f"{failed}\n{log_tail(dovecot_hydra.log_file)}"
    arrived = {r for m in await dovecot_hydra.sink.wait_for_async(0) for r in m.rcpt_tos}
    deadline = time.monotonic() + 10
    while not set(rcpts) <= arrived and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        arrived = {r for m in dovecot_hydra.sink.messages for r in m.rcpt_tos}
    assert set(rcpts) <= arrived
    assert deferred == 0
    # A token is renewed about once per lifetime, not once per connection or message: each burst's
    # 3 concurrent AUTHs share at most one request, and most bursts need none.
    assert lifetimes - 1 <= requests < len(sent.token_requests), sent.token_requests
    assert max(sent.token_requests) == 1, sent.token_requests
    assert auths == len(outcomes)
    assert hydra.issued() - issued_before == requests
    # Never a token, the client secret: not in logs, metrics or explain.
    assert code == 0
    assert "the password is an OAuth2 access token from policy it/hydra" in explained
    assert "cached token: expires in" in explained or "cached token: expired" in explained
    assert "outbound_relay_oauth2_token_expiry_seconds " in metrics
    for text in (caplog.text, metrics, explained):
        assert_no_secrets(text, client.secret)


async def test_rotated_refresh_tokens_across_lifetimes(
    hydra: Hydra, dovecot_hydra: DovecotSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    """Hydra rotates the refresh token at every use and refuses a used one: delivery over several
    lifetimes works only if the relay refreshes with the newest."""
    client = hydra.create_client(user_flow=True)
    refresh = hydra.refresh_token_for(client, subject="alice")
    (tmp_path / "refresh-token").write_text(refresh)
    policy = oauth2_policy(
        "it/delegated", hydra, dovecot_hydra, ca, user="alice",
        refreshTokenFile="refresh-token", **client_config(client, tmp_path),
    )  # fmt: skip
    config = write_config(
        tmp_path / "relay.yaml", {"upstream": {"idleTimeoutSeconds": 0.3}, "policies": [policy]}
    )
    async with running_relay(config) as relay:
        outcomes = (await send_bursts(relay, SHORT_TTL * 3.5)).outcomes
        requests = token_requests(relay)
        refused = token_requests(relay, "refused")
    failed = [o for o in outcomes if o.code != 250]
    assert not failed, f"{failed}\n{log_tail(dovecot_hydra.log_file)}"
    assert requests >= 3
    assert refused == 0
    # The refresh token in relay.yaml was used once, then replaced: Hydra no longer takes it.
    response = await asyncio.to_thread(
        httpx.post,
        hydra.token_url,
        data={"grant_type": "refresh_token", "refresh_token": refresh},
        auth=(client.id, client.secret),
        verify=ca.client_context(),
        trust_env=False,
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


async def test_revoked_token_is_replaced_and_auth_retried_once(
    hydra_long: Hydra, dovecot_hydra_long: DovecotSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    client = hydra_long.create_client()
    policy = oauth2_policy(
        "it/revoked", hydra_long, dovecot_hydra_long, ca, user=client.id, **client_config(client, tmp_path)
    )
    config = write_config(
        tmp_path / "relay.yaml", {"upstream": {"idleTimeoutSeconds": 0.3}, "policies": [policy]}
    )
    async with running_relay(config) as relay:
        first = await submit(relay.port, [unique()], message())
        await asyncio.sleep(0.8)  # the pooled session closes: the next message authenticates anew
        hydra_long.revoke_access_tokens(client)
        second = await submit(relay.port, [unique()], message())
        requests = token_requests(relay)
        failures = counter(
            relay,
            "outbound_relay_auth_attempts_total",
            mechanism="XOAUTH2",
            result="failure",
            policy="it/revoked",
        )
    assert (first.code, second.code) == (250, 250), (first, second)
    assert requests == 2  # the cached token, refused once, then a new one
    assert failures == 1
    dovecot_hydra_long.wait_for_log("Introspection failed: Provided token is not valid")


async def test_expired_token_is_refused_by_dovecot(
    hydra: Hydra, dovecot_hydra: DovecotSubmission, ca: TLSFiles
) -> None:
    """The validation the tests rely on is real: Dovecot refuses a Hydra token once it has expired."""
    import aiosmtplib

    client = hydra.create_client()
    token = hydra.client_credentials_token(client)

    async def auth() -> int:
        async with aiosmtplib.SMTP(
            hostname=dovecot_hydra.host, port=dovecot_hydra.port, tls_context=ca.client_context()
        ) as smtp:
            try:
                await auth_xoauth2(smtp, client.id, token)  # the relay's, for a token this long
            except aiosmtplib.SMTPAuthenticationError as error:
                return error.code
            return 235

    assert await auth() == 235
    await asyncio.sleep(SHORT_TTL + 1)
    assert await auth() == 535


@pytest.mark.parametrize("fault", ["endpoint down", "refused refresh token", "wrong client secret"])
async def test_token_failures_defer_naming_the_policy(
    hydra: Hydra, dovecot_hydra: DovecotSubmission, ca: TLSFiles, tmp_path: Path, fault: str
) -> None:
    client = hydra.create_client(user_flow=fault == "refused refresh token")
    oauth2: dict[str, Any] = client_config(client, tmp_path)
    policy = oauth2_policy("it/faulty", hydra, dovecot_hydra, ca, user=client.id, **oauth2)
    secret = client.secret
    if fault == "endpoint down":
        from tests.peers.common import free_port

        policy["oauth2"]["tokenUrl"] = f"https://127.0.0.1:{free_port()}/oauth2/token"
    elif fault == "refused refresh token":
        secret = "ory_rt_not-a-token-hydra-issued"
        policy["oauth2"]["refreshToken"] = secret
    else:
        (tmp_path / "client-secret").write_text("wrong-secret-value")
        secret = "wrong-secret-value"
    config = write_config(tmp_path / "relay.yaml", {"policies": [policy]})
    async with running_relay(config) as relay:
        first = await submit(relay.port, [unique()], message())
        second = await submit(relay.port, [unique()], message())  # within the retry delay: no request
        result = "unavailable" if fault == "endpoint down" else "refused"
        failed = token_requests(relay, result)
        deferred = counter(relay, "outbound_relay_messages_total", result="deferred")
    for outcome in (first, second):
        code, text = outcome.reply
        assert code == 454, outcome
        assert "4.7.0 OAuth2 token for policy it/faulty" in text
        if fault != "endpoint down":
            assert "the token endpoint refused (invalid_" in text
        assert secret not in text and client.secret not in text
    assert failed == 1
    assert deferred == 2


async def test_provider_makes_one_request_for_many_waiters(hydra: Hydra, tmp_path: Path) -> None:
    """The token provider on its own, against Hydra: 50 callers at once share one request; the token is
    then served from the cache until its renewal time; the redactor hears of every token."""
    from outbound_relay.config import parse_config

    client = hydra.create_client()
    data = {"policies": [{"name": "p/one", "type": "XOAUTH2", "oauth2": {
        "tokenUrl": hydra.token_url, "clientId": client.id, "clientSecret": client.secret,
        "scopes": ["smtp"], "caFile": str(hydra.ca_file)}}]}  # fmt: skip
    config = parse_config(data)
    route = ScopeIndex(config).route("a.test", "default")
    assert route.oauth2 is not None
    source: OAuth2Source = route.oauth2.value
    published: list[list[str]] = []
    provider = TokenProvider(RelayMetrics(), on_secrets=lambda s: published.append(list(s)))
    tokens = await asyncio.gather(*(provider.token(source) for _ in range(50)))
    assert len({t.value for t in tokens}) == 1
    assert provider.requests(source) == 1
    assert sum(t.fetched for t in tokens) == 1
    again = await provider.token(source)
    assert (again.value, again.fetched, provider.requests(source)) == (tokens[0].value, False, 1)
    assert published[-1] == [tokens[0].value]
    # Refused by an upstream: a new one, once, however many report the same refused token.
    renewed = await asyncio.gather(*(provider.token(source, refused=again.value) for _ in range(5)))
    assert provider.requests(source) == 2
    assert len({t.value for t in renewed}) == 1 and renewed[0].value != again.value
    provider.retain([])
    assert published[-1] == []
    bad = OAuth2Source("p/bad", source.settings.model_copy(update={"client_id": "no-such-client"}))
    with pytest.raises(TokenUnavailable, match=r"OAuth2 token for policy p/bad .* refused"):
        await provider.token(bad)
    await provider.close()


async def test_reload_keeps_the_token_unless_its_source_changes(
    hydra_long: Hydra, dovecot_hydra_long: DovecotSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    client = hydra_long.create_client(scopes=("smtp", "other"))
    policy = oauth2_policy(
        "it/reload", hydra_long, dovecot_hydra_long, ca, user=client.id, **client_config(client, tmp_path)
    )
    path = tmp_path / "relay.yaml"
    write_config(path, {"upstream": {"idleTimeoutSeconds": 0.3}, "policies": [policy]})

    async def reload(change: dict[str, Any]) -> None:
        reloads = counter(relay, "outbound_relay_config_reloads_total", result="success")
        write_config(path, {"upstream": {"idleTimeoutSeconds": 0.3}, "policies": [{**policy, **change}]})
        deadline = time.monotonic() + 10
        while counter(relay, "outbound_relay_config_reloads_total", result="success") == reloads:
            assert time.monotonic() < deadline, "no reload"
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # and the pooled session closes: the next message authenticates anew

    async with running_relay(path) as relay:
        codes = [(await submit(relay.port, [unique()], message())).code]
        await reload({"maxConnections": 2})  # not the token's source: the cached token stays
        codes.append((await submit(relay.port, [unique()], message())).code)
        kept = token_requests(relay)
        await reload({"oauth2": {**policy["oauth2"], "scopes": ["smtp", "other"]}})  # a new source
        codes.append((await submit(relay.port, [unique()], message())).code)
        renewed = token_requests(relay)
    assert codes == [250, 250, 250]
    assert (kept, renewed) == (1, 2)
