"""render.py and status.py on their own: what a namespace's objects render to, without a cluster."""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from outbound_operator.crd_models import SECRET_KEY_PATTERN, PolicySpec, PolicyStatus
from outbound_operator.crd_schema import structural_schema
from outbound_operator.relay_settings import SettingsSource, collect_hooks, last_good, render_settings
from outbound_operator.render import (
    YAML_DUMPER,
    YAML_STYLE,
    BindingGroupSource,
    ConditionType,
    PolicySource,
    Verdict,
    ca_key,
    render_namespace,
)
from outbound_operator.status import readiness_event, status_of, status_patch
from outbound_relay.config import RelayConfig, load_config, parse_config
from outbound_relay.scopes import ScopeIndex
from tests.peers.certs import TLSFiles, make_tls_files

NS = "mail"


def policy(name: str, created: str = "2026-01-01T00:00:00Z", **spec: Any) -> PolicySource:
    """A PLAIN policy with a user and a password Secret unless `spec` says otherwise (None: left out)."""
    spec.setdefault("type", "PLAIN")
    if "user" not in spec and "userSecretRef" not in spec:
        spec["user"] = name
    spec.setdefault("passwordSecretRef", {"name": f"{name}-smtp", "key": "password"})
    metadata = {"name": name, "uid": f"uid-{name}", "creationTimestamp": created, "generation": 1}
    spec = {key: value for key, value in spec.items() if value is not None}
    return PolicySource.from_body({"metadata": metadata, "spec": spec})


def group(name: str, created: str, bindings: list[str], generation: int = 1) -> BindingGroupSource:
    metadata = {"name": name, "uid": name, "creationTimestamp": created, "generation": generation}
    return BindingGroupSource.from_body({"metadata": metadata, "spec": {"bindings": bindings}})


def secrets_for(*policies: PolicySource) -> dict[str, dict[str, bytes]]:
    return {f"{p.name}-smtp": {"password": f"pw-{p.name}".encode()} for p in policies}


def relay_yaml(data: dict[str, bytes]) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(data["relay.yaml"])
    return loaded


def by_name(data: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in relay_yaml(data)["policies"]}


def load_config_text(raw: bytes) -> RelayConfig:
    return parse_config(yaml.safe_load(raw))


def cond(verdict: Verdict, kind: ConditionType) -> tuple[bool, str, str]:
    c = verdict.condition(kind)
    return c.status, c.reason, c.message


def test_seed_domains_render_with_their_settings() -> None:
    policies = [
        policy("msys", scope={"domain": "messagesystems.com"}, type="LOGIN"),
        policy(
            "sparkpost",
            scope={"domain": "sparkpost.com"},
            gateway={"host": "smtp.sparkpost.com", "port": 587},
        ),
        policy("bird", scope={"domain": "bird.com"}, type="XOAUTH2", user="test@contoso.onmicrosoft.com"),
    ]
    rendering = render_namespace(NS, policies, [], secrets_for(*policies))
    rendered = by_name(rendering.data)
    assert rendered["mail/msys"] == {
        "name": "mail/msys",
        "scope": {"domain": "messagesystems.com"},
        "type": "LOGIN",
        "user": "msys",
        "password": "pw-msys",
    }
    assert rendered["mail/sparkpost"]["gateway"] == {"host": "smtp.sparkpost.com", "port": 587}
    assert rendered["mail/bird"]["type"] == "XOAUTH2"
    assert all(v.ready.status for v in rendering.policies.values())
    assert rendering.policies["bird"].resolved_scope == "domain=bird.com"
    assert [o["name"] for o in rendering.owners] == ["bird", "msys", "sparkpost"]


def test_output_is_the_same_bytes_whatever_the_input_order() -> None:
    policies = [policy(f"p{i}", scope={"domain": f"d{i}.example"}) for i in range(30)]
    groups = [group("g", "t", ["b", "a"])]
    first = render_namespace(NS, policies, groups, secrets_for(*policies))
    shuffled = list(policies)
    random.Random(7).shuffle(shuffled)
    again = render_namespace(NS, shuffled, groups, dict(reversed(secrets_for(*policies).items())))
    assert first.data == again.data
    assert first.owners == again.owners
    assert relay_yaml(first.data)["bindingGroups"] == {"g": ["a", "b"]}


