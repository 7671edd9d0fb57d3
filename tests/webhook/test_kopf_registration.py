"""webhook.register(): the webhook runs inside a kopf operator, started and stopped with it."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from typing import Any

import kopf
import pytest
from kubernetes import client

from outbound_operator import webhook as webhook_module
from tests.cluster.controlplane import ControlPlane
from tests.webhook.conftest import Registration, create_pod, free_port, make_pod, wait_for

pytestmark = pytest.mark.cluster


def test_register_runs_the_webhook_with_the_operator(
    control_plane: ControlPlane,
    k8s_client: client.ApiClient,
    registration: Registration,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig))  # read by kopf's login at call time
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_kubeconfig(**kwargs)

    api = control_plane.api_client()
    health_port = free_port()
    webhook_module.register(registration.settings, registry, api=api)
    stop = threading.Event()
    done = threading.Event()

    def operator() -> None:
        async def main() -> None:
            stop_flag: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            async def watch_stop() -> None:
                await asyncio.to_thread(stop.wait)
                stop_flag.set_result(None)

            watcher = asyncio.create_task(watch_stop())
            await kopf.operator(
                registry=registry,
                standalone=True,
                namespaces=[namespace],
                stop_flag=stop_flag,
                liveness_endpoint=f"http://127.0.0.1:{health_port}/healthz",
            )
            await watcher
            # kopf closes its API connections as it stops; the TLS close of each needs a few more turns
            # of the loop (a process would just exit; this thread's loop must not end with them open).
            await asyncio.sleep(0.5)

        asyncio.run(main())
        done.set()

    thread = threading.Thread(target=operator, name="kopf", daemon=True)
    thread.start()
    try:
        client.CoreV1Api(k8s_client).patch_namespace(
            namespace, {"metadata": {"labels": {"outboundrelay.io/inject": "enabled"}}}
        )
        wait_for(lambda: bool(registration.ca_bundle()), 30, "the operator publishes the caBundle")
        registration.wait_until_injecting(namespace)
        stored = create_pod(k8s_client, namespace, make_pod("via-kopf", {"outboundrelay.io/inject": "true"}))
        assert [c["name"] for c in stored["spec"]["initContainers"]] == ["outbound-relay"]
        # The operator's liveness endpoint covers the webhook too (it fails when the webhook stops serving).
        with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5) as response:
            health = json.loads(response.read())
        assert "reviews" in health["webhook"] and "injected" in health["webhook"]
    finally:
        stop.set()
        assert done.wait(30), "the operator did not stop"
        thread.join(5)
        api.close()  # type: ignore[no-untyped-call]
