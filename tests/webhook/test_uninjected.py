"""Opted-in Pods admitted without the sidecar (no webhook answered) get a SidecarNotInjected Event, once."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from kubernetes import client

from outbound_operator.injection import NAMESPACE_LABEL, inject
from outbound_operator.kubeapi import KubeApi
from outbound_operator.uninjected import REASON, scan
from outbound_operator.webhook import WebhookSettings
from tests.webhook.conftest import make_pod

pytestmark = pytest.mark.cluster


async def until_gone(core: client.CoreV1Api, namespace: str, name: str) -> None:
    for _ in range(300):
        if name not in {p.metadata.name for p in core.list_namespaced_pod(namespace).items if p.metadata}:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"Pod {name} still there")


def _events(core: client.CoreV1Api, namespace: str, reason: str) -> list[str]:
    found = core.list_namespaced_event(namespace, field_selector=f"reason={reason}").items
    return sorted(str(event.involved_object.name) for event in found)


async def test_opted_in_pods_without_the_sidecar_are_reported_once(
    k8s_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_client)
    opted_in = {"outboundrelay.io/inject": "true"}
    # No webhook is registered: these are admitted as written, as with failurePolicy Ignore.
    core.create_namespaced_pod(namespace, cast(Any, make_pod("missed", opted_in)))
    core.create_namespaced_pod(namespace, cast(Any, make_pod("not-opted-in")))
    injected = inject(make_pod("injected", opted_in), WebhookSettings().injection)
    core.create_namespaced_pod(namespace, cast(Any, injected))
    kube = KubeApi(k8s_client)
    reported: set[str] = set()

    # Only namespaces labelled for injection are looked at.
    assert (await scan(kube, (), reported)).reported == []
    core.patch_namespace(namespace, {"metadata": {"labels": {NAMESPACE_LABEL: "enabled"}}})
    found = await scan(kube, (), reported)
    assert found.reported == [f"{namespace}/missed"]
    assert found.counts[namespace] == 1
    assert _events(core, namespace, REASON) == ["missed"]
    # Reported once per Pod, but counted at every pass while it runs; never in an excluded namespace.
    again = await scan(kube, (), reported)
    assert (again.reported, again.counts[namespace]) == ([], 1)
    excluded = await scan(kube, (namespace,), set())
    assert (excluded.reported, namespace in excluded.counts) == ([], False)
    assert _events(core, namespace, REASON) == ["missed"]
    # Gone: no longer counted, and forgotten (a Pod of the same name later is a new Pod).
    core.delete_namespaced_pod("missed", namespace, grace_period_seconds=0)
    await until_gone(core, namespace, "missed")
    assert (await scan(kube, (), reported)).counts[namespace] == 0
    assert reported == set()