def test_older_policy_holds_a_scope_the_younger_gets_conflict() -> None:
    old = policy("zeta", created="2026-01-01T00:00:00Z", scope={"domain": "Example.COM"})
    young = policy("alpha", created="2026-01-02T00:00:00Z", scope={"domain": "example.com"})
    rendering = render_namespace(NS, [young, old], [], secrets_for(old, young))
    assert list(by_name(rendering.data)) == ["mail/zeta"]
    status, reason, message = cond(rendering.policies["alpha"], ConditionType.CONFLICT)
    assert (status, reason) == (True, "ScopeTaken")
    assert "mail/zeta" in message
    assert rendering.policies["alpha"].ready.reason == "ScopeTaken"
    assert rendering.policies["zeta"].ready.status


def test_same_creation_time_the_name_decides() -> None:
    a, b = policy("a"), policy("b")
    rendering = render_namespace(NS, [b, a], [], secrets_for(a, b))
    assert list(by_name(rendering.data)) == ["mail/a"]
    assert cond(rendering.policies["b"], ConditionType.CONFLICT)[0]


def test_missing_secret_suspends_the_policy_without_credentials() -> None:
    good = policy("global")
    broken = policy("sparkpost", scope={"domain": "sparkpost.com"}, tls={"mode": "starttls", "verify": True})
    rendering = render_namespace(NS, [good, broken], [], secrets_for(good))
    rendered = by_name(rendering.data)
    assert rendered["mail/sparkpost"] == {
        "name": "mail/sparkpost",
        "scope": {"domain": "sparkpost.com"},
        "suspended": "Secret mail/sparkpost-smtp not found",
    }
    assert rendered["mail/global"]["password"] == "pw-global"  # the other policy is untouched
    verdict = rendering.policies["sparkpost"]
    assert cond(verdict, ConditionType.SECRET_MISSING) == (
        True,
        "SecretNotFound",
        "Secret mail/sparkpost-smtp not found",
    )
    assert not verdict.ready.status
    assert "deferred with a temporary failure (4xx)" in verdict.ready.message
    assert "not sent with a wider scope's credentials" in verdict.ready.message
    # The relay defers that domain's mail instead of using the global policy's credentials.
    route = ScopeIndex(rendering.config).route("sparkpost.com", "default")
    assert route.suspended is not None and route.password is None


@pytest.mark.parametrize("field", ["passwordSecretRef", "userSecretRef", "caSecretRef"])
def test_a_policy_naming_the_rendered_secret_is_suspended_and_gets_nothing_from_it(field: str) -> None:
    """Even when the Secret is at hand (as in a namespace rendered before): its content never reaches
    the policy, nor the rendered file itself."""
    ref = {"name": "outbound-relay-config", "key": "relay.yaml"}
    spec: dict[str, Any] = {"tls": {"caSecretRef": ref}} if field == "caSecretRef" else {field: ref}
    thief = policy(
        "thief", scope={"domain": "thief.example"}, gateway={"host": "evil.example", "port": 25}, **spec
    )
    good = policy("global")
    values = secrets_for(good) | {"thief-smtp": {"password": b"x"}}
    values["outbound-relay-config"] = {"relay.yaml": b"policies: [{password: pw-global}]"}
    rendering = render_namespace(NS, [good, thief], [], values)
    assert by_name(rendering.data)["mail/thief"] == {
        "name": "mail/thief",
        "scope": {"domain": "thief.example"},
        "suspended": "Secret mail/outbound-relay-config is the one the operator renders; "
        "no policy may name it",
    }
    assert cond(rendering.policies["thief"], ConditionType.INVALID)[:2] == (True, "RenderedSecretReferenced")
    assert rendering.data["relay.yaml"].count(b"pw-global") == 1


def test_missing_key_names_the_key() -> None:
    p = policy("p")
    rendering = render_namespace(NS, [p], [], {"p-smtp": {"pass": b"x"}})
    assert cond(rendering.policies["p"], ConditionType.SECRET_MISSING) == (
        True,
        "SecretKeyNotFound",
        "Secret mail/p-smtp has no key 'password'",
    )


