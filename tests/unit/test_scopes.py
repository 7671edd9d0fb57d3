"""Scope fallback in Momentum's documented order, each setting on its own."""

from __future__ import annotations

from typing import Any

import pytest

from outbound_relay.config import AuthType, parse_config
from outbound_relay.scopes import Level, ScopeIndex

LEVEL_SCOPES: dict[Level, dict[str, str]] = {
    Level.DOMAIN_IN_BINDING: {"domain": "example.com", "binding": "bulk-a"},
    Level.DOMAIN_IN_BINDING_GROUP: {"domain": "example.com", "bindingGroup": "marketing"},
    Level.BINDING: {"binding": "bulk-a"},
    Level.BINDING_GROUP: {"bindingGroup": "marketing"},
    Level.DOMAIN: {"domain": "example.com"},
    Level.GLOBAL: {},
}


def index(*policies: dict[str, Any]) -> ScopeIndex:
    return ScopeIndex(
        parse_config({"bindingGroups": {"marketing": ["bulk-a", "bulk-b"]}, "policies": list(policies)})
    )


def at(level: Level, **settings: Any) -> dict[str, Any]:
    return {"name": f"p{level.value}", "scope": LEVEL_SCOPES[level], **settings}


@pytest.mark.parametrize(
    "present", [list(Level)[i:] for i in range(len(Level))], ids=lambda p: f"from-{p[0].name}"
)
def test_most_specific_present_level_wins(present: list[Level]) -> None:
    scopes = index(*(at(level, user=f"user-{level.value}") for level in present))
    route = scopes.route("example.com", "bulk-a")
    assert route.user is not None
    assert route.user.value == f"user-{present[0].value}"
    assert route.user.source.startswith(f"policy p{present[0].value} ")


def test_each_setting_falls_back_on_its_own() -> None:
    scopes = index(
        at(Level.DOMAIN_IN_BINDING, user="u1"),
        at(Level.DOMAIN_IN_BINDING_GROUP, password="p2"),
        at(Level.BINDING, type="LOGIN"),
        at(Level.BINDING_GROUP, tls={"mode": "implicit"}),
        at(Level.DOMAIN, maxConnections=7),
        at(Level.GLOBAL, gateway={"host": "smtp.example.net", "port": 587}, type="PLAIN", user="u6"),
    )
    route = scopes.route("example.com", "bulk-a")
    assert route.user and route.user.value == "u1"
    assert route.password and route.password.value.get_secret_value() == "p2"
    assert route.type and route.type.value is AuthType.LOGIN and route.type.source.startswith("policy p3")
    assert route.tls.value.mode.value == "implicit" and route.tls.source.startswith("policy p4")
    assert route.max_connections.value == 7
    assert route.gateway and route.gateway.value.host == "smtp.example.net"


def test_levels_that_do_not_apply_are_skipped() -> None:
    scopes = index(*(at(level, user=f"user-{level.value}") for level in Level))
    # Another binding of the same group: levels 1 and 3 (binding bulk-a) do not apply.
    assert scopes.route("example.com", "bulk-b").user.value == "user-2"  # type: ignore[union-attr]
    # A binding in no group: only domain and global.
    assert scopes.route("example.com", "default").user.value == "user-5"  # type: ignore[union-attr]
    # Another domain on bulk-a: binding, then group, then global.
    assert scopes.route("other.org", "bulk-a").user.value == "user-3"  # type: ignore[union-attr]
    assert scopes.route("other.org", "bulk-b").user.value == "user-4"  # type: ignore[union-attr]
    assert scopes.route("other.org", "default").user.value == "user-6"  # type: ignore[union-attr]


def test_nothing_set_means_no_auth_and_defaults() -> None:
    route = index().route("example.com", "default")
    assert route.type is None and route.user is None and route.password is None and route.gateway is None
    assert route.tls.value.mode.value == "starttls" and route.tls.value.verify
    assert route.tls.source == "default"
    assert route.max_connections.value == 4


