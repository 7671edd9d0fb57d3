"""relay.yaml parsing: the documented keys, Momentum spellings, and a clear error for every bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from outbound_relay.config import (
    AuthType,
    ConfigError,
    TlsMode,
    load_config,
    parse_config,
)

DOCUMENTED_EXAMPLE = """
listen: {host: 127.0.0.1, port: 2525}
metrics: {host: 0.0.0.0, port: 9425}
defaultBinding: default
bindingGroups: {marketing: [bulk-a, bulk-b]}
policies:
  - name: mail/sparkpost
    scope: {domain: sparkpost.com}
    type: PLAIN
    user: sparkpost
    password: s3cret-sparkpost
    gateway: {host: smtp.sparkpost.com, port: 587}
    tls: {mode: starttls, verify: true, caFile: /path/ca.pem}
hooks: {lua: [auth.lua], python: ["pkg.module:function"], timeoutMs: 50}
"""


def parse(text: str):  # type: ignore[no-untyped-def]
    return parse_config(yaml.safe_load(text))


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    return str(caught.value)


def test_design_example_parses() -> None:
    config = parse(DOCUMENTED_EXAMPLE)
    (policy,) = config.policies
    assert policy.type is AuthType.PLAIN
    assert policy.user == "sparkpost"
    assert policy.password is not None and policy.password.get_secret_value() == "s3cret-sparkpost"
    assert policy.tls is not None and policy.tls.mode is TlsMode.STARTTLS and policy.tls.verify
    assert config.group_of == {"bulk-a": "marketing", "bulk-b": "marketing"}
    assert config.hooks.timeout_ms == 50 and config.hooks.python == ("pkg.module:function",)


def test_defaults() -> None:
    config = parse("{}")
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 2525)
    assert config.metrics.port == 9425
    assert config.default_binding == "default"
    assert config.binding_header == "X-Binding"
    assert config.upstream.default_max_connections == 4


def test_momentum_spellings_case_insensitive() -> None:
    config = parse(
        """
        policies:
          - name: seed/messagesystems
            scope: {Domain: MessageSystems.com}
            Outbound_SMTP_AUTH_Type: login
            OUTBOUND_SMTP_AUTH_USER: msys
            outbound_smtp_auth_pass: msys
        """
    )
    (policy,) = config.policies
    assert policy.scope.domain == "messagesystems.com"
    assert policy.type is AuthType.LOGIN
    assert policy.user == "msys"
    assert policy.password is not None and policy.password.get_secret_value() == "msys"


def test_repr_never_shows_password() -> None:
    config = parse(DOCUMENTED_EXAMPLE)
    assert "s3cret-sparkpost" not in repr(config)
    assert "s3cret-sparkpost" not in str(config)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "policies: [{name: a, type: CRAM-MD5}]",
            "policies[0] (a): type: must be one of PLAIN, LOGIN, XOAUTH2",
        ),
        ("policies: [{name: a, gatway: {host: h, port: 25}}]", "policies[0] (a): gatway: unknown key"),
        ("policies: [{name: a, gateway: {host: h, port: 0}}]", "policies[0] (a): gateway.port"),
        ("policies: [{name: a, gateway: {host: h, port: 70000}}]", "policies[0] (a): gateway.port"),
        ("policies: [{name: a, tls: {mode: ssl}}]", "policies[0] (a): tls.mode"),
        ("policies: [{name: a, user: x, USER: y}]", "'USER' and 'user' set the same setting"),
        ("policies: [{name: a, password: x, passwordFile: /p}]", "set password or passwordFile, not both"),
        (
            "policies: [{name: a, scope: {domain: 'bad domain'}}]",
            "scope.domain: 'bad domain' is not a domain",
        ),
        ("policies: [{name: a, scope: {domain: 'a.*.com'}}]", "is not a domain name or a '*.example.com'"),
        (
            "policies: [{name: a, scope: {binding: b, bindingGroup: g}}]",
            "set binding or bindingGroup, not both",
        ),
        ("policies: [{name: a, scope: {bindingGroup: nope}}]", "bindingGroup 'nope' is not declared"),
        ("policies: [{name: a}, {name: a, scope: {domain: x.com}}]", "policies[1] (a): name is used by"),
        ("policies: [{name: a}, {name: b}]", "policies[1] (b): scope global is already taken by policy 'a'"),
        ("bindingGroups: {g1: [b], g2: [b]}", "binding 'b' is in both 'g1' and 'g2'"),
        ("listen: {host: 0.0.0.0}", "listen.host: must be a loopback address"),
        ("hooks: {python: ['not a ref']}", "hooks.python: 'not a ref' is not of the form"),
        ("hooks: {timeoutMs: 0}", "hooks.timeoutMs"),
        ("policies: [{type: PLAIN}]", "policies[0]: name"),
        ("frobnicate: true", "frobnicate: unknown key"),
    ],
)
def test_bad_input_names_key_and_reason(text: str, expected: str) -> None:
    assert expected in error_of(text)


def test_every_error_is_reported_at_once() -> None:
    message = error_of("policies: [{name: a, type: X, tls: {mode: y}}, {name: b, gateway: {port: 1}}]")
    assert "policies[0] (a): type" in message
    assert "policies[0] (a): tls.mode" in message
    assert "policies[1] (b): gateway.host" in message


def test_top_level_must_be_mapping() -> None:
    assert "top level must be a mapping" in error_of("- a")


def test_password_file_read_relative_to_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text("from-file\n")
    path = tmp_path / "relay.yaml"
    path.write_text("policies: [{name: a, passwordFile: secrets/pw}]")
    (policy,) = load_config(path).policies
    assert policy.password is not None and policy.password.get_secret_value() == "from-file"


def test_missing_password_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("policies: [{name: a, passwordFile: nope}]")
    with pytest.raises(ConfigError, match=r"policies\[0\] \(a\): passwordFile .*nope.* cannot be read"):
        load_config(path)


def test_unreadable_or_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_ca_file_is_relative_to_config_and_must_exist(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not checked here")
    path = tmp_path / "relay.yaml"
    path.write_text("policies: [{name: a, tls: {caFile: ca.pem}}]")
    (policy,) = load_config(path).policies
    assert policy.tls is not None and policy.tls.ca_file == tmp_path / "ca.pem"
    path.write_text("policies: [{name: a, tls: {caFile: missing.pem}}]")
    with pytest.raises(
        ConfigError, match=r"policies\[0\] \(a\): tls.caFile .*missing.pem.* is not a readable file"
    ):
        load_config(path)


def test_yaml_errors_do_not_quote_the_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("policies:\n  - name: a\n    password: s3cr3t: Tok3n\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "line 3" in str(caught.value)
    assert "Tok3n" not in str(caught.value)


def test_consistency_problems_are_reported_together() -> None:
    message = error_of(
        "bindingGroups: {g1: [b], g2: [b]}\npolicies: [{name: a}, {name: a, scope: {bindingGroup: nope}}]"
    )
    assert "binding 'b' is in both" in message
    assert "policies[1] (a): name is used by an earlier policy" in message
    assert "bindingGroup 'nope' is not declared" in message


def test_binding_header_must_be_a_header_name() -> None:
    assert "bindingHeader" in error_of("bindingHeader: 'X-Bindüng'")
    assert "bindingHeader" in error_of("bindingHeader: 'X Binding'")
