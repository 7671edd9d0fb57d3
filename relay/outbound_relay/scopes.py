"""Scope resolution in Momentum's documented fallback order, each setting falling back on its own.

For recipient domain D on binding B (a member of binding group G), most specific first:
1. D inside B, 2. D inside G, 3. B, 4. G, 5. D (global Domain stanza), 6. global.
Within a level an exact domain beats a `*.example.com` wildcard, and a longer wildcard a shorter one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Generic, TypeVar

from pydantic import SecretStr

from outbound_relay.config import (
    AuthType,
    Endpoint,
    OAuth2Settings,
    Policy,
    RelayConfig,
    TlsMode,
    TlsSettings,
)
from outbound_relay.metrics import POLICY_HOOK, POLICY_NONE

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


# Resolved routes and signatures kept per config generation; past this the cache starts over.
MAX_CACHED = 10_000


class Level(IntEnum):
    DOMAIN_IN_BINDING = 1
    DOMAIN_IN_BINDING_GROUP = 2
    BINDING = 3
    BINDING_GROUP = 4
    DOMAIN = 5
    GLOBAL = 6


def level_of(policy: Policy) -> Level:
    scope = policy.scope
    if scope.domain:
        if scope.binding:
            return Level.DOMAIN_IN_BINDING
        return Level.DOMAIN_IN_BINDING_GROUP if scope.binding_group else Level.DOMAIN
    if scope.binding:
        return Level.BINDING
    return Level.BINDING_GROUP if scope.binding_group else Level.GLOBAL


@dataclass(frozen=True, kw_only=True)
class Sourced(Generic[T_co]):
    """A setting's value and where it came from: a policy's scope, or a hook's message context."""

    value: T_co
    source: str  # "policy mail/sparkpost (domain=sparkpost.com)", "hook", "default"


@dataclass(frozen=True)
class OAuth2Source:
    """An `oauth2` block and the policy that sets it (which names it in metrics and replies)."""

    policy: str
    settings: OAuth2Settings

    def identity(self) -> str:
        return self.settings.identity()


@dataclass(frozen=True, kw_only=True)
class Route:
    """Everything needed to deliver one transaction upstream."""

    domain: str
    binding: str
    type: Sourced[AuthType] | None
    user: Sourced[str] | None
    password: Sourced[SecretStr] | None
    gateway: Sourced[Endpoint] | None
    tls: Sourced[TlsSettings]
    max_connections: Sourced[int]
    # Instead of a password: where XOAUTH2's access token comes from. One policy gives the password or
    # this, never both, and the two fall back together as one setting.
    oauth2: Sourced[OAuth2Source] | None = None
    suspended: str | None = None  # why this route must not be used: a suspended policy in its way
    # The policy that allows the credentials over plaintext or unverified TLS: the one supplying them,
    # when it sets that TLS itself or says allowInsecureAuth. None: they need verified TLS.
    insecure_auth_by: str | None = None
    # Why the credentials must not go to this route's gateway: it comes from a narrower policy than they
    # do, so whoever may write that policy could point another policy's credentials at their own server.
    gateway_not_trusted: str | None = None
    # The name of the policy that supplies the credentials, "hook" when a hook set the password, "none"
    # without any: the `policy` label of AUTH metrics (bounded by the config).
    credential_policy: str = POLICY_NONE
    # The policy that gives the credentials (else the gateway), and its scope: what logs name.
    policy: str | None = None
    scope: str | None = None

    @property
    def tls_protects_auth(self) -> bool:
        """The TLS settings keep credentials from a passive or active attacker: encrypted and verified."""
        tls = self.tls.value
        return tls.mode is not TlsMode.NONE and tls.verify

    def auth_exposure(self) -> str | None:
        """Why AUTH must not be sent on this route, or None when it may: credentials go over plaintext or
        unverified TLS only when the policy supplying them allows it itself (`insecure_auth_by`)."""
        credential = self.password or self.oauth2  # an access token is as secret as a password
        if credential is not None and self.gateway_not_trusted is not None:
            return self.gateway_not_trusted
        if self.tls_protects_auth or self.insecure_auth_by is not None or credential is None:
            return None
        weakness = "plaintext" if self.tls.value.mode is TlsMode.NONE else "TLS without verification"
        return (
            f"the credentials from {credential.source} would go over {weakness} "
            f"(tls from {self.tls.source}); set allowInsecureAuth: true in the policy that gives them, "
            "or tls for it, to allow that"
        )

    def with_overrides(self, *, type: str | None, user: str | None, password: str | None) -> Route:
        """Apply a hook's message-context values (`outbound_smtp_auth_*`), which beat every scope."""
        return replace(
            self,
            type=Sourced(value=AuthType.parse(type), source="hook") if type is not None else self.type,
            user=Sourced(value=user, source="hook") if user is not None else self.user,
            password=Sourced(value=SecretStr(password), source="hook")
            if password is not None
            else self.password,
            oauth2=None if password is not None else self.oauth2,
            # A hook's password is no policy's: it needs TLS that protects it, and goes where the route goes.
            insecure_auth_by=None if password is not None else self.insecure_auth_by,
            gateway_not_trusted=None if password is not None else self.gateway_not_trusted,
            credential_policy=POLICY_HOOK if password is not None else self.credential_policy,
            policy="hook" if password is not None else self.policy,
            scope="message" if password is not None else self.scope,
        )

    def identity(self) -> str:
        """Who we authenticate as; a digest, so a pool key never carries the secret itself. With oauth2
        it covers the token's source, not the token, which changes at every refresh."""
        if self.oauth2 is not None:
            secret = "oauth2:" + self.oauth2.value.identity()
        else:
            secret = self.password.value.get_secret_value() if self.password else ""
        digest = hashlib.sha256()
        for part in (self.type.value if self.type else "", self.user.value if self.user else "", secret):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:16]


