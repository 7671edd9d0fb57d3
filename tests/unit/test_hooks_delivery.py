"""Hooks in the delivery path: the seed's Lua example end to end, precedence over scopes, failures."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from tests.peers.certs import TLSFiles
from tests.support.relay import message, running_relay, submit, write_config
from tests.support.seed import SEED_LUA, SEED_TOKEN, SEED_USER
from tests.support.upstream import AuthUpstream


def scoped(port: int, tls: TLSFiles, **settings: Any) -> dict[str, Any]:
    return {
        "name": "global",
        "gateway": {"host": "127.0.0.1", "port": port},
        "tls": {"caFile": str(tls.ca_file)},
        **settings,
    }


async def test_seed_lua_example_switches_to_xoauth2(tls: TLSFiles, config_path: Path) -> None:
    (config_path.parent / "auth.lua").write_text(SEED_LUA)
    async with AuthUpstream(tls, users={"scoped": "scoped-pw"}, tokens={SEED_USER: SEED_TOKEN}) as up:
        write_config(
            config_path,
            {
                "policies": [scoped(up.port, tls, type="PLAIN", user="scoped", password="scoped-pw")],
                "hooks": {"lua": ["auth.lua"]},
            },
        )
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["someone@bird.com"], message())
            metrics = relay.metrics.render().decode()
    assert outcome.code == 250, outcome
    assert up.auth_log == [("XOAUTH2", SEED_USER, True)]
    # The hook's token is no policy's: the AUTH metrics say so.
    assert 'auth_attempts_total{mechanism="XOAUTH2",policy="hook",result="success"} 1.0' in metrics
    assert up.received[0].mechanism == "XOAUTH2"
    assert up.received[0].login == SEED_USER


async def test_unset_context_keys_fall_back_to_scope(tls: TLSFiles, config_path: Path) -> None:
    # The hook only changes the user; type and password still come from the scope.
    (config_path.parent / "user.lua").write_text(
        textwrap.dedent(
            """\
            local mod = {}
            function mod:outbound_smtp_auth_config(msg)
              if msg:header("X-Tenant") == "blue" then
                msg:context_set(VCTX_MESS, 'outbound_smtp_auth_user', 'blue-user')
              end
            end
            msys.registerModule("tenant", mod)
            """
        )
    )
    async with AuthUpstream(tls, users={"scoped": "pw", "blue-user": "pw"}) as up:
        write_config(
            config_path,
            {
                "policies": [scoped(up.port, tls, type="LOGIN", user="scoped", password="pw")],
                "hooks": {"lua": ["user.lua"]},
            },
        )
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["a@x.org"], message(headers={"X-Tenant": "blue"}))).code == 250
            assert (await submit(relay.port, ["b@x.org"], message())).code == 250
    assert up.auth_log == [("LOGIN", "blue-user", True), ("LOGIN", "scoped", True)]


async def test_hook_binding_selects_the_scope(tls: TLSFiles, config_path: Path) -> None:
    (config_path.parent / "bind.lua").write_text(
        'local m = {}\nfunction m:outbound_smtp_auth_config(msg) msg:binding("bulk") end\n'
        'msys.registerModule("b", m)\n'
    )
    async with AuthUpstream(tls, users={"scoped": "pw", "bulk-user": "bulk-pw"}) as up:
        write_config(
            config_path,
            {
                "policies": [
                    scoped(up.port, tls, type="PLAIN", user="scoped", password="pw"),
                    {
                        "name": "bulk",
                        "scope": {"binding": "bulk"},
                        "user": "bulk-user",
                        "password": "bulk-pw",
                    },
                ],
                "hooks": {"lua": ["bind.lua"]},
            },
        )
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
    assert up.auth_log == [("PLAIN", "bulk-user", True)]


async def test_failing_hook_defers_and_is_counted(tls: TLSFiles, config_path: Path) -> None:
    (config_path.parent / "loop.lua").write_text(
        "local m = {}\nfunction m:outbound_smtp_auth_config(msg) while true do end end\n"
        'msys.registerModule("l", m)\n'
    )
    (config_path.parent / "badtype.lua").write_text(
        "local m = {}\nfunction m:outbound_smtp_auth_config(msg)\n"
        "  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_type', 'CRAM-MD5')\nend\n"
        'msys.registerModule("t", m)\n'
    )
    async with AuthUpstream(tls, users={"scoped": "pw"}) as up:
        for hook, kind in (("loop.lua", "timeout"), ("badtype.lua", "error")):
            write_config(
                config_path,
                {
                    "policies": [scoped(up.port, tls, type="PLAIN", user="scoped", password="pw")],
                    "hooks": {"lua": [hook], "timeoutMs": 20},
                },
            )
            async with running_relay(config_path) as relay:
                outcome = await submit(relay.port, ["a@x.org"], message())
                metrics = relay.metrics.render().decode()
            assert outcome.code == 451, outcome
            assert outcome.data_reply is not None and outcome.data_reply[1].startswith("4.3.0")
            assert f'outbound_relay_hook_errors_total{{kind="{kind}"}} 1.0' in metrics
    assert up.received == []


async def test_python_hook(tls: TLSFiles, config_path: Path, monkeypatch: Any) -> None:
    (config_path.parent / "tenant_hooks.py").write_text(
        "from outbound_relay.hooks import VCTX_MESS\n\n"
        "def outbound_smtp_auth_config(msg):\n"
        "    msg.context_set(VCTX_MESS, 'outbound_smtp_auth_pass', 'from-python')\n"
    )
    monkeypatch.syspath_prepend(str(config_path.parent))
    async with AuthUpstream(tls, users={"scoped": "from-python"}) as up:
        write_config(
            config_path,
            {
                "policies": [scoped(up.port, tls, type="PLAIN", user="scoped", password="not-this")],
                "hooks": {"python": ["tenant_hooks:outbound_smtp_auth_config"]},
            },
        )
        async with running_relay(config_path) as relay:
            assert (await submit(relay.port, ["a@x.org"], message())).code == 250
    assert up.auth_log == [("PLAIN", "scoped", True)]
