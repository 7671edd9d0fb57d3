"""The CRDs reject invalid objects at admission, with a message that says what to fix."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from kubernetes import client

from outbound_operator.crd_models import InvalidSpec, parse_group_spec, parse_policy_spec
from outbound_operator.injection import (
    ANNOTATION_BINDING,
    ANNOTATION_INJECT,
    InjectionError,
    InjectionSettings,
    injection_patch,
)
from outbound_operator.resources import GROUP, GROUP_KIND, GROUP_PLURAL, POLICY_KIND, POLICY_PLURAL, VERSION
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


REF = {"name": "s", "key": "k"}
OAUTH2 = {"tokenURL": "https://login.example/token", "clientIdSecretRef": REF, "refreshTokenSecretRef": REF}


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
        (
            {"type": "XOAUTH2", "passwordSecretRef": None, "oauth2": {"tokenURL": "https://t.example/"}},
            "clientIdSecretRef is required",
        ),
        (
            {
                "type": "XOAUTH2",
                "passwordSecretRef": None,
                "oauth2": {**OAUTH2, "tokenURL": "https://u:p@t/"},
            },
            "spec.oauth2.tokenURL: Invalid value",
        ),
        (
            {"type": "XOAUTH2", "passwordSecretRef": None, "oauth2": {**OAUTH2, "scopes": ["a b"]}},
            "spec.oauth2.scopes[0]: Invalid value",
        ),
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
        "oauth2-without-client-id",
        "token-url-with-credentials",
        "scope-with-a-space",
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
                "clientIdSecretRef": {"name": "bird", "key": "client-id"},
                "refreshTokenSecretRef": {"name": "bird", "key": "refresh"},
                "caSecretRef": {"name": "ca", "key": "ca.crt"},
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
    header = ["NAME", "SCOPE", "TYPE", "USER", "READY", "PODS", "WITHOUT", "SIDECAR", "AGE"]
    assert table.split("\n")[0].split() == header
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


def dry_run(objects: Objects, plural: str, kind: str, spec: dict[str, Any]) -> str | None:
    """None if the API server would admit an object with this spec, else its message (nothing is stored)."""
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": "probe", "namespace": objects.namespace},
        "spec": spec,
    }
    try:
        objects.custom.create_namespaced_custom_object(
            GROUP, VERSION, objects.namespace, plural, body, dry_run="All", _preload_content=False
        )
    except client.exceptions.ApiException as error:
        if error.status != 422:
            raise
        message: str = json.loads(str(error.body))["message"]
        return message
    return None


SCOPES = [{}, {"binding": "b"}, {"bindingGroup": "g"}, {"binding": "b", "bindingGroup": "g"}]


def api_server_and_model_agree(objects: Objects, spec: dict[str, Any]) -> bool:
    """Whether the API server admits `spec` (a dry run), after checking the model decides the same and,
    for a refusal, says each thing the API server says. True when admitted."""
    refused = dry_run(objects, POLICY_PLURAL, POLICY_KIND, spec)
    parsed = parse_policy_spec(spec)
    if refused is None:
        assert not isinstance(parsed, InvalidSpec), (spec, parsed)
        return True
    assert isinstance(parsed, InvalidSpec), (spec, refused)
    for error in parsed.errors:
        for message in error.split(": ", 1)[1].split("; "):
            assert message in refused, (spec, message, refused)
    return False


@pytest.mark.parametrize("scope", SCOPES, ids=["global", "binding", "group", "binding-and-group"])
def test_cel_rules_and_the_models_rules_agree(objects: Objects, scope: dict[str, str]) -> None:
    """Every combination of the fields the CEL rules name: the API server admits a spec exactly when the
    operator's model does, and says what the model says (crd_models.Rule is the one source of both)."""
    fields = {"user": "u", "userSecretRef": REF, "passwordSecretRef": REF, "oauth2": OAUTH2}
    types = [None, "PLAIN", "LOGIN", "XOAUTH2"]
    admitted = 0
    for present in itertools.product([False, True], repeat=len(fields)):
        for auth_type in types:
            spec: dict[str, Any] = {"scope": scope} if scope else {}
            spec |= {key: value for (key, value), on in zip(fields.items(), present, strict=True) if on}
            if auth_type is not None:
                spec["type"] = auth_type
            admitted += api_server_and_model_agree(objects, spec)
    # Per scope: without oauth2, 3 user choices (none, user, userSecretRef) x 2 x 4 types; with oauth2, the
    # 3 user choices with type XOAUTH2 and no passwordSecretRef.
    assert admitted == (0 if "binding" in scope and "bindingGroup" in scope else 3 * 2 * 4 + 3)


def test_oauth2_rules_and_the_models_rules_agree(objects: Objects) -> None:
    """Every combination of the oauth2 references the rules name: admitted by the API server exactly
    when the model admits it (a client id, and a refresh token or a client secret)."""
    fields = {"clientIdSecretRef": REF, "clientSecretSecretRef": REF, "refreshTokenSecretRef": REF}
    admitted = 0
    for present in itertools.product([False, True], repeat=len(fields)):
        oauth2: dict[str, Any] = {"tokenURL": "https://login.example/token"}
        oauth2 |= {key: value for (key, value), on in zip(fields.items(), present, strict=True) if on}
        spec = {"type": "XOAUTH2", "oauth2": oauth2}
        admitted += api_server_and_model_agree(objects, spec)
    assert admitted == 3  # client id with a secret, a refresh token, or both


@pytest.mark.parametrize(
    "binding", ["bulk-a", "Bulk_A.1", "x" * 63, "x" * 64, "bulk mail", "-x", "a;b", "ü", ""]
)
def test_a_binding_is_admitted_by_policies_groups_and_the_injector_alike(
    objects: Objects, binding: str
) -> None:
    """One rule for a binding name: in a policy's scope, in a group, and in a Pod's annotation."""
    in_policy = dry_run(objects, POLICY_PLURAL, POLICY_KIND, {"scope": {"binding": binding}})
    in_group = dry_run(objects, GROUP_PLURAL, GROUP_KIND, {"bindings": [binding]})
    pod = {
        "metadata": {"annotations": {ANNOTATION_INJECT: "true", ANNOTATION_BINDING: binding}},
        "spec": {"containers": [{"name": "app", "image": "app"}]},
    }
    try:
        injection_patch(pod, InjectionSettings())
        injected = True
    except InjectionError:
        injected = False
    valid = (
        len(binding) <= 63
        and binding[:1].isascii()
        and binding[:1].isalnum()
        and all(c.isascii() and (c.isalnum() or c in "_.-") for c in binding)
    )
    assert (in_policy is None, in_group is None, injected) == (valid, valid, valid)
    assert isinstance(parse_group_spec({"bindings": [binding]}), InvalidSpec) is not valid