def test_user_from_secret_and_trailing_newline_dropped() -> None:
    p = policy(
        "p", userSecretRef={"name": "creds", "key": "user"}, passwordSecretRef={"name": "creds", "key": "pw"}
    )
    rendering = render_namespace(NS, [p], [], {"creds": {"user": b"someone\n", "pw": b"s3cret\r\n"}})
    assert by_name(rendering.data)["mail/p"] | {} == {
        "name": "mail/p",
        "scope": {},
        "type": "PLAIN",
        "user": "someone",
        "password": "s3cret",
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(b"pw\n", "pw"), (b"pw\r\n", "pw"), (b"pw\n\n", "pw\n"), (b"pw\r\n\r\n", "pw\r\n"), (b"pw \n", "pw ")],
)
def test_exactly_one_trailing_newline_is_dropped(raw: bytes, expected: str) -> None:
    """docs/operator.md: one trailing newline goes (a file's); a password may end in more line breaks."""
    p = policy("p")
    rendering = render_namespace(NS, [p], [], {"p-smtp": {"password": raw}})
    assert by_name(rendering.data)["mail/p"]["password"] == expected


def test_secret_value_that_is_not_text_is_invalid() -> None:
    p = policy("p")
    rendering = render_namespace(NS, [p], [], {"p-smtp": {"password": b"\xff\xfe"}})
    assert cond(rendering.policies["p"], ConditionType.INVALID)[:2] == (True, "InvalidSecretValue")
    assert "suspended" in by_name(rendering.data)["mail/p"]


OAUTH2_SECRET = {
    "client-id": b"relay-client\n",
    "client-secret": b"cs-s3cret",
    "refresh-token": b"rt-s3cret\n",
}


def oauth2_policy(**oauth2: Any) -> PolicySource:
    block = {
        "tokenURL": "https://login.example/tenant/oauth2/v2.0/token",
        "clientIdSecretRef": {"name": "bird-oauth2", "key": "client-id"},
        "clientSecretSecretRef": {"name": "bird-oauth2", "key": "client-secret"},
        "refreshTokenSecretRef": {"name": "bird-oauth2", "key": "refresh-token"},
        "scopes": ["https://outlook.office365.com/SMTP.Send", "offline_access"],
        **oauth2,
    }
    block = {key: value for key, value in block.items() if value is not None}
    return policy("bird", type="XOAUTH2", user="bird@contoso.example", oauth2=block, passwordSecretRef=None)


def test_oauth2_is_rendered_with_its_secrets_and_the_relay_reads_it(tmp_path: Path) -> None:
    tls: TLSFiles = make_tls_files(tmp_path / "tls")
    p = oauth2_policy(caSecretRef={"name": "idp-ca", "key": "ca.crt"})
    secrets = {"bird-oauth2": OAUTH2_SECRET, "idp-ca": {"ca.crt": tls.ca_file.read_bytes()}}
    rendering = render_namespace(NS, [p], [], secrets)
    assert rendering.policies["bird"].ready.status, rendering.policies["bird"]
    key = ca_key(tls.ca_file.read_bytes())
    assert sorted(rendering.data) == [key, "relay.yaml"]
    assert by_name(rendering.data)["mail/bird"]["oauth2"] == {
        "tokenUrl": "https://login.example/tenant/oauth2/v2.0/token",
        "clientId": "relay-client",
        "clientSecret": "cs-s3cret",
        "refreshToken": "rt-s3cret",
        "scopes": ["https://outlook.office365.com/SMTP.Send", "offline_access"],
        "caFile": key,
    }
    assert sorted(p.secret_refs()) == [
        "oauth2.caSecretRef",
        "oauth2.clientIdSecretRef",
        "oauth2.clientSecretSecretRef",
        "oauth2.refreshTokenSecretRef",
    ]
    mount = tmp_path / "mount"
    mount.mkdir()
    for name, value in rendering.data.items():
        (mount / name).write_bytes(value)
    settings = load_config(mount / "relay.yaml").policy("mail/bird").oauth2
    assert settings is not None
    assert settings.grant == "refresh_token"
    assert settings.client_id == "relay-client"
    assert settings.client_secret is not None and settings.client_secret.get_secret_value() == "cs-s3cret"
    assert settings.refresh_token is not None and settings.refresh_token.get_secret_value() == "rt-s3cret"
    assert settings.ca_file == mount / key


def test_oauth2_client_credentials_renders_without_a_refresh_token() -> None:
    p = oauth2_policy(refreshTokenSecretRef=None, scopes=None)
    rendering = render_namespace(NS, [p], [], {"bird-oauth2": OAUTH2_SECRET})
    rendered = by_name(rendering.data)["mail/bird"]["oauth2"]
    assert sorted(rendered) == ["clientId", "clientSecret", "tokenUrl"]
    oauth2 = load_config_text(rendering.data["relay.yaml"]).policy("mail/bird").oauth2
    assert oauth2 is not None and oauth2.grant == "client_credentials"