def _describe(policy: Policy) -> str:
    return f"policy {policy.name} ({policy.scope.describe()})"


def _part(policy: Sourced[Policy] | None, setting: Callable[[Policy], T | None]) -> Sourced[T] | None:
    value = None if policy is None else setting(policy.value)
    return None if policy is None or value is None else Sourced(value=value, source=policy.source)


def _domain_matches(pattern: str, domain: str) -> bool:
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return pattern == domain


def _specificity(pattern: str) -> tuple[int, int]:
    """Exact first, then wildcards, longest (most specific) first."""
    return (1, -len(pattern)) if pattern.startswith("*.") else (0, 0)


class ScopeIndex:
    """The policies of one config generation, indexed for lookups; results are cached per (domain, binding)
    since a sidecar sees few distinct pairs and the config is immutable."""

    def __init__(self, config: RelayConfig) -> None:
        self.config = config
        self._group_of = config.group_of
        self._by_level: dict[Level, list[Policy]] = {level: [] for level in Level}
        for policy in config.policies:
            self._by_level[level_of(policy)].append(policy)
        self._routes: dict[tuple[str, str], Route] = {}
        self._signatures: dict[str, tuple[str, ...]] = {}
        self._fixed: dict[str, Route | None] = {}
        # Every binding a policy can tell apart: those named in scopes and binding groups, the default,
        # and one named nowhere (which stands for every other name the binding header could give).
        self._bindings = sorted(
            {config.default_binding, "\0any-other-binding", *self._group_of}
            | {p.scope.binding for p in config.policies if p.scope.binding is not None}
        )
        # Without a gateway on the global policy, some routes may have none; keep those domains apart.
        self._domains_always_split = not any(p.gateway is not None for p in self._by_level[Level.GLOBAL])

    def chain(self, domain: str, binding: str) -> list[Policy]:
        """Every policy that applies to (domain, binding), most specific first."""
        domain = domain.lower().rstrip(".")
        group = self._group_of.get(binding)

        def domain_policies(
            level: Level, *, binding: str | None = None, group: str | None = None
        ) -> list[Policy]:
            found = [
                p
                for p in self._by_level[level]
                if p.scope.domain is not None
                and _domain_matches(p.scope.domain, domain)
                and p.scope.binding == binding
                and p.scope.binding_group == group
            ]
            return sorted(found, key=lambda p: _specificity(p.scope.domain or ""))

        chain = domain_policies(Level.DOMAIN_IN_BINDING, binding=binding)
        if group is not None:
            chain += domain_policies(Level.DOMAIN_IN_BINDING_GROUP, group=group)
        chain += [p for p in self._by_level[Level.BINDING] if p.scope.binding == binding]
        if group is not None:
            chain += [p for p in self._by_level[Level.BINDING_GROUP] if p.scope.binding_group == group]
        chain += domain_policies(Level.DOMAIN)
        chain += self._by_level[Level.GLOBAL]
        return chain

    def route(self, domain: str, binding: str) -> Route:
        key = (domain.lower().rstrip("."), binding)
        route = self._routes.get(key)
        if route is None:
            if len(self._routes) >= MAX_CACHED:  # the binding header is the app's to choose: stay bounded
                self._routes.clear()
            route = self._resolve(*key)
            self._routes[key] = route
        return route

    def _resolve(self, domain: str, binding: str) -> Route:
        chain = self.chain(domain, binding)
        # Nothing falls back past a suspended policy: its settings are unknown, so they would have won.
        stop = next((i for i, p in enumerate(chain) if p.suspended is not None), None)
        suspended_by = chain[stop] if stop is not None else None
        chain = chain[:stop]
        unresolved: list[str] = []

        def first(name: str, setting: Callable[[Policy], T | None]) -> Sourced[T] | None:
            for policy in chain:
                value = setting(policy)
                if value is not None:
                    return Sourced(value=value, source=_describe(policy))
            unresolved.append(name)
            return None

        secret = first("password", lambda p: p if p.password is not None or p.oauth2 is not None else None)
        route = Route(
            domain=domain,
            binding=binding,
            type=first("type", lambda p: p.type),
            user=first("user", lambda p: p.user),
            password=_part(secret, lambda p: p.password),
            oauth2=_part(secret, lambda p: OAuth2Source(p.name, p.oauth2) if p.oauth2 else None),
            gateway=first("gateway", lambda p: p.gateway),
            tls=first("tls", lambda p: p.tls) or Sourced(value=TlsSettings(), source="default"),
            max_connections=first("maxConnections", lambda p: p.max_connections)
            or Sourced(value=self.config.upstream.default_max_connections, source="default"),
        )
        password_by = next((p for p in chain if p.password is not None or p.oauth2 is not None), None)
        if password_by is not None:
            route = replace(route, credential_policy=password_by.name)
        if password_by is not None and (
            password_by.allow_insecure_auth or route.tls.source == _describe(password_by)
        ):
            route = replace(route, insecure_auth_by=_describe(password_by))
        gateway_by = next((p for p in chain if p.gateway is not None), None)
        if (named_by := password_by or gateway_by) is not None:
            route = replace(route, policy=named_by.name, scope=named_by.scope.describe())
        if (
            password_by is not None
            and gateway_by is not None
            and chain.index(gateway_by) < chain.index(password_by)
        ):
            route = replace(
                route,
                gateway_not_trusted=(
                    f"the gateway from {_describe(gateway_by)} is more specific than "
                    f"{_describe(password_by)}, which gives the credentials; credentials go only to a "
                    "gateway of their own policy or of a wider scope: set the gateway there, or the "
                    "credentials in the gateway's policy"
                ),
            )
        if suspended_by is not None and unresolved:
            route = replace(
                route, suspended=f"{_describe(suspended_by)} is suspended: {suspended_by.suspended}"
            )
        return route

    def fixed_route(self, domain: str) -> Route | None:
        """The route of `domain` when no binding can change it (every binding resolves to the same
        server, credentials and settings), else None: then only the message's binding header decides,
        after DATA. Hooks are not considered here; they can change any route."""
        domain = domain.lower().rstrip(".")
        if domain in self._fixed:
            return self._fixed[domain]
        routes = [self.route(domain, binding) for binding in self._bindings]
        first = self.route(domain, self.config.default_binding)
        same = all(replace(r, binding=first.binding) == first for r in routes)
        if len(self._fixed) >= MAX_CACHED:
            self._fixed.clear()
        self._fixed[domain] = found = first if same else None
        return found

    def signature(self, domain: str) -> tuple[str, ...]:
        """Recipients whose domains share a signature resolve alike for every binding and hook, so they
        can share one upstream transaction."""
        domain = domain.lower().rstrip(".")
        found = self._signatures.get(domain)
        if found is None:
            found = tuple(
                p.name
                for level in (Level.DOMAIN_IN_BINDING, Level.DOMAIN_IN_BINDING_GROUP, Level.DOMAIN)
                for p in self._by_level[level]
                if p.scope.domain is not None and _domain_matches(p.scope.domain, domain)
            )
            if self._domains_always_split:
                found = (*found, f"domain:{domain}")
            if len(self._signatures) >= MAX_CACHED:
                self._signatures.clear()
            self._signatures[domain] = found
        return found
