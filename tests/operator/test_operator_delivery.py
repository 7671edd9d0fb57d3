"""End to end: policies and Secrets in, a relay reading the projected Secret out, mail delivered.

The relay runs in the test's loop (RelayServer, as `outbound-relay serve` runs it) on the rendered
relay.yaml projected by the kubelet stand-in; only its listen port is moved to a free one, since
tests run side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from kubernetes import client

from outbound_operator.render import ca_key
from outbound_operator.resources import RENDERED_SECRET
from outbound_relay.config import ListenConfig, MetricsConfig
from outbound_relay.generation import Generation
from outbound_relay.server import RelayServer
from tests.operator.cluster import Objects
from tests.operator.conftest import StartOperator
from tests.operator.kubelet import projected_secret
from tests.peers.certs import TLSFiles
from tests.support.relay import message, submit
from tests.support.upstream import AuthUpstream

# The seed's three domains (seed/outbound_smtp_auth.md), one policy and one Secret each.
SEED = {
    "messagesystems": ("messagesystems.com", "LOGIN", "msys", "msys"),
    "sparkpost": ("sparkpost.com", "PLAIN", "sparkpost", "sparkpost"),
    "bird": (
        "bird.com",
        "XOAUTH2",
        "test@contoso.onmicrosoft.com",
        "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
    ),
}


def upstream_settings(port: int) -> dict[str, Any]:
    return {
        "gateway": {"host": "127.0.0.1", "port": port},
        "tls": {"mode": "starttls", "caSecretRef": {"name": "upstream-ca", "key": "ca.crt"}},
    }


@contextlib.asynccontextmanager
async def relay_on(config: Path) -> AsyncIterator[RelayServer]:
    generation = Generation.load(config)
    local = generation.config.model_copy(
        update={"listen": ListenConfig(port=0), "metrics": MetricsConfig(enabled=False)}
    )
    server = RelayServer(
        dataclasses.replace(generation, config=local), config_path=config, reload_interval=0.05
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_seconds=5)


async def eventually(check: Any, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.05)


async def test_seed_domains_are_rendered_and_delivered(
    objects: Objects,
    start_operator: StartOperator,
    k8s_client: client.ApiClient,
    tls: TLSFiles,
    tmp_path: Path,
) -> None:
    ns = objects.namespace
    users = {user: secret for _, kind, user, secret in SEED.values() if kind != "XOAUTH2"}
    tokens = {user: secret for _, kind, user, secret in SEED.values() if kind == "XOAUTH2"}
    async with AuthUpstream(tls, users=users, tokens=tokens) as up:
        objects.put_secret("upstream-ca", {"ca.crt": tls.ca_file.read_bytes()})
        for name, (domain, kind, user, secret) in SEED.items():
            objects.put_secret(f"{name}-smtp", {"password": secret})
            objects.apply_policy(
                name,
                {
                    "scope": {"domain": domain},
                    "type": kind,
                    "user": user,
                    "passwordSecretRef": {"name": f"{name}-smtp", "key": "password"},
                    **upstream_settings(up.port),
                },
            )
        operator = start_operator()
        for name in SEED:
            await asyncio.to_thread(objects.wait_condition, name, "Ready", "True")

        rendered = objects.rendered_policies()
        assert {
            name: (p["scope"]["domain"], p["type"], p["user"], p["password"]) for name, p in rendered.items()
        } == {f"{ns}/{name}": seed for name, seed in SEED.items()}
        # The three policies share one CA: it is stored once.
        assert sorted(objects.rendered_data()) == [ca_key(tls.ca_file.read_bytes()), "relay.yaml"]

        async with (
            projected_secret(k8s_client, ns, RENDERED_SECRET, tmp_path / "mount") as mount,
            relay_on(mount / "relay.yaml") as relay,
        ):
            for domain, *_ in SEED.values():
                outcome = await submit(relay.port, [f"someone@{domain}"], message(f"to {domain}"))
                assert outcome.code == 250, outcome

    assert [(r.rcpt_tos[0].split("@")[1], r.mechanism, r.login) for r in up.received] == [
        (domain, kind, user) for domain, kind, user, _ in SEED.values()
    ]
    logs = operator.logs() + operator.metrics()
    for *_, secret in SEED.values():
        assert secret not in logs
    scopes = {item["status"]["resolvedScope"] for item in objects.policies()}
    assert scopes == {f"domain={domain}" for domain, *_ in SEED.values()}


async def test_rotation_reaches_the_relay_and_spares_mail_in_flight(
    objects: Objects,
    start_operator: StartOperator,
    k8s_client: client.ApiClient,
    tls: TLSFiles,
    tmp_path: Path,
) -> None:
    ns = objects.namespace
    async with AuthUpstream(tls, users={"u": "old-pw"}) as up:
        objects.put_secret("upstream-ca", {"ca.crt": tls.ca_file.read_bytes()})
        objects.put_secret("smtp", {"password": "old-pw"})
        objects.apply_policy(
            "global",
            {"type": "PLAIN", "user": "u", "passwordSecretRef": {"name": "smtp", "key": "password"}}
            | upstream_settings(up.port),
        )
        start_operator()
        await asyncio.to_thread(objects.wait_condition, "global", "Ready", "True")

        async with (
            projected_secret(k8s_client, ns, RENDERED_SECRET, tmp_path / "mount") as mount,
            relay_on(mount / "relay.yaml") as relay,
        ):
            assert (await submit(relay.port, ["a@example.com"], message("before"))).code == 250

            # A message in the middle of its upstream DATA while the password rotates.
            up.state.data_delay = 1.5
            in_flight = asyncio.create_task(submit(relay.port, ["b@example.com"], message("in flight")))
            await eventually(lambda: up.state.connections >= 1 and relay.open_transactions() == 1)
            await asyncio.sleep(0.2)
            generation = relay.generation.digest

            up.state.users["u"] = "new-pw"  # the provider rotates; the Secret follows
            changed = time.monotonic()
            objects.put_secret("smtp", {"password": "new-pw"})
            await eventually(lambda: relay.generation.digest != generation)
            reload_seconds = time.monotonic() - changed
            up.state.data_delay = 0

            assert (await in_flight).code == 250
            after = await submit(relay.port, ["c@example.com"], message("after"))
            assert after.code == 250, after

    assert [r.content.split(b"Subject: ")[1].split(b"\r\n")[0] for r in up.received] == [
        b"before",
        b"in flight",
        b"after",
    ]
    assert up.auth_log[-1] == ("PLAIN", "u", True)
    assert all(ok for _, _, ok in up.auth_log)
    print(f"Secret change to relay reload: {reload_seconds:.2f}s")
    assert reload_seconds < 10


async def test_missing_secret_defers_its_scope_instead_of_falling_back(
    objects: Objects,
    start_operator: StartOperator,
    k8s_client: client.ApiClient,
    tls: TLSFiles,
    tmp_path: Path,
) -> None:
    ns = objects.namespace
    async with AuthUpstream(tls, users={"global": "global-pw", "sparkpost": "sparkpost-pw"}) as up:
        objects.put_secret("upstream-ca", {"ca.crt": tls.ca_file.read_bytes()})
        objects.put_secret("global-smtp", {"password": "global-pw"})
        for name, scope in (("global", {}), ("sparkpost", {"domain": "sparkpost.com"})):
            objects.apply_policy(
                name,
                {
                    "scope": scope,
                    "type": "PLAIN",
                    "user": name,
                    "passwordSecretRef": {"name": f"{name}-smtp", "key": "password"},
                    **upstream_settings(up.port),
                },
            )
        start_operator()
        await asyncio.to_thread(objects.wait_condition, "sparkpost", "SecretMissing", "True")

        async with (
            projected_secret(k8s_client, ns, RENDERED_SECRET, tmp_path / "mount") as mount,
            relay_on(mount / "relay.yaml") as relay,
        ):
            deferred = await submit(relay.port, ["a@sparkpost.com"], message("deferred"))
            assert deferred.code == 451, deferred
            assert f"Secret {ns}/sparkpost-smtp not found" in deferred.reply[1]
            assert (await submit(relay.port, ["b@example.com"], message("global"))).code == 250

            generation = relay.generation.digest
            objects.put_secret("sparkpost-smtp", {"password": "sparkpost-pw"})
            await eventually(lambda: relay.generation.digest != generation)
            assert (await submit(relay.port, ["a@sparkpost.com"], message("retried"))).code == 250

    assert [(r.rcpt_tos, r.login) for r in up.received] == [
        (("b@example.com",), "global"),
        (("a@sparkpost.com",), "sparkpost"),
    ]