@pytest.mark.parametrize(
    ("secrets", "reason"),
    [
        ({}, "SecretNotFound"),
        (
            {"bird-oauth2": {k: v for k, v in OAUTH2_SECRET.items() if k != "refresh-token"}},
            "SecretKeyNotFound",
        ),
        ({"bird-oauth2": {**OAUTH2_SECRET, "client-secret": b""}}, "InvalidSecretValue"),
    ],
    ids=["secret-missing", "key-missing", "empty-value"],
)
def test_oauth2_without_its_secret_is_suspended(secrets: dict[str, dict[str, bytes]], reason: str) -> None:
    rendering = render_namespace(NS, [oauth2_policy()], [], secrets)
    ready = rendering.policies["bird"].ready
    assert (ready.status, ready.reason) == (False, reason)
    entry = by_name(rendering.data)["mail/bird"]
    assert "suspended" in entry and "oauth2" not in entry
    assert "s3cret" not in rendering.data["relay.yaml"].decode()


def test_oauth2_ca_without_a_certificate_is_invalid() -> None:
    p = oauth2_policy(caSecretRef={"name": "idp-ca", "key": "ca.crt"})
    rendering = render_namespace(NS, [p], [], {"bird-oauth2": OAUTH2_SECRET, "idp-ca": {"ca.crt": b"hello"}})
    assert cond(rendering.policies["bird"], ConditionType.INVALID)[:2] == (True, "InvalidSecretValue")
    assert sorted(rendering.data) == ["relay.yaml"]


def test_binding_groups_and_their_conflicts() -> None:
    groups = [
        group("marketing", "2026-01-01T00:00:00Z", ["a", "b"]),
        group("late", "2026-01-02T00:00:00Z", ["b", "c"], generation=3),
    ]
    grouped = policy("m", scope={"bindingGroup": "marketing"})
    unknown = policy("u", scope={"bindingGroup": "nope"})
    rendering = render_namespace(NS, [grouped, unknown], groups, secrets_for(grouped, unknown))
    assert relay_yaml(rendering.data)["bindingGroups"] == {"late": ["c"], "marketing": ["a", "b"]}
    late = rendering.groups["late"]
    assert late.generation == 3
    assert cond(late, ConditionType.CONFLICT) == (
        True,
        "BindingTaken",
        "binding 'b' is in the older group marketing",
    )
    assert rendering.groups["marketing"].ready.status
    assert list(by_name(rendering.data)) == ["mail/m"]
    assert cond(rendering.policies["u"], ConditionType.INVALID)[:2] == (True, "UnknownBindingGroup")


def test_invalid_scope_is_reported_and_not_rendered() -> None:
    bad = policy("bad", scope={"domain": "not a domain"})
    good = policy("good")
    rendering = render_namespace(NS, [bad, good], [], secrets_for(bad, good))
    assert list(by_name(rendering.data)) == ["mail/good"]
    status, reason, message = cond(rendering.policies["bad"], ConditionType.INVALID)
    assert (status, reason) == (True, "InvalidScope")
    assert "not a domain name" in message


def test_a_spec_the_models_refuse_is_invalid_and_its_scope_deferred() -> None:
    """Stored under an older schema (the API server checks new objects): each bad field is named, and
    the scope is rendered suspended so its mail is not sent with a wider scope's credentials."""
    old = policy(
        "old",
        scope={"domain": "old.example"},
        gateway={"host": "smtp.example", "port": 0},
        maxConnection=4,
    )
    rendering = render_namespace(NS, [old], [], secrets_for(old))
    status, reason, message = cond(rendering.policies["old"], ConditionType.INVALID)
    assert (status, reason) == (True, "InvalidSpec")
    assert message == (
        "spec.gateway.port: Input should be greater than or equal to 1; "
        "spec.maxConnection: unknown field (not in this CRD version; check its spelling)"
    )
    assert by_name(rendering.data)["mail/old"] == {
        "name": "mail/old",
        "scope": {"domain": "old.example"},
        "suspended": message,
    }
    assert rendering.policies["old"].resolved_scope == "domain=old.example"
    assert "pw-old" not in rendering.data["relay.yaml"].decode()


