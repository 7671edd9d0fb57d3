"""The operator's Prometheus metrics (docs/metrics.md): bounded labels; no names of objects but the
namespaces the operator serves."""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from outbound_operator.render import POLICY_CONDITIONS, Verdict


class ReconcileResult(StrEnum):
    WRITTEN = "written"  # the rendered Secret was created, replaced or deleted
    UNCHANGED = "unchanged"  # rendered the same bytes: nothing written
    ERROR = "error"  # retried with backoff; the rendered Secret in place is kept


class Webhook(StrEnum):
    """The webhooks the operator serves, by the path the API server calls (webhook.py)."""

    MUTATE_PODS = "mutate-pods"  # sidecar injection
    VALIDATE_POLICIES = "validate-policies"  # who may name which Secret in a policy


class WebhookResult(StrEnum):
    ALLOWED = "allowed"  # admitted, with or without a patch
    DENIED = "denied"  # refused with a reason the user can act on (a bad annotation, an unreadable Secret)
    ERROR = "error"  # could not decide (a SubjectAccessReview failed): refused, the user should retry
    INVALID = "invalid"  # not an AdmissionReview as the API server sends one: answered 400


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reconciles = Counter(
            "outbound_operator_reconcile",
            "Namespace reconciliations, by result.",
            ["result"],
            registry=self.registry,
        )
        self.policies = Gauge(
            "outbound_operator_policies",
            "OutboundAuthPolicy objects whose condition is True, by condition type.",
            ["condition"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "outbound_operator_reconcile_duration_seconds",
            "Time to reconcile one namespace: read, render, write.",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.config_revision = Gauge(
            "outbound_operator_config_revision_info",
            "The revision of each served namespace's rendered Secret outbound-relay-config, as last "
            'written or found in place, always 1 (docs/metrics.md, "Stale sidecars").',
            ["config_namespace", "revision"],
            registry=self.registry,
        )
        self._revisions: dict[str, str] = {}
        self.pods_without_sidecar = Gauge(
            "outbound_operator_pods_without_sidecar",
            "Pods annotated for injection that run without the relay sidecar, per namespace labelled for "
            "injection (counted every 30 s).",
            ["config_namespace"],
            registry=self.registry,
        )
        self._uninjected_namespaces: set[str] = set()
        self.webhook_requests = Counter(
            "outbound_operator_webhook_requests",
            "Admission requests answered by the operator's webhooks, by webhook and result.",
            ["webhook", "result"],
            registry=self.registry,
        )
        self.leader = Gauge(
            "outbound_operator_leader",
            "1 while this replica holds the leader Lease and writes; 0 while it follows.",
            registry=self.registry,
        )
        for result in ReconcileResult:
            self.reconciles.labels(result=result.value)
        for webhook in Webhook:
            for answer in WebhookResult:
                self.webhook_requests.labels(webhook=webhook.value, result=answer.value)
        for kind in POLICY_CONDITIONS:
            self.policies.labels(condition=kind.value).set(0)
        self._by_namespace: dict[str, Tally[str]] = {}

    def set_policies(self, namespace: str, verdicts: Mapping[str, Verdict]) -> None:
        """Record the namespace's policies by condition; the gauge is the sum over namespaces."""
        tally: Tally[str] = Tally()
        for verdict in verdicts.values():
            tally.update(c.type.value for c in verdict.conditions if c.status)
        if tally or namespace in self._by_namespace:
            self._by_namespace[namespace] = tally
        for kind in POLICY_CONDITIONS:
            self.policies.labels(condition=kind.value).set(
                sum(t[kind.value] for t in self._by_namespace.values())
            )

    def set_revision(self, namespace: str, revision: int | None) -> None:
        """One series per namespace: the revision in force there; None removes it (no rendered Secret, or
        no longer served)."""
        old = self._revisions.pop(namespace, None)
        if old is not None and old != str(revision):
            self.config_revision.remove(namespace, old)
        if revision is not None:
            self._revisions[namespace] = str(revision)
            self.config_revision.labels(config_namespace=namespace, revision=str(revision)).set(1)

    def set_pods_without_sidecar(self, counts: Mapping[str, int]) -> None:
        """One series per namespace labelled for injection; a namespace no longer labelled loses its own."""
        for namespace in self._uninjected_namespaces - counts.keys():
            self.pods_without_sidecar.remove(namespace)
        for namespace, count in counts.items():
            self.pods_without_sidecar.labels(config_namespace=namespace).set(count)
        self._uninjected_namespaces = set(counts)

    def clear_revisions(self) -> None:
        """Forget every namespace's revision: a replica that stops writing (no longer the leader) must not
        go on exporting what another replica may since have changed."""
        for namespace in list(self._revisions):
            self.set_revision(namespace, None)

    def serve(self, host: str, port: int) -> Any:
        """Start the /metrics endpoint in a thread; returns the server (shutdown() to stop it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
