"""The operator's Prometheus metrics (docs/metrics.md): bounded labels, no names of objects."""

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
        self.leader = Gauge(
            "outbound_operator_leader",
            "1 while this replica holds the leader Lease and writes; 0 while it follows.",
            registry=self.registry,
        )
        for result in ReconcileResult:
            self.reconciles.labels(result=result.value)
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

    def serve(self, host: str, port: int) -> Any:
        """Start the /metrics endpoint in a thread; returns the server (shutdown() to stop it)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