def test_a_binding_outside_the_rule_is_invalid_in_a_scope_and_in_a_group() -> None:
    long = "b" * 64
    in_scope = policy("in-scope", scope={"binding": long})
    rendering = render_namespace(NS, [in_scope], [group("g", "t", ["ok", long])], secrets_for(in_scope))
    status, reason, message = cond(rendering.policies["in-scope"], ConditionType.INVALID)
    assert (status, reason) == (True, "InvalidScope")
    assert message.startswith(f"spec.scope.binding: '{long}' is not a binding name (1 to 63 letters")
    assert by_name(rendering.data) == {}
    group_verdict = rendering.groups["g"]
    assert cond(group_verdict, ConditionType.INVALID)[:2] == (True, "InvalidSpec")
    assert group_verdict.ready.message.startswith(f"spec.bindings[1]: '{long}' is not a binding name")
    assert "bindingGroups" not in relay_yaml(rendering.data)


def test_ca_bundle_is_a_key_beside_relay_yaml(tmp_path: Path) -> None:
    tls: TLSFiles = make_tls_files(tmp_path / "tls")
    p = policy("p", tls={"mode": "implicit", "verify": True, "caSecretRef": {"name": "ca", "key": "ca.crt"}})
    secrets = {**secrets_for(p), "ca": {"ca.crt": tls.ca_file.read_bytes()}}
    rendering = render_namespace(NS, [p], [], secrets)
    key = ca_key(tls.ca_file.read_bytes())
    assert sorted(rendering.data) == [key, "relay.yaml"]
    assert by_name(rendering.data)["mail/p"]["tls"] == {"mode": "implicit", "verify": True, "caFile": key}
    mount = tmp_path / "mount"
    mount.mkdir()
    for name, value in rendering.data.items():
        (mount / name).write_bytes(value)
    config = load_config(mount / "relay.yaml")
    tls_settings = config.policies[0].tls
    assert tls_settings is not None and tls_settings.ca_file == mount / key


