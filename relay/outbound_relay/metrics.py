"""Prometheus metrics (prefix `outbound_relay_`). Labels are bounded enums: never addresses or users."""

from __future__ import annotations

import platform
from enum import StrEnum

from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from outbound_relay import __version__

# The `policy` label of AUTH metrics: the name of the relay.yaml policy that supplied the credentials
# (bounded by the config, never by traffic), or one of these.
POLICY_HOOK = "hook"  # a hook set the password (outbound_smtp_auth_pass)
POLICY_NONE = "none"  # no policy supplies credentials (the AUTH is refused before any is sent)


class MessageResult(StrEnum):
    DELIVERED = "delivered"  # the upstream answered 250 to DATA
    DEFERRED = "deferred"  # we or the upstream answered 4xx: the client keeps the message and retries
    REJECTED = "rejected"  # the upstream answered 5xx


class AuthResult(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"  # the upstream refused the credentials (535 and kin)
    ERROR = "error"  # no verdict: connection lost, timeout, mechanism not offered


class TokenResult(StrEnum):
    SUCCESS = "success"  # an access token was issued
    REFUSED = "refused"  # the token endpoint answered with an OAuth2 error (invalid_grant, invalid_client)
    UNAVAILABLE = "unavailable"  # no usable answer: unreachable, TLS, timeout, not a token response


class RelayMetrics:
    """One registry per relay, so several relays (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages = Counter(
            "outbound_relay_messages",
            "Messages by outcome, as answered to the client.",
            ["result"],
            registry=r,
        )
        self.auth_attempts = Counter(
            "outbound_relay_auth_attempts",
            "AUTH exchanges with upstream servers, by the policy that supplied the credentials.",
            ["mechanism", "result", "policy"],
            registry=r,
        )
        self.auth_duration = Histogram(
            "outbound_relay_auth_duration_seconds",
            "From sending AUTH to the upstream's verdict, by the policy that supplied the credentials.",
            ["policy"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.plaintext_auth = Counter(
            "outbound_relay_plaintext_auth",
            "AUTH sent over plaintext or unverified TLS, as the policy that supplied the credentials allows.",
            registry=r,
        )
        self.delivery_duration = Histogram(
            "outbound_relay_delivery_duration_seconds",
            "From the end of the client's DATA to the upstream's reply.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.upstream_connections = Gauge(
            "outbound_relay_upstream_connections",
            "Open upstream connections, idle in the pool or busy with a transaction.",
            ["state"],
            registry=r,
        )
        self.config_reloads = Counter(
            "outbound_relay_config_reloads",
            "Config loads after start-up, by outcome.",
            ["result"],
            registry=r,
        )
        self.hook_errors = Counter(
            "outbound_relay_hook_errors",
            "Hooks that failed or ran past their deadline.",
            ["kind"],
            registry=r,
        )
        self.config_info = Gauge(
            "outbound_relay_config_info",
            "The config generation in force (a digest of relay.yaml), always 1.",
            ["generation"],
            registry=r,
        )
        self.config_revision_info = Gauge(
            "outbound_relay_config_revision_info",
            "The operator's revision of the config in force (relay.yaml's `revision`), always 1; absent "
            "when relay.yaml has none (written by hand).",
            ["revision"],
            registry=r,
        )
        self.build_info = Gauge(
            "outbound_relay_build_info",
            "The relay's version and Python, always 1.",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        # process_* (CPU, resident memory, open files, start time) and python_info, like every
        # prometheus_client exporter; the default registry's instances are reused so they read this process.
        r.register(PROCESS_COLLECTOR)
        r.register(PLATFORM_COLLECTOR)
        self.oauth2_token_requests = Counter(
            "outbound_relay_oauth2_token_requests",
            "Requests to OAuth2 token endpoints, by result.",
            ["result"],
            registry=r,
        )
        self.oauth2_token_expiry = Gauge(
            "outbound_relay_oauth2_token_expiry_seconds",
            "Seconds until the soonest-expiring cached OAuth2 access token expires (negative: expired "
            "since; NaN: none cached). Tokens are renewed when needed, shortly before they expire.",
            registry=r,
        )
        for result in MessageResult:
            self.messages.labels(result=result.value)
        for state in ("idle", "busy"):
            self.upstream_connections.labels(state=state)
        for outcome in ("success", "failure"):
            self.config_reloads.labels(result=outcome)
        for token_result in TokenResult:
            self.oauth2_token_requests.labels(result=token_result.value)
        self.oauth2_token_expiry.set(float("nan"))
        for kind in ("error", "timeout"):
            self.hook_errors.labels(kind=kind)
        self._generation: str | None = None
        self._revision: str | None = None

    def set_generation(self, generation: str, revision: str | None = None) -> None:
        if self._generation is not None:
            self.config_info.remove(self._generation)
        self._generation = generation
        self.config_info.labels(generation=generation).set(1)
        if self._revision is not None:
            self.config_revision_info.remove(self._revision)
        self._revision = revision
        if revision is not None:
            self.config_revision_info.labels(revision=revision).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# -- per-recipient outcomes (docs/metrics.md) -------------------------------------------------------------


class DsnResult(StrEnum):
    SENT = "sent"  # the upstream took the DSN for the sender
    REFUSED = "refused"  # the upstream refused the DSN, or the session failed before it was taken
    NO_SENDER = "no_sender"  # the message had the null sender: nobody to tell (RFC 5321 4.5.5)
    NOT_REQUESTED = "not_requested"  # the refused recipients' NOTIFY asked for no DSN on failure (RFC 3461)


class DeliveryMetrics:
    """Metrics of what happened to each recipient, on the relay's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.dsn = Counter(
            "outbound_relay_dsn",
            "Messages for which the relay owed the sender a DSN of its own (recipients refused at DATA "
            "while others got the message; NOTIFY=SUCCESS to an upstream without DSN): by whether the "
            "sender got it.",
            ["result"],
            registry=registry,
        )
        for result in DsnResult:
            self.dsn.labels(result=result.value)
