"""Opted-in Pods that run without the sidecar, made visible.

The webhook's failurePolicy is Ignore (the chart's default): a Pod created while no operator answers (a
restart, an upgrade, a node drain) is admitted as written, without the relay, and its mail to
127.0.0.1:2525 fails until the Pod is recreated. Nothing in the Pod says so. So the operator looks, once
it serves the webhook and then periodically, in every namespace labelled for injection, for Pods that
carry `outboundrelay.io/inject: "true"` but no sidecar, and reports each one once: a Warning Event
`SidecarNotInjected` on the Pod (`kubectl describe pod`, `kubectl get events`) and a log line naming it.
How many each namespace has now is a metric (`outbound_operator_pods_without_sidecar`) and a column of
`kubectl get outboundauthpolicies` (status.podsWithoutSidecar of every policy in the namespace).
With leader election only the leader scans (and posts): a new leader reports again, once, the Pods its
predecessor had reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, Final

import kopf

from outbound_operator.injection import NAMESPACE_LABEL, is_injected, wants_injection
from outbound_operator.kubeapi import KubeApi

log = logging.getLogger(__name__)

REASON: Final = "SidecarNotInjected"
SCAN_SECONDS: Final = 30.0
FIRST_SCAN_SECONDS: Final = 2.0  # after the webhook started: a Pod admitted before that is found
MESSAGE: Final = (
    'annotated outboundrelay.io/inject: "true" but admitted without the outbound-relay sidecar (the '
    "injection webhook did not answer, and its failurePolicy is Ignore); its mail to 127.0.0.1:2525 fails. "
    "Recreate the Pod (e.g. kubectl rollout restart of its owner) to get the sidecar."
)


async def _items(call: Callable[..., Any], *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    """A list call of the `kubernetes` client in a thread, as plain JSON."""
    response = await asyncio.to_thread(call, *args, _preload_content=False, **kwargs)
    return list(json.loads(response.data).get("items") or [])


@dataclass(frozen=True)
class Scan:
    reported: list[str]  # namespace/name of the Pods reported by this pass (each Pod is reported once)
    counts: dict[str, int] = field(default_factory=dict)  # labelled namespace -> such Pods running now


async def scan(
    kube: KubeApi,
    excluded: Collection[str],
    reported: set[str],
    may_write: Callable[[], bool] = lambda: True,
) -> Scan:
    """Report every opted-in Pod without the sidecar not reported yet, and count them all per namespace.
    `reported` (Pod uids) is trimmed to the Pods still there, so it does not grow forever. Posts no Event
    once `may_write` (the leader election's `leading`) turns false."""
    labelled = await _items(kube.core.list_namespace, label_selector=f"{NAMESPACE_LABEL}=enabled")
    found: list[str] = []
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for namespace in labelled:
        name = namespace["metadata"]["name"]
        if name in excluded:
            continue
        counts[name] = 0
        for pod in await _items(kube.core.list_namespaced_pod, name):
            meta = pod["metadata"]
            if not wants_injection(pod) or is_injected(pod):
                continue
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            counts[name] += 1
            seen.add(meta["uid"])
            if meta["uid"] in reported:
                continue
            if not may_write():
                return Scan(reported=found)  # no longer the leader: it publishes nothing
            involved = {"apiVersion": "v1", "kind": "Pod", "namespace": name, "name": meta["name"]}
            await kube.post_event(
                {**involved, "uid": meta["uid"]}, type="Warning", reason=REASON, message=MESSAGE
            )
            reported.add(meta["uid"])
            found.append(f"{name}/{meta['name']}")
            log.warning("Pod %s/%s opted in but runs without the outbound-relay sidecar", name, meta["name"])
    reported &= seen
    return Scan(reported=found, counts=counts)


def register(
    registry: kopf.OperatorRegistry,
    kube: KubeApi,
    excluded: Collection[str],
    may_write: Callable[[], bool] = lambda: True,
    publish: Callable[[dict[str, int]], None] = lambda counts: None,
) -> None:
    """Scan in the background while the operator (and so its webhook) runs, while `may_write`; `publish`
    gets each pass's counts (the metric and the policies' status)."""
    tasks: list[asyncio.Task[None]] = []

    async def loop() -> None:
        reported: set[str] = set()
        await asyncio.sleep(FIRST_SCAN_SECONDS)
        while True:
            try:
                if may_write():
                    publish((await scan(kube, excluded, reported, may_write)).counts)
            except Exception:  # an API hiccup: the next pass tries again
                log.exception("looking for Pods without the sidecar failed")
            await asyncio.sleep(SCAN_SECONDS)

    @kopf.on.startup(id="uninjected-pods", registry=registry)
    async def start(**_: Any) -> None:
        tasks.append(asyncio.create_task(loop(), name="uninjected-pods"))

    @kopf.on.cleanup(id="uninjected-pods-stop", registry=registry)
    async def stop(**_: Any) -> None:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