def test_a_ca_shared_by_many_policies_is_stored_once(tmp_path: Path) -> None:
    """Each policy's copy of one 20 KiB bundle: 60 policies would pass the Secret's 1 MiB limit."""
    ca = make_tls_files(tmp_path / "tls").ca_file.read_bytes()
    bundle = ca * (20 * 1024 // len(ca) + 1)
    other = make_tls_files(tmp_path / "tls2").ca_file.read_bytes()
    ref = {"name": "ca", "key": "bundle.crt"}
    policies = [
        policy(f"p{i:02d}", scope={"domain": f"d{i}.example"}, tls={"caSecretRef": ref}) for i in range(60)
    ]
    policies.append(
        policy("q", scope={"domain": "q.example"}, tls={"caSecretRef": {"name": "ca", "key": "q"}})
    )
    secrets = {**secrets_for(*policies), "ca": {"bundle.crt": bundle, "q": other}}
    rendering = render_namespace(NS, policies, [], secrets)
    assert sorted(rendering.data) == sorted([ca_key(bundle), ca_key(other), "relay.yaml"])
    assert sum(len(v) for v in rendering.data.values()) < 1024 * 1024
    rendered = by_name(rendering.data)
    assert {rendered[f"mail/p{i:02d}"]["tls"]["caFile"] for i in range(60)} == {ca_key(bundle)}
    assert rendered["mail/q"]["tls"]["caFile"] == ca_key(other)


def test_ca_secret_without_a_certificate_is_invalid() -> None:
    p = policy("p", tls={"caSecretRef": {"name": "ca", "key": "ca.crt"}})
    rendering = render_namespace(NS, [p], [], {**secrets_for(p), "ca": {"ca.crt": b"hello"}})
    assert cond(rendering.policies["p"], ConditionType.INVALID)[:2] == (True, "InvalidSecretValue")
    assert sorted(rendering.data) == ["relay.yaml"]


@pytest.mark.parametrize("secret", ["pw-p", "cHctcA=="])
def test_verdicts_never_carry_secret_values(secret: str) -> None:
    p = policy("p", oauth2={"tokenURL": "https://x"})
    rendering = render_namespace(NS, [p], [], secrets_for(p))
    text = repr(rendering.policies) + repr(rendering.groups)
    assert secret not in text


@pytest.mark.parametrize("secret", ["cs-s3cret", "rt-s3cret", "relay-client"])
@pytest.mark.parametrize("broken", [None, "client-secret", "refresh-token"])
def test_verdicts_never_carry_oauth2_secret_values(secret: str, broken: str | None) -> None:
    """Rendered or suspended (another key missing), no OAuth2 value reaches a verdict (status, Events)."""
    values = {k: v for k, v in OAUTH2_SECRET.items() if k != broken}
    rendering = render_namespace(NS, [oauth2_policy()], [], {"bird-oauth2": values})
    assert secret not in repr(rendering.policies) + repr(rendering.groups)


def test_status_keeps_transition_time_and_patches_only_changes() -> None:
    p = policy("p")
    ready = render_namespace(NS, [p], [], secrets_for(p)).policies["p"]
    missing = render_namespace(NS, [p], [], {}).policies["p"]
    first = status_of(missing, None, now="T1")
    assert first["resolvedScope"] == "global" and first["observedGeneration"] == 1
    PolicyStatus.model_validate(first)  # what is written fits the CRD's status schema
    assert {c["type"]: c["status"] for c in first["conditions"]} == {
        "Ready": "False",
        "SecretMissing": "True",
        "Invalid": "False",
        "Conflict": "False",
    }
    assert status_patch(status_of(missing, first, now="T2"), first) is None
    second = status_of(ready, first, now="T2")
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == {"Ready": "T2", "SecretMissing": "T2", "Invalid": "T1", "Conflict": "T1"}
    assert status_patch(second, first) == {"status": second}
    assert status_patch({"observedGeneration": 1}, {"observedGeneration": 1, "resolvedScope": "x"}) == {
        "status": {"observedGeneration": 1, "resolvedScope": None}
    }
    note = readiness_event(ready, first)
    assert note is not None and (note.type, note.reason) == ("Normal", "Rendered")
    assert readiness_event(ready, second) is None
    warning = readiness_event(missing, second)
    assert warning is not None and (warning.type, warning.reason) == ("Warning", "SecretNotFound")


def test_libyaml_and_pure_python_emit_the_same_bytes() -> None:
    """The operator uses libyaml when present; a build without it must not rewrite every Secret."""
    tricky = [
        policy(
            f"p{i}",
            scope={"domain": f"d{i}.example"},
            user=f"üser '{i}' #x",
            gateway={"host": "h", "port": 25},
        )
        for i in range(20)
    ]
    secrets = {f"p{i}-smtp": {"password": f"pw: 'q' \"dq\" {i}\t%".encode()} for i in range(20)}
    rendering = render_namespace(NS, [*tricky, policy("gone")], [], secrets)
    data = relay_yaml(rendering.data)
    python = yaml.dump(data, Dumper=yaml.SafeDumper, **YAML_STYLE)
    assert YAML_DUMPER is getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    assert yaml.dump(data, Dumper=YAML_DUMPER, **YAML_STYLE) == python
    assert rendering.data["relay.yaml"].decode().endswith(python)


def from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values a structural schema admits, field by field (CEL rules aside)."""
    if "enum" in node:
        return st.sampled_from(node["enum"])
    low, high = node.get("minLength", 0), node.get("maxLength")
    match node["type"]:
        case "string" if "pattern" in node:
            regex = st.from_regex(node["pattern"], fullmatch=True)
            return regex.filter(lambda text: low <= len(text) <= (high or len(text)))
        case "string":
            return st.text(min_size=low, max_size=high)
        case "integer":
            return st.integers(node.get("minimum"), node.get("maximum"))
        case "boolean":
            return st.booleans()
        case "array":
            return st.lists(from_schema(node["items"]), max_size=3)
        case "object":
            required = set(node.get("required", ()))
            fields = {name: from_schema(child) for name, child in node["properties"].items()}
            return st.fixed_dictionaries(
                {k: v for k, v in fields.items() if k in required},
                optional={k: v for k, v in fields.items() if k not in required},
            )
    raise AssertionError(f"no strategy for {node}")


def _within_the_rules(spec: dict[str, Any], keep_first: bool) -> dict[str, Any]:
    """The spec with one of each pair the CEL rules forbid together left out (the rules themselves are
    checked against the API server in tests/operator/test_operator_crds.py)."""
    spec = copy.deepcopy(spec)
    oauth2 = spec.get("oauth2")
    if oauth2 is not None:  # the oauth2 rules: only with XOAUTH2, not with a password, a client id
        spec["type"] = "XOAUTH2"
        spec.pop("passwordSecretRef", None)
        oauth2.setdefault("clientIdSecretRef", {"name": "oauth2", "key": "client-id"})
        if "refreshTokenSecretRef" not in oauth2:
            oauth2.setdefault("clientSecretSecretRef", {"name": "oauth2", "key": "client-secret"})
    pairs = [(spec, "user", "userSecretRef"), (spec.get("scope") or {}, "binding", "bindingGroup")]
    for owner, a, b in pairs:
        if a in owner and b in owner:
            del owner[b if keep_first else a]
    return spec


def _read_back(raw: bytes) -> str:
    """A user or password as the operator reads it from a Secret: one trailing newline dropped."""
    text = raw.decode()
    return text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text


# Everything the generated OutboundAuthPolicy schema admits.
ADMITTED_SPECS = st.builds(_within_the_rules, from_schema(structural_schema(PolicySpec)), st.booleans())


@settings(deadline=None, max_examples=150)
@given(spec=ADMITTED_SPECS, user=st.text(min_size=1), password=st.text(min_size=1))
def test_every_spec_the_crd_admits_renders_and_the_relay_reads_it_back(
    spec: dict[str, Any], user: str, password: str
) -> None:
    """The CRD (generated from crd_models.py) and the relay's relay.yaml model (outbound_relay.config)
    agree: whatever the API server admits renders Ready, and the relay reads back the settings as written.
    A limit or pattern of the CRD that the relay does not take would show here as RejectedByRelay."""
    assume(_read_back(user.encode()) and _read_back(password.encode()))
    source = PolicySource.from_body({"metadata": {"name": "p"}, "spec": spec})
    assert isinstance(source.spec, PolicySpec), source.spec
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    secrets: dict[str, dict[str, bytes]] = {}
    # Two references may name the same Secret key: then both read the value written last.
    oauth2 = spec.get("oauth2") or {}
    for ref, value in (
        (spec.get("userSecretRef"), user.encode()),
        (spec.get("passwordSecretRef"), password.encode()),
        (oauth2.get("clientIdSecretRef"), user.encode()),
        (oauth2.get("clientSecretSecretRef"), password.encode()),
        (oauth2.get("refreshTokenSecretRef"), password.encode()),
        ((spec.get("tls") or {}).get("caSecretRef"), pem),
        (oauth2.get("caSecretRef"), pem),
    ):
        if ref is not None:
            secrets.setdefault(ref["name"], {})[ref["key"]] = value
    scope = spec.get("scope") or {}
    groups = [group(scope["bindingGroup"], "t", ["g-1"])] if "bindingGroup" in scope else []
    rendering = render_namespace(NS, [source], groups, secrets)
    verdict = rendering.policies["p"]
    assert verdict.ready.status, verdict.ready.message
    (policy,) = load_config_text(rendering.data["relay.yaml"]).policies
    if "domain" in scope:
        assert policy.scope.domain == scope["domain"].lower().rstrip(".")
    assert policy.scope.binding == scope.get("binding")
    assert policy.scope.binding_group == scope.get("bindingGroup")
    assert policy.type == spec.get("type")
    if "user" in spec:
        assert policy.user == spec["user"]
    if "userSecretRef" in spec:
        ref = spec["userSecretRef"]
        assert policy.user == _read_back(secrets[ref["name"]][ref["key"]])
    if "passwordSecretRef" in spec:
        ref = spec["passwordSecretRef"]
        assert policy.password is not None
        assert policy.password.get_secret_value() == _read_back(secrets[ref["name"]][ref["key"]])
    if "gateway" in spec:
        assert policy.gateway is not None
        assert (policy.gateway.host, policy.gateway.port) == (
            spec["gateway"]["host"],
            spec["gateway"]["port"],
        )
    if "tls" in spec:
        assert policy.tls is not None
        assert policy.tls.mode == spec["tls"].get("mode", "starttls")
        assert policy.tls.verify == spec["tls"].get("verify", True)
    assert policy.max_connections == spec.get("maxConnections")
    if oauth2:
        assert policy.oauth2 is not None
        assert policy.oauth2.token_url == oauth2["tokenURL"]
        assert policy.oauth2.scopes == tuple(oauth2.get("scopes", ()))
        ref = oauth2["clientIdSecretRef"]
        assert policy.oauth2.client_id == _read_back(secrets[ref["name"]][ref["key"]])


# -- OutboundRelaySettings (relay_settings.py) ------------------------------------------------------------

_CM_NAME = st.from_regex(r"\A[a-z0-9]([a-z0-9.-]{0,40}[a-z0-9])?\Z")
_CM_KEY = st.from_regex(r"\A[-._a-zA-Z0-9]{1,40}\Z").filter(lambda k: k not in (".", ".."))


@given(st.lists(st.tuples(_CM_NAME, _CM_KEY), min_size=1, max_size=6, unique=True))
def test_hook_files_get_distinct_valid_secret_keys(refs: list[tuple[str, str]]) -> None:
    """Every distinct ConfigMap key becomes its own Secret key, valid as one, even when two references
    spell the same `hook-<name>-<key>`."""
    source = SettingsSource.from_body(
        {
            "metadata": {"name": "default"},
            "spec": {"hooks": {"lua": [{"configMapRef": {"name": n, "key": k}} for n, k in refs]}},
        }
    )
    config_maps: dict[str, dict[str, str]] = {}
    for name, key in refs:
        config_maps.setdefault(name, {})[key] = f"-- {name}/{key}"
    hooks, problems = collect_hooks(NS, source, config_maps)
    assert problems == []
    keys = [hook.key for hook in hooks]
    assert len(set(keys)) == len(refs)
    assert all(re.fullmatch(SECRET_KEY_PATTERN, key) and len(key) <= 253 for key in keys)
    assert [hook.source for hook in hooks] == [f"-- {n}/{k}" for n, k in refs]


def test_colliding_hook_names_and_duplicates() -> None:
    spec = {
        "hooks": {"lua": [{"configMapRef": {"name": n, "key": k}} for n, k in (("a-b", "c"), ("a", "b-c"))]}
    }
    source = SettingsSource.from_body({"metadata": {"name": "default"}, "spec": spec})
    hooks, problems = collect_hooks(NS, source, {"a-b": {"c": "x"}, "a": {"b-c": "y"}})
    assert problems == [] and hooks[0].key == "hook-a-b-c.lua" and hooks[1].key.startswith("hook-")
    assert hooks[1].key != hooks[0].key
    spec["hooks"]["lua"].append({"configMapRef": {"name": "a", "key": "b-c"}})
    source = SettingsSource.from_body({"metadata": {"name": "default"}, "spec": spec})
    _, problems = collect_hooks(NS, source, {"a-b": {"c": "x"}, "a": {"b-c": "y"}})
    assert [p.reason for p in problems] == ["DuplicateHook"]
    assert "spec.hooks.lua[2]: ConfigMap mail/a key 'b-c' is already listed" in problems[0].message


def test_last_good_settings_come_from_the_secret_in_place() -> None:
    """The settings part of a rendered Secret is kept whole, or not at all when its hook files are not
    all there."""
    previous = {
        "relay.yaml": b"defaultBinding: bulk\nhooks:\n  lua: [hook-x-a.lua]\n  timeoutMs: 80\npolicies: []\n",
        "hook-x-a.lua": b"-- a",
        "ca-0123.pem": b"pem",
    }
    block, files = last_good(previous)
    assert block == {"defaultBinding": "bulk", "hooks": {"lua": ["hook-x-a.lua"], "timeoutMs": 80}}
    assert files == {"hook-x-a.lua": b"-- a"}
    del previous["hook-x-a.lua"]
    assert last_good(previous) == ({"defaultBinding": "bulk"}, {})
    assert last_good(None) == ({}, {})


def test_settings_render_into_relay_yaml_and_own_the_secret() -> None:
    body = {
        "metadata": {"name": "default", "uid": "u-1", "generation": 3},
        "spec": {
            "defaultBinding": "bulk",
            "limits": {"sessions": 20},
            "upstream": {"dataTimeoutSeconds": 900},
        },
    }
    source = SettingsSource.from_body(body)
    part = render_settings(NS, [source], (), [], None)
    assert part is not None
    rendering = render_namespace(NS, [], [], {}, part)
    data = yaml.safe_load(rendering.data["relay.yaml"])
    assert data == {
        "defaultBinding": "bulk",
        "upstream": {"dataTimeoutSeconds": 900.0},
        "limits": {"sessions": 20},
        "policies": [],
    }
    assert rendering.config.limits.sessions == 20
    assert [(o["kind"], o["uid"]) for o in rendering.owners] == [("OutboundRelaySettings", "u-1")]
    verdict = rendering.settings["default"]
    assert verdict.ready.status and verdict.generation == 3
    other = SettingsSource.from_body({"metadata": {"name": "other"}, "spec": {}})
    part = render_settings(NS, [other], (), [], None)
    assert part is not None and part.owner is None and part.block == {}
    assert part.verdicts["other"].ready.reason == "NotDefault"
