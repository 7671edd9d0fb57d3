"""OutboundRelaySettings on the real API server: relay-wide settings and Lua hooks from ConfigMaps, rendered
into the namespace's Secret beside relay.yaml, checked with the relay's own loader first, and run by a
relay started from the rendered files."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from outbound_operator.resources import RENDERED_SECRET, SETTINGS_PLURAL
from outbound_relay.config import load_config
from tests.operator.cluster import REPO, Objects, call_json, wait_for
from tests.operator.conftest import StartOperator
from tests.operator.kubelet import projected_secret
from tests.operator.test_operator_delivery import relay_on, upstream_settings
from tests.peers.certs import TLSFiles
from tests.support.relay import message, submit
from tests.support.seed import SEED_LUA, SEED_TOKEN, SEED_USER
from tests.support.upstream import AuthUpstream

HOOK_KEY = "hook-relay-hooks-auth.lua"  # the rendered Secret's key for ConfigMap relay-hooks, key auth.lua
HOOKS_SPEC = {"hooks": {"lua": [{"configMapRef": {"name": "relay-hooks", "key": "auth.lua"}}]}}
# Line 4 leaves a call open: Lua reports it where it gives up, at the `end` of line 5.
BROKEN_LUA = """\
local mod = {}
function mod:outbound_smtp_auth_config(msg)
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_type', 'XOAUTH2'
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_user', 'broken@contoso.onmicrosoft.com')
end
msys.registerModule("my_auth", mod)
"""


def settings_condition(objects: Objects, kind: str, status: str) -> dict[str, Any]:
    return objects.wait_condition("default", kind, status, plural=SETTINGS_PLURAL)


def transcript(up: AuthUpstream) -> str:
    """What the upstream saw of each XOAUTH2 AUTH, as a reader of the closing note wants it."""
    lines = []
    for blob, (mechanism, user, ok) in zip(up.state.xoauth2, up.auth_log, strict=True):
        initial = base64.b64encode(blob).decode()
        lines.append(f"C: AUTH {mechanism} {initial}")
        lines.append(f"   (decoded: {blob.decode().replace(chr(1), '^A')})")
        lines.append(f"   upstream's verdict: mechanism={mechanism} user={user} token matches={ok}")
    return "\n".join(lines)


async def test_the_seed_lua_hook_from_a_config_map_authenticates_upstream(
    objects: Objects,
    start_operator: StartOperator,
    k8s_client: client.ApiClient,
    tls: TLSFiles,
    tmp_path: Path,
) -> None:
    """Momentum's example hook, verbatim, in a ConfigMap; the policy gives only the gateway: the user,
    the token and XOAUTH2 all come from the hook, run by a relay that loads it from the rendered Secret."""
    async with AuthUpstream(tls, tokens={SEED_USER: SEED_TOKEN}) as up:
        objects.put_secret("upstream-ca", {"ca.crt": tls.ca_file.read_bytes()})
        objects.put_config_map("relay-hooks", {"auth.lua": SEED_LUA})
        objects.apply_policy("gateway", upstream_settings(up.port))
        objects.apply_settings(HOOKS_SPEC)
        operator = start_operator()
        ready = await asyncio.to_thread(settings_condition, objects, "Ready", "True")
        await asyncio.to_thread(objects.wait_condition, "gateway", "Ready", "True")
        assert "1 hook file(s)" in ready["message"]

        data = objects.rendered_data()
        assert data[HOOK_KEY] == SEED_LUA.encode()
        assert objects.relay_yaml()["hooks"] == {"lua": [HOOK_KEY]}
        assert objects.get("default", SETTINGS_PLURAL)["status"]["hooks"] == [HOOK_KEY]
        owners = {o["kind"] for o in objects.rendered()["metadata"]["ownerReferences"]}  # type: ignore[index]
        assert owners == {"OutboundAuthPolicy", "OutboundRelaySettings"}

        async with (
            projected_secret(k8s_client, objects.namespace, RENDERED_SECRET, tmp_path / "mount") as mount,
            relay_on(mount / "relay.yaml") as relay,
        ):
            assert relay.generation.hooks is not None
            assert relay.generation.hooks.names == (f"lua {HOOK_KEY} (module my_auth)",)
            outcome = await submit(relay.port, ["someone@bird.com"], message("through the hook"))
            assert outcome.code == 250, outcome

    print("\nWhat the aiosmtpd upstream saw:\n" + transcript(up))
    assert up.auth_log == [("XOAUTH2", SEED_USER, True)]
    assert f"user={SEED_USER}\x01auth=Bearer {SEED_TOKEN}\x01\x01".encode() in up.state.xoauth2
    assert [(r.mechanism, r.login) for r in up.received] == [("XOAUTH2", SEED_USER)]
    # The token is in the hook's source, which is in the Secret: it must not leak from there.
    assert SEED_TOKEN not in operator.logs() + operator.metrics()


async def test_a_broken_hook_keeps_the_last_good_one_in_force(
    objects: Objects, start_operator: StartOperator
) -> None:
    """A changed ConfigMap re-renders; one whose Lua fails to load is refused with its file and line, the
    Secret keeps the last good hook and relay.yaml, and the fixed source is rendered again."""
    objects.put_secret("smtp", {"password": "pw"})
    objects.apply_policy(
        "global", {"type": "PLAIN", "user": "u", "passwordSecretRef": {"name": "smtp", "key": "password"}}
    )
    objects.put_config_map("relay-hooks", {"auth.lua": SEED_LUA})
    objects.apply_settings(HOOKS_SPEC)
    operator = start_operator()
    await asyncio.to_thread(settings_condition, objects, "Ready", "True")
    assert objects.rendered_data()[HOOK_KEY] == SEED_LUA.encode()

    # A valid change of the ConfigMap reaches the Secret.
    changed = SEED_LUA.replace("test@contoso", "changed@contoso")
    objects.put_config_map("relay-hooks", {"auth.lua": changed})
    await _wait_rendered(objects, changed)
    good_yaml = objects.rendered_data()["relay.yaml"]

    objects.put_config_map("relay-hooks", {"auth.lua": BROKEN_LUA})
    invalid = await asyncio.to_thread(settings_condition, objects, "Invalid", "True")
    ready = objects.condition("default", "Ready", plural=SETTINGS_PLURAL)
    print(f"\nReady={ready['status']} reason={ready['reason']}: {ready['message']}")
    assert invalid["reason"] == ready["reason"] == "HookInvalid"
    where = f"spec.hooks.lua[0] (ConfigMap {objects.namespace}/relay-hooks key 'auth.lua')"
    assert invalid["message"].startswith(f"{where}: Lua syntax error: relay-hooks/auth.lua:4:"), invalid
    assert f"hooks in force: {HOOK_KEY}" in ready["message"]
    data = objects.rendered_data()
    assert data[HOOK_KEY] == changed.encode() and data["relay.yaml"] == good_yaml
    assert objects.get("default", SETTINGS_PLURAL)["status"]["hooks"] == [HOOK_KEY]
    # The Event follows the status patch: wait for it.
    wait_for(
        lambda: any(
            kind == "Warning" and reason == "HookInvalid" and "relay-hooks/auth.lua:4:" in text
            for kind, reason, text in objects.events("default")
        ),
        what="the HookInvalid Event",
    )

    # A file that compiles but registers no hook fails as it would in the relay.
    # Its top level's print is not logged by the operator (a hook may print a token).
    objects.put_config_map("relay-hooks", {"auth.lua": "print('top-level-marker')\nlocal x = 1\n"})
    await asyncio.to_thread(
        objects.wait_for_message, "default", "registers no outbound_smtp_auth_config hook", SETTINGS_PLURAL
    )
    assert objects.rendered_data()[HOOK_KEY] == changed.encode()

    fixed = SEED_LUA.replace("test@contoso", "fixed@contoso")
    objects.put_config_map("relay-hooks", {"auth.lua": fixed})
    await asyncio.to_thread(settings_condition, objects, "Ready", "True")
    await _wait_rendered(objects, fixed)
    assert objects.condition("default", "Invalid", plural=SETTINGS_PLURAL)["status"] == "False"
    assert "top-level-marker" not in operator.logs()


async def _wait_rendered(objects: Objects, source: str) -> None:
    async with asyncio.timeout(30):
        while objects.rendered_data().get(HOOK_KEY) != source.encode():
            await asyncio.sleep(0.05)


async def test_a_missing_config_map_is_named_and_rendered_once_it_exists(
    objects: Objects, start_operator: StartOperator
) -> None:
    objects.put_secret("smtp", {"password": "pw"})
    objects.apply_policy(
        "global", {"type": "PLAIN", "user": "u", "passwordSecretRef": {"name": "smtp", "key": "password"}}
    )
    objects.apply_settings(HOOKS_SPEC | {"defaultBinding": "bulk"})
    start_operator()
    missing = await asyncio.to_thread(settings_condition, objects, "ConfigMapMissing", "True")
    assert missing["reason"] == "ConfigMapNotFound"
    assert missing["message"] == f"spec.hooks.lua[0]: ConfigMap {objects.namespace}/relay-hooks not found"
    # Nothing was ever good: the relay keeps its defaults and no hook (the policies still render).
    assert "hooks" not in objects.relay_yaml() and "defaultBinding" not in objects.relay_yaml()
    assert objects.rendered_policies()

    objects.put_config_map("relay-hooks", {"other.lua": SEED_LUA})
    missing = await asyncio.to_thread(
        objects.wait_for_message, "default", "has no key 'auth.lua'", SETTINGS_PLURAL
    )
    objects.put_config_map("relay-hooks", {"auth.lua": SEED_LUA})
    await asyncio.to_thread(settings_condition, objects, "Ready", "True")
    assert objects.relay_yaml()["defaultBinding"] == "bulk"
    assert objects.rendered_data()[HOOK_KEY] == SEED_LUA.encode()


def test_only_the_name_default_is_admitted(objects: Objects, control_plane: Any) -> None:
    with pytest.raises(client.exceptions.ApiException) as raised:
        objects.apply_settings({}, name="other")
    assert raised.value.status == 422
    message = json.loads(str(raised.value.body))["message"]
    assert "an OutboundRelaySettings must be named 'default'" in message
    with pytest.raises(client.exceptions.ApiException) as raised:
        objects.apply_settings({"limits": {"messageSizeBytes": 1000}})
    assert (
        "spec.limits.messageSizeBytes: Invalid value: 1000" in json.loads(str(raised.value.body))["message"]
    )
    objects.apply_settings({})
    listed = control_plane.kubectl("get", "ors", "-n", objects.namespace)
    assert listed.split("\n")[0].split() == ["NAME", "READY", "REASON", "HOOKS", "AGE"]
    assert listed.split("\n")[1].startswith("default ")


async def test_limits_timeouts_and_binding_reach_relay_yaml(
    objects: Objects, start_operator: StartOperator, k8s_client: client.ApiClient, tmp_path: Path
) -> None:
    spec = {
        "defaultBinding": "bulk",
        "bindingHeader": "X-Mail-Binding",
        "hooks": {"python": ["mycompany.tokens:outbound_smtp_auth_config"], "timeoutMs": 200},
        "upstream": {
            "connectTimeoutSeconds": 5,
            "timeoutSeconds": 30.5,
            "idleTimeoutSeconds": 15,
            "dataTimeoutSeconds": 900,
            "defaultMaxConnections": 2,
        },
        "limits": {"messageSizeBytes": 20971520, "recipientsPerTransaction": 50, "sessions": 20},
    }
    objects.apply_settings(spec)
    start_operator()
    await asyncio.to_thread(settings_condition, objects, "Ready", "True")
    rendered = objects.relay_yaml()
    assert {key: rendered[key] for key in spec} == spec
    async with projected_secret(k8s_client, objects.namespace, RENDERED_SECRET, tmp_path / "mount") as mount:
        config = load_config(mount / "relay.yaml")
    assert (config.default_binding, config.binding_header) == ("bulk", "X-Mail-Binding")
    assert config.hooks.python == ("mycompany.tokens:outbound_smtp_auth_config",)
    assert config.hooks.timeout_ms == 200 and config.hooks.lua == ()
    assert config.upstream.data_timeout_seconds == 900 and config.upstream.timeout_seconds == 30.5
    assert (config.upstream.connect_timeout_seconds, config.upstream.idle_timeout_seconds) == (5, 15)
    assert config.upstream.default_max_connections == 2
    assert (config.limits.message_size_bytes, config.limits.recipients_per_transaction) == (20971520, 50)
    assert config.limits.sessions == 20

    # Deleted: the relay's defaults again, and with no policy left the Secret goes too.
    call_json(
        client.CustomObjectsApi(k8s_client).delete_namespaced_custom_object,
        "outboundrelay.io",
        "v1alpha1",
        objects.namespace,
        SETTINGS_PLURAL,
        "default",
    )
    async with asyncio.timeout(30):
        while objects.rendered() is not None:
            await asyncio.sleep(0.05)


EXAMPLE = REPO / "docs" / "examples" / "hooks.yaml"


def test_the_docs_example_holds_the_seed_hook_verbatim_and_is_shown_in_hooks_md() -> None:
    config_map = next(yaml.safe_load_all(EXAMPLE.read_text()))
    assert config_map["data"]["auth.lua"] == SEED_LUA
    text = EXAMPLE.read_text()
    assert f"`docs/examples/hooks.yaml`:\n```yaml\n{text}```" in (REPO / "docs" / "hooks.md").read_text()


def test_the_docs_example_applies_and_renders(
    objects: Objects, start_operator: StartOperator, control_plane: Any
) -> None:
    """docs/hooks.md's example, as a reader applies it: `kubectl apply -f docs/examples/hooks.yaml`."""
    control_plane.kubectl("apply", "-n", objects.namespace, "-f", str(EXAMPLE))
    start_operator()
    settings_condition(objects, "Ready", "True")
    objects.wait_condition("office365", "Ready", "True")
    relay_yaml = objects.relay_yaml()
    assert relay_yaml["hooks"] == {"lua": [HOOK_KEY], "timeoutMs": 50}
    assert objects.rendered_data()[HOOK_KEY] == SEED_LUA.encode()
    listed = control_plane.kubectl("get", "ors", "-n", objects.namespace).split("\n")[1].split()
    assert listed[:4] == ["default", "True", "Rendered", f'["{HOOK_KEY}"]']
