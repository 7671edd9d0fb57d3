"""The `oauth2` block of an XOAUTH2 policy: spelling, validation errors naming the key, files relative to
relay.yaml, hot-reload watching, scope resolution, and a pool identity that a token refresh leaves alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from outbound_relay.config import ConfigError, load_config, parse_config, read_config, watched_files
from outbound_relay.scopes import ScopeIndex

BASE = {
    "name": "mail/o365",
    "type": "XOAUTH2",
    "user": "sender@contoso.onmicrosoft.com",
    "gateway": {"host": "smtp.office365.com", "port": 587},
}
OAUTH2 = {
    "tokenUrl": "https://login.microsoftonline.com/contoso/oauth2/v2.0/token",
    "clientId": "app-id",
    "clientSecret": "app-s3cret-value",
    "scopes": ["https://outlook.office365.com/.default"],
}


def config_with(oauth2: object, **policy: object) -> dict[str, object]:
    return {"policies": [{**BASE, **policy, "oauth2": oauth2}]}


def error_of(data: object) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    return str(caught.value)


def test_client_credentials_block() -> None:
    (policy,) = parse_config(config_with(OAUTH2)).policies
    assert policy.oauth2 is not None
    assert policy.oauth2.grant == "client_credentials"
    assert policy.oauth2.scopes == ("https://outlook.office365.com/.default",)
    assert "app-s3cret-value" not in repr(policy)


def test_refresh_token_grant_and_spellings() -> None:
    block = {
        "token_url": "https://oauth2.googleapis.com/token",
        "CLIENT-ID": "gmail-app",
        "refresh_token": "1//refresh",
        "scopes": "https://mail.google.com/",  # space-delimited, as RFC 6749 writes it
    }
    (policy,) = parse_config(config_with(block)).policies
    assert policy.oauth2 is not None
    assert policy.oauth2.grant == "refresh_token"
    assert policy.oauth2.client_secret is None  # a public client may refresh without a secret
    assert policy.oauth2.scopes == ("https://mail.google.com/",)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"tokenUrl": "ftp://x/token"}, "oauth2.tokenUrl: must be an https:// URL"),
        ({"tokenUrl": "http://login.example.com/token"}, "oauth2.tokenUrl: must be https://"),
        ({"tokenUrl": "https://u:p@login.example.com/token"}, "oauth2.tokenUrl: must not carry credentials"),
        ({"clientId": None}, "clientId (or clientIdFile) is required"),
        ({"clientIdFile": "id"}, "set clientId or clientIdFile, not both"),
        ({"clientSecretFile": "s"}, "set clientSecret or clientSecretFile, not both"),
        ({"clientSecret": None}, "the client_credentials grant (no refreshToken) needs clientSecret"),
        ({"refreshToken": "r", "refreshTokenFile": "f"}, "set refreshToken or refreshTokenFile, not both"),
        ({"scopes": ["a b"]}, "oauth2.scopes: 'a b' is not a scope token"),
        ({"scope": ["x"]}, "oauth2.scope: unknown key"),
    ],
)
def test_bad_blocks_name_the_key(change: dict[str, object], expected: str) -> None:
    block = {k: v for k, v in {**OAUTH2, **change}.items() if v is not None}
    message = error_of(config_with(block))
    assert "policies[0] (mail/o365)" in message
    assert expected in message
    assert "app-s3cret-value" not in message


def test_loopback_http_is_allowed() -> None:
    (policy,) = parse_config(config_with({**OAUTH2, "tokenUrl": "http://127.0.0.1:4444/token"})).policies
    assert policy.oauth2 is not None


def test_oauth2_needs_xoauth2_and_no_password() -> None:
    assert "oauth2 needs type: XOAUTH2" in error_of(config_with(OAUTH2, type="PLAIN"))
    assert "set password (or passwordFile) or oauth2, not both" in error_of(
        config_with(OAUTH2, password="static-token")
    )


def test_files_relative_to_config_and_watched(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    for name, value in (("id", "file-client\n"), ("secret", "file-secret\n"), ("refresh", "file-rt\n")):
        (tmp_path / "s" / name).write_text(value)
    (tmp_path / "ca.pem").write_text("not parsed here")
    block = {
        "tokenUrl": "https://login.example.com/token",
        "clientIdFile": "s/id",
        "clientSecretFile": "s/secret",
        "refreshTokenFile": "s/refresh",
        "caFile": "ca.pem",
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config_with(block)))
    config, _digest = read_config(path)
    settings = config.policies[0].oauth2
    assert settings is not None
    assert settings.client_id == "file-client"
    assert settings.client_secret is not None and settings.client_secret.get_secret_value() == "file-secret"
    assert settings.refresh_token is not None and settings.refresh_token.get_secret_value() == "file-rt"
    assert settings.ca_file == tmp_path / "ca.pem"
    watched = watched_files(parse_config(yaml.safe_load(path.read_text())), path)
    assert {tmp_path / "s" / n for n in ("id", "secret", "refresh")} | {tmp_path / "ca.pem"} <= set(watched)


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("clientSecretFile", r"policies\[0\] \(mail/o365\): oauth2.clientSecretFile .*nope.* cannot be read"),
        ("caFile", r"policies\[0\] \(mail/o365\): oauth2.caFile .*nope.* is not a readable file"),
    ],
)
def test_missing_files_are_named(tmp_path: Path, key: str, expected: str) -> None:
    block = {**OAUTH2, key: "nope"}
    block.pop("clientSecret") if key == "clientSecretFile" else None
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config_with(block)))
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_route_takes_oauth2_as_the_password_and_keeps_its_identity() -> None:
    data = {
        "policies": [
            {**BASE, "name": "mail/global", "scope": {}, "oauth2": OAUTH2},
            {"name": "mail/gw", "scope": {"domain": "x.com"}, "maxConnections": 2},
            {"name": "mail/static", "scope": {"domain": "y.com"}, "type": "XOAUTH2", "password": "tok"},
        ]
    }
    index = ScopeIndex(parse_config(data))
    route = index.route("x.com", "default")
    assert route.password is None
    assert route.oauth2 is not None
    assert route.oauth2.value.policy == "mail/global"
    assert route.oauth2.source == "policy mail/global (global)"
    # A narrower static token wins over the wider oauth2 block, as one setting.
    static = index.route("y.com", "default")
    assert static.oauth2 is None
    assert static.password is not None
    # A hook's password beats every scope, the oauth2 block included.
    overridden = route.with_overrides(type=None, user=None, password="hook-token")
    assert overridden.oauth2 is None
    assert overridden.identity() != route.identity()


@pytest.mark.parametrize("secret", [OAUTH2["clientSecret"], "other-secret", "app-s3cret-valu"])
def test_identity_depends_on_the_source_not_on_tokens(secret: str) -> None:
    """The pool key of an oauth2 route is the same for every token the source issues, and differs
    when what decides the token (here the client secret) differs."""
    first = ScopeIndex(parse_config(config_with(OAUTH2))).route("a.com", "default")
    other = ScopeIndex(parse_config(config_with({**OAUTH2, "clientSecret": secret}))).route(
        "a.com", "default"
    )
    assert (first.identity() == other.identity()) == (secret == OAUTH2["clientSecret"])


def test_the_oauth2_client_is_loaded_only_when_a_token_is_fetched() -> None:
    """Authlib and httpx2 cost some 13 MB: a relay without oauth2 policies never loads them."""
    import subprocess
    import sys

    code = (
        "import sys, outbound_relay.server, outbound_relay.cli; "
        "print(sorted({'authlib', 'httpx2'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
