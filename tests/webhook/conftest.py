"""The webhook served in-process on 127.0.0.1, registered with the real API server by a `url` clientConfig
(as envtest does), through the chart's own MutatingWebhookConfiguration."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client

from outbound_operator.injection import NAMESPACE_LABEL
from outbound_operator.webhook import MUTATE_PATH, WebhookServer, WebhookSettings, serve
from outbound_operator.webhook_certs import RotationSettings
from tests.cluster.controlplane import ControlPlane
from tests.helm.chart import find, objects, read_json, release_name, template


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ThreadedWebhook:
    """`webhook.serve()` on an event loop of its own, in a thread: the tests call the API server with the
    blocking client, and the API server calls the webhook meanwhile."""

    def __init__(
        self, settings: WebhookSettings, api: client.ApiClient, may_write: Callable[[], bool] = lambda: True
    ) -> None:
        self.settings = settings
        self.api = api
        self.may_write = may_write
        self.server: WebhookServer | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as error:  # reported by start()
            self._error = error
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(self.settings, self.api, may_write=self.may_write) as server:
            self.server = server
            self._ready.set()
            await self._stop.wait()

    def start(self) -> ThreadedWebhook:
        self._thread.start()
        assert self._ready.wait(30), "webhook did not start in 30s"
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "webhook did not stop in 30s"

    @property
    def reviews(self) -> int:
        assert self.server is not None
        return self.server.reviews


@dataclass
class Registration:
    """The chart's MutatingWebhookConfiguration, pointed at a loopback URL, and the settings to serve it."""

    control_plane: ControlPlane
    api: client.ApiClient
    operator_namespace: str
    configuration: str
    port: int
    settings: WebhookSettings
    release: str = ""
    """The Helm release name the chart was rendered with (names the webhook configurations)."""
    webhooks: list[ThreadedWebhook] = field(default_factory=list)

    def start(self, may_write: Callable[[], bool] = lambda: True, **changes: Any) -> ThreadedWebhook:
        settings = dataclasses.replace(self.settings, **changes) if changes else self.settings
        webhook = ThreadedWebhook(settings, self.control_plane.api_client(), may_write).start()
        self.webhooks.append(webhook)
        return webhook

    def wait_until_injecting(self, namespace: str, timeout: float = 30) -> None:
        """Until the API server calls the webhook with the caBundle in place: a dry-run create of an
        opted-in Pod comes back with the sidecar (and nothing is stored)."""
        pod = make_pod("probe", {"outboundrelay.io/inject": "true"})

        def injected() -> bool:
            created = create_pod(self.api, namespace, pod, dry_run=True)
            return any(c["name"] == "outbound-relay" for c in created["spec"].get("initContainers", ()))

        wait_for(injected, timeout, "the API server calls the webhook")

    def ca_bundle(self) -> str | None:
        admission = client.AdmissionregistrationV1Api(self.api)
        configuration = read_json(admission.read_mutating_webhook_configuration, self.configuration)
        bundle: str | None = configuration["webhooks"][0]["clientConfig"].get("caBundle")
        return bundle

    def stop_all(self) -> None:
        for webhook in self.webhooks:
            webhook.stop()
            webhook.api.close()  # type: ignore[no-untyped-call]
        self.webhooks.clear()


def create_pod(
    api: client.ApiClient, namespace: str, pod: dict[str, Any], *, dry_run: bool = False
) -> dict[str, Any]:
    """Create a Pod; the API server's answer is the Pod as stored (after admission), as plain JSON."""
    core = client.CoreV1Api(api)
    response: Any = core.create_namespaced_pod(
        namespace, cast(Any, pod), dry_run="All" if dry_run else None, _preload_content=False
    )
    stored: dict[str, Any] = json.loads(response.data)
    return stored


def label_for_injection(api: client.ApiClient, namespace: str, value: str | None = "enabled") -> None:
    body = {"metadata": {"labels": {NAMESPACE_LABEL: value}}}
    client.CoreV1Api(api).patch_namespace(namespace, body)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout}s"
        time.sleep(0.2)


def make_pod(name: str, annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "containers": [{"name": "app", "image": "busybox:1.37", "command": ["sleep", "infinity"]}],
            **spec,
        },
    }


@pytest.fixture
def operator_namespace(k8s_client: client.ApiClient, namespace: str) -> Iterator[str]:
    """The namespace the chart is "installed" in: never injected, even when labelled."""
    name = f"{namespace[:50]}-op"
    core = client.CoreV1Api(k8s_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    yield name
    core.delete_namespace(name)


@pytest.fixture
def registration(
    control_plane: ControlPlane, k8s_client: client.ApiClient, operator_namespace: str, tmp_path: Path
) -> Iterator[Registration]:
    """The chart's MutatingWebhookConfiguration with `webhook.url` on loopback (not yet served)."""
    port = free_port()
    release = release_name("wh")
    manifest = template(
        control_plane,
        tmp_path,
        {"webhook": {"url": f"https://127.0.0.1:{port}{MUTATE_PATH}", "certIPAddresses": ["127.0.0.1"]}},
        release=release,
        namespace=operator_namespace,
    )
    (configuration,) = find(objects(manifest), "MutatingWebhookConfiguration")
    name = configuration["metadata"]["name"]
    admission = client.AdmissionregistrationV1Api(k8s_client)
    admission.create_mutating_webhook_configuration(cast(Any, configuration))
    settings = WebhookSettings(
        host="127.0.0.1",
        port=port,
        namespace=operator_namespace,
        configuration=name,
        extra_ip_addresses=("127.0.0.1",),
        rotation=RotationSettings(check_interval=0.5, propagation_delay=1.0),
    )
    registered = Registration(control_plane, k8s_client, operator_namespace, name, port, settings, release)
    try:
        yield registered
    finally:
        registered.stop_all()
        with contextlib.suppress(client.ApiException):
            admission.delete_mutating_webhook_configuration(name)


@pytest.fixture
def webhook(registration: Registration) -> ThreadedWebhook:
    return registration.start()


@pytest.fixture
def injected_namespace(k8s_client: client.ApiClient, namespace: str) -> str:
    label_for_injection(k8s_client, namespace)
    return namespace
