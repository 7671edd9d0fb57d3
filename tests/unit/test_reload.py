"""Hot reload: a new config takes effect, a bad one is refused, a transaction keeps its config."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from outbound_relay.config import ClientAuth, parse_config
from outbound_relay.generation import Generation, Overrides
from outbound_relay.server import RelayServer
from tests.peers.certs import TLSFiles
from tests.support.relay import message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream


def policy(port: int, tls: TLSFiles, **extra: Any) -> dict[str, Any]:
    return {
        "name": "p",
        "type": "PLAIN",
        "user": "u",
        "gateway": {"host": "127.0.0.1", "port": port},
        "tls": {"caFile": str(tls.ca_file)},
        **extra,
    }


async def wait_for_generation(relay: RelayServer, old: str, timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while relay.generation.digest == old:
            await asyncio.sleep(0.02)


async def test_changed_file_is_picked_up(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "one", "v": "two"}) as up:
        write_config(config_path, {"policies": [policy(up.port, tls, password="one")]})
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
            old = relay.generation.digest
            write_config(config_path, {"policies": [policy(up.port, tls, user="v", password="two")]})
            await wait_for_generation(relay, old)
            assert (await submit(relay.port, ["b@x.org"], message())).code == 250
            metrics = relay.metrics.render().decode()
    assert [r.login for r in up.received] == ["u", "v"]
    assert 'outbound_relay_config_reloads_total{result="success"} 1.0' in metrics
    assert f'outbound_relay_config_info{{generation="{relay.generation.short_digest}"}} 1.0' in metrics
    assert metrics.count("outbound_relay_config_info{") == 1


async def test_bad_file_is_rejected_and_last_good_config_stays(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "one"}) as up:
        write_config(config_path, {"policies": [policy(up.port, tls, password="one")]})
        async with running_relay(config_path) as relay:
            good = relay.generation.digest
            config_path.write_text("policies: [{name: p, type: NOPE}]")
            async with asyncio.timeout(5):
                while 'result="failure"} 1.0' not in relay.metrics.render().decode():
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # several more polls: the same bad file is counted once
            assert relay.generation.digest == good
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
            metrics = relay.metrics.render().decode()
    assert 'outbound_relay_config_reloads_total{result="failure"} 1.0' in metrics


async def test_kubelet_symlink_swap_is_seen(tls: TLSFiles, tmp_path: Path) -> None:
    """A mounted Secret: relay.yaml -> ..data/relay.yaml -> ..<timestamp>/; the kubelet swaps ..data."""
    mount = tmp_path / "mount"
    mount.mkdir()

    def project(name: str, config: dict[str, Any]) -> None:
        version = mount / name
        version.mkdir()
        write_config(version / "relay.yaml", config)
        (mount / "..data_tmp").symlink_to(name)
        os.replace(mount / "..data_tmp", mount / "..data")  # atomic, as the kubelet does

    async with AuthUpstream(tls, users={"u": "one", "w": "three"}) as up:
        project("..2026_11_25_a", {"policies": [policy(up.port, tls, password="one")]})
        (mount / "relay.yaml").symlink_to("..data/relay.yaml")
        async with running_relay(mount / "relay.yaml") as relay:
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
            old = relay.generation.digest
            project("..2026_11_25_b", {"policies": [policy(up.port, tls, user="w", password="three")]})
            await wait_for_generation(relay, old)
            assert (await submit(relay.port, ["b@x.org"], message())).code == 250
    assert [r.login for r in up.received] == ["u", "w"]


async def test_password_file_rotation(tls: TLSFiles, config_path: Path) -> None:
    secret = config_path.parent / "password"
    secret.write_text("one")
    async with AuthUpstream(tls, users={"u": "one"}) as up:
        write_config(config_path, {"policies": [policy(up.port, tls, passwordFile="password")]})
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
            up.state.users["u"] = "two"  # the upstream rotates first; our password file follows
            old = relay.generation.digest
            secret.write_text("two")
            await wait_for_generation(relay, old)
            assert (await submit(relay.port, ["b@x.org"], message())).code == 250
    assert len(up.received) == 2
    assert [ok for _, _, ok in up.auth_log] == [True, True]


async def test_transaction_in_flight_keeps_its_config(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "one"}) as up:
        write_config(config_path, {"policies": [policy(up.port, tls, password="one")]})
        async with running_relay(config_path) as relay:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False) as client:
                await client.mail("app@example.org")
                await client.rcpt("a@x.org")
                old = relay.generation.digest
                write_config(config_path, {"policies": [policy(up.port, tls, password="not-valid")]})
                await wait_for_generation(relay, old)
                response = await client.data(message())
            assert response.code == 250
            later = await submit(relay.port, ["b@x.org"], message())
    assert later.code == 454
    assert len(up.received) == 1


async def test_reload_does_not_move_the_listener(tls: TLSFiles, config_path: Path, caplog: Any) -> None:
    write_config(config_path, {})
    async with running_relay(config_path) as relay:
        port = relay.port
        data = yaml.safe_load(config_path.read_text())
        data["listen"]["port"] = port + 1
        config_path.write_text(yaml.safe_dump(data))
        assert await relay.reload()
        assert relay.port == port
    assert "change only on restart" in caplog.text


async def test_default_binding_override_survives_reload(tls: TLSFiles, config_path: Path) -> None:
    """`serve --default-binding` (the Pod's binding annotation) beats defaultBinding, also after a reload."""
    async with AuthUpstream(tls, users={"u": "one", "tx": "two"}) as up:
        policies = [
            policy(up.port, tls, password="one"),
            {"name": "tx", "scope": {"binding": "transactional"}, "user": "tx", "password": "two"},
        ]
        write_config(config_path, {"policies": policies})
        server = RelayServer(
            Generation.load(config_path, Overrides(default_binding="transactional")),
            config_path=config_path,
            reload_interval=0.05,
            overrides=Overrides(default_binding="transactional"),
        )
        await server.start()
        try:
            assert (await submit(server.port, ["a@x.org"], message())).code == 250
            old = server.generation.digest
            write_config(config_path, {"defaultBinding": "other", "policies": policies})
            await wait_for_generation(server, old)
            assert server.generation.config.default_binding == "transactional"
            assert (await submit(server.port, ["b@x.org"], message())).code == 250
        finally:
            await server.stop(grace_seconds=5)
    assert [r.login for r in up.received] == ["tx", "tx"]


async def test_refused_config_is_retried_when_its_missing_file_appears(
    tls: TLSFiles, config_path: Path
) -> None:
    async with AuthUpstream(tls, users={"u": "one", "v": "two"}) as up:
        write_config(config_path, {"policies": [policy(up.port, tls, password="one")]})
        async with running_relay(config_path) as relay:
            old = relay.generation.digest
            # The new config names a password file that its Secret has not delivered yet.
            write_config(config_path, {"policies": [policy(up.port, tls, user="v", passwordFile="pw.txt")]})
            async with asyncio.timeout(5):
                while 'result="failure"} 1.0' not in relay.metrics.render().decode():
                    await asyncio.sleep(0.02)
            (config_path.parent / "pw.txt").write_text("two")
            await wait_for_generation(relay, old)
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
    assert [r.login for r in up.received] == ["v"]


async def test_edited_lua_hook_is_reloaded(tls: TLSFiles, config_path: Path) -> None:
    hook = config_path.parent / "auth.lua"

    def set_user(user: str) -> None:
        hook.write_text(
            "local m = {}\nfunction m:outbound_smtp_auth_config(msg)\n"
            f"  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_user', '{user}')\nend\n"
            'msys.registerModule("m", m)\n'
        )

    set_user("u")
    async with AuthUpstream(tls, users={"u": "one", "v": "one"}) as up:
        write_config(
            config_path, {"policies": [policy(up.port, tls, password="one")], "hooks": {"lua": ["auth.lua"]}}
        )
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
            old = relay.generation.digest
            set_user("v")
            await wait_for_generation(relay, old)
            assert (await submit(relay.port, ["b@x.org"], message())).code == 250
    assert [r.login for r in up.received] == ["u", "v"]


async def test_missing_config_defers_mail_until_it_appears(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "one"}) as up:
        server = RelayServer(
            Generation.waiting_for(config_path), config_path=config_path, reload_interval=0.05
        )
        await server.start()
        try:
            waiting = await submit(server.port, ["a@x.org"], message())
            old = server.generation.digest
            write_config(
                config_path,
                {"listen": {"port": server.port}, "policies": [policy(up.port, tls, password="one")]},
            )
            await wait_for_generation(server, old)
            delivered = await submit(server.port, ["b@x.org"], message())
        finally:
            await server.stop(grace_seconds=5)
    assert waiting.data_reply is not None
    assert waiting.data_reply[0] == 451
    assert "has no config yet" in waiting.data_reply[1]
    assert delivered.code == 250


def test_overrides_beat_the_file() -> None:
    config = parse_config(
        {"defaultBinding": "x", "metrics": {"port": 9425}, "listen": {"clientAuth": "none"}}
    )
    applied = Overrides(default_binding="tx", metrics_port=9500, client_auth=ClientAuth.BINDING).apply(config)
    assert (applied.default_binding, applied.metrics.port) == ("tx", 9500)
    assert applied.listen.client_auth is ClientAuth.BINDING
    assert Overrides().apply(config) == config


async def test_generation_label_does_not_expose_the_config_digest(config_path: Path) -> None:
    write_config(config_path, {"policies": [{"name": "p", "password": "weak"}]})
    generation = Generation.load(config_path)
    assert generation.short_digest not in generation.digest
    assert len(generation.short_digest) == 12