def test_exact_beats_wildcard_and_longer_wildcard_beats_shorter() -> None:
    scopes = index(
        {"name": "wide", "scope": {"domain": "*.example.com"}, "user": "wide"},
        {"name": "narrow", "scope": {"domain": "*.eu.example.com"}, "user": "narrow"},
        {"name": "exact", "scope": {"domain": "mx.eu.example.com"}, "user": "exact"},
    )
    assert scopes.route("mx.eu.example.com", "default").user.value == "exact"  # type: ignore[union-attr]
    assert scopes.route("a.eu.example.com", "default").user.value == "narrow"  # type: ignore[union-attr]
    assert scopes.route("a.example.com", "default").user.value == "wide"  # type: ignore[union-attr]
    # A wildcard covers subdomains only, not the domain itself.
    assert scopes.route("example.com", "default").user is None


def test_domain_match_ignores_case_and_trailing_dot() -> None:
    scopes = index({"name": "d", "scope": {"domain": "Example.COM"}, "user": "x"})
    assert scopes.route("EXAMPLE.com.", "default").user.value == "x"  # type: ignore[union-attr]


def test_chain_lists_levels_in_order() -> None:
    scopes = index(*(at(level) for level in reversed(Level)))
    assert [p.name for p in scopes.chain("example.com", "bulk-a")] == ["p1", "p2", "p3", "p4", "p5", "p6"]


def test_signature_groups_domains_that_resolve_alike() -> None:
    scopes = index(
        {"name": "global", "gateway": {"host": "smtp.example.net", "port": 587}},
        {"name": "sp", "scope": {"domain": "sparkpost.com"}, "user": "sp"},
        {"name": "wild", "scope": {"domain": "*.example.com"}, "user": "w"},
    )
    assert scopes.signature("a.org") == scopes.signature("b.org")
    assert scopes.signature("sparkpost.com") != scopes.signature("a.org")
    assert scopes.signature("x.example.com") == scopes.signature("y.example.com")
    assert scopes.signature("x.example.com") != scopes.signature("sparkpost.com")


def test_signature_splits_every_domain_when_a_route_may_lack_a_gateway() -> None:
    scopes = index({"name": "sp", "scope": {"domain": "sparkpost.com"}, "user": "sp"})
    assert scopes.signature("a.org") != scopes.signature("b.org")


def test_hook_overrides_beat_every_scope() -> None:
    scopes = index(at(Level.DOMAIN_IN_BINDING, type="PLAIN", user="u1", password="p1"))
    route = scopes.route("example.com", "bulk-a").with_overrides(type="xoauth2", user=None, password="tok")
    assert route.type and route.type.value is AuthType.XOAUTH2 and route.type.source == "hook"
    assert route.user and route.user.value == "u1" and route.user.source.startswith("policy p1")
    assert route.password and route.password.value.get_secret_value() == "tok"


def test_identity_changes_with_password() -> None:
    a = index(at(Level.GLOBAL, type="PLAIN", user="u", password="one")).route("x.org", "default")
    b = index(at(Level.GLOBAL, type="PLAIN", user="u", password="two")).route("x.org", "default")
    assert a.identity() != b.identity()
    assert "one" not in a.identity()


def test_suspended_policy_is_never_fallen_back_past() -> None:
    scopes = index(
        {"name": "global", "type": "PLAIN", "user": "g", "password": "gp",
         "gateway": {"host": "smtp.example.net", "port": 587}},
        {"name": "sp", "scope": {"domain": "sparkpost.com"},
         "suspended": "Secret mail/sp key password is missing"},
    )  # fmt: skip
    route = scopes.route("sparkpost.com", "default")
    assert route.suspended is not None
    assert (
        "policy sp (domain=sparkpost.com) is suspended: Secret mail/sp key password is missing"
        in route.suspended
    )
    assert scopes.route("other.org", "default").suspended is None


def test_suspended_policy_below_a_complete_scope_does_not_matter() -> None:
    complete = {"type": "PLAIN", "user": "u", "password": "p", "gateway": {"host": "h", "port": 25},
                "tls": {"mode": "starttls"}, "maxConnections": 2}  # fmt: skip
    scopes = index(
        {"name": "global", "suspended": "Secret missing"},
        {"name": "sp", "scope": {"domain": "sparkpost.com"}, **complete},
    )
    assert scopes.route("sparkpost.com", "default").suspended is None
    assert scopes.route("other.org", "default").suspended is not None
