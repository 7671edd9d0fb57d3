"""The CRDs reject invalid objects at admission, with a message that says what to fix."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client

from outbound_operator.resources import GROUP, POLICY_PLURAL, VERSION
from tests.operator.cluster import Objects, call_json

VALID: dict[str, Any] = {
    "scope": {"domain": "sparkpost.com"},
    "type": "PLAIN",
    "user": "sparkpost",
    "passwordSecretRef": {"name": "sparkpost-smtp", "key": "password"},
}


def rejection(objects: Objects, spec: dict[str, Any]) -> str:
    with pytest.raises(client.exceptions.ApiException) as raised:
        objects.apply_policy("p", spec)
    assert raised.value.status == 422
    message: str = json.loads(str(raised.value.body))["message"]
    return message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"type": "CRAM-MD5"},
            'spec.type: Unsupported value: "CRAM-MD5": supported values: "PLAIN", "LOGIN"',
        ),
        ({"gateway": {"host": "smtp.example", "port": 0}}, "spec.gateway.port: Invalid value: 0"),
        ({"gateway": {"host": "smtp.example", "port": 65536}}, "spec.gateway.port: Invalid value: 65536"),
        ({"userSecretRef": {"name": "s", "key": "user"}}, "set user or userSecretRef, not both"),
        ({"oauth2": {"tokenURL": "https://login.example/token"}}, "oauth2 is only valid with type XOAUTH2"),
        (
            {"type": None, "oauth2": {"tokenURL": "https://login.example/token"}},
            "oauth2 is only valid with type",
        ),
        ({"scope": {"binding": "a", "bindingGroup": "g"}}, "set binding or bindingGroup, not both"),
        ({"scope": {"domain": "not a domain"}}, "spec.scope.domain: Invalid value"),
        ({"tls": {"mode": "ssl"}}, 'spec.tls.mode: Unsupported value: "ssl"'),
        (
            {"type": "XOAUTH2", "oauth2": {"tokenURL": "https://t.example/"}},
            "set passwordSecretRef (a password",
        ),
        ({"passwordSecretRef": {"name": "s"}}, "spec.passwordSecretRef.key: Required value"),
    ],
    ids=[
        "bad-type",
        "port-0",
        "port-too-big",
        "user-and-userSecretRef",
        "oauth2-on-plain",
        "oauth2-without-type",
        "binding-and-group",
        "bad-domain",
        "bad-tls-mode",
        "password-and-oauth2",
        "ref-without-key",
    ],
)
def test_invalid_policy_is_rejected(objects: Objects, change: dict[str, Any], expected: str) -> None:
    spec = {k: v for k, v in {**VALID, **change}.items() if v is not None}
    assert expected in rejection(objects, spec)


@pytest.mark.parametrize(
    "spec",
    [
        {"gateway": {"host": "smtp.example.net", "port": 587}},  # a global policy with the gateway only
        {"scope": {"domain": "sparkpost.com"}, "user": "sp", "passwordSecretRef": {"name": "s", "key": "p"}},
        {"scope": {"bindingGroup": "marketing"}, "type": "LOGIN"},
    ],
    ids=["gateway-only", "credentials-only", "type-only"],
)
def test_partial_policies_are_admitted(objects: Objects, spec: dict[str, Any]) -> None:
    """Each setting falls back on its own (docs/relay-config.md): no setting is required on its own policy."""
    assert objects.apply_policy("partial", spec)["spec"].get("scope") == spec.get("scope")


def test_valid_policy_is_admitted_with_defaults(objects: Objects) -> None:
    created = objects.apply_policy(
        "bird",
        {
            "scope": {"domain": "*.bird.com"},
            "type": "XOAUTH2",
            "userSecretRef": {"name": "bird", "key": "user"},
            "oauth2": {
                "tokenURL": "https://login.example/token",
                "refreshTokenSecretRef": {"name": "bird", "key": "refresh"},
                "scopes": ["https://outlook.office.com/SMTP.Send"],
            },
            "gateway": {"host": "smtp.office365.com", "port": 587},
            "tls": {"caSecretRef": {"name": "ca", "key": "ca.crt"}},
        },
    )
    assert created["spec"]["tls"] == {
        "mode": "starttls",
        "verify": True,
        "caSecretRef": {"name": "ca", "key": "ca.crt"},
    }


def test_short_name_and_printer_columns(objects: Objects, control_plane: Any) -> None:
    objects.apply_policy("sparkpost", VALID)
    table = control_plane.kubectl("get", "oap", "-n", objects.namespace)
    assert table.split("\n")[0].split() == ["NAME", "SCOPE", "TYPE", "USER", "READY", "AGE"]
    assert table.split("\n")[1].split()[:3] == ["sparkpost", "PLAIN", "sparkpost"]


def test_status_is_a_subresource(objects: Objects) -> None:
    """A spec update cannot write status, so only the operator sets it."""
    objects.apply_policy("p", VALID)
    body = objects.policy("p")
    body["status"] = {"resolvedScope": "forged"}
    updated = call_json(
        client.CustomObjectsApi(objects.api).replace_namespaced_custom_object,
        GROUP,
        VERSION,
        objects.namespace,
        POLICY_PLURAL,
        "p",
        body,
    )
    assert "status" not in updated
