"""Sidecar injection through the real API server: the webhook in-process on 127.0.0.1, registered with the
chart's MutatingWebhookConfiguration (url clientConfig), its caBundle written by the webhook itself."""

from __future__ import annotations

import datetime
import time
from typing import Any, cast

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from outbound_operator.injection import (
    ANNOTATION_INJECTED,
    CONTAINER_NAME,
    NO_TOKEN_VOLUME,
    TOKEN_DIR,
    VOLUME_NAME,
)
from outbound_operator.webhook_certs import RotationSettings, SelfManagedCertificates
from tests.helm.chart import read_json
from tests.webhook.conftest import (
    Registration,
    ThreadedWebhook,
    create_pod,
    label_for_injection,
    make_pod,
    wait_for,
)

pytestmark = pytest.mark.cluster

OPT_IN = {"outboundrelay.io/inject": "true"}


_create = create_pod


def _sidecars(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in pod["spec"].get("initContainers", ()) if c["name"] == CONTAINER_NAME]


def test_opted_in_pod_is_stored_with_the_sidecar_and_runs(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    stored = _create(k8s_client, injected_namespace, make_pod("mailer", OPT_IN))
    (sidecar,) = _sidecars(stored)
    assert stored["spec"]["initContainers"][0] is sidecar
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["command"] == ["outbound-relay"]
    assert sidecar["args"][:3] == ["serve", "--config", "/etc/outbound-relay/config/relay.yaml"]
    mounts = {m["mountPath"]: m for m in sidecar["volumeMounts"]}
    assert mounts["/etc/outbound-relay/config"] == {
        "name": VOLUME_NAME,
        "mountPath": "/etc/outbound-relay/config",
        "readOnly": True,
    }
    # The API server's ServiceAccount token does not reach the relay: an empty directory holds its place.
    assert mounts[TOKEN_DIR]["name"] == NO_TOKEN_VOLUME
    assert sidecar["ports"][0]["name"] == "relay-metrics"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    (volume,) = [v for v in stored["spec"]["volumes"] if v["name"] == VOLUME_NAME]
    assert volume["secret"]["secretName"] == "outbound-relay-config"
    annotations = stored["metadata"]["annotations"]
    assert annotations[ANNOTATION_INJECTED] == "true"
    assert annotations["prometheus.io/port"] == "9425"
    assert stored["metadata"]["labels"][ANNOTATION_INJECTED] == "true"
    # The app's container is untouched.
    assert [c["name"] for c in stored["spec"]["containers"]] == ["app"]

    # kwok plays the kubelet: the Pod with its native sidecar is scheduled and becomes Running.
    core = client.CoreV1Api(k8s_client)
    wait_for(
        lambda: (
            read_json(core.read_namespaced_pod, "mailer", injected_namespace)["status"].get("phase")
            == "Running"
        ),
        60,
        "the injected Pod is Running",
    )


def test_pod_without_the_annotation_is_untouched_and_never_sent(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    before = webhook.reviews
    stored = _create(k8s_client, injected_namespace, make_pod("plain"))
    assert not stored["spec"].get("initContainers")
    assert ANNOTATION_INJECTED not in (stored["metadata"].get("annotations") or {})
    stored = _create(
        k8s_client, injected_namespace, make_pod("declined", {"outboundrelay.io/inject": "false"})
    )
    assert not stored["spec"].get("initContainers")
    assert webhook.reviews == before  # matchConditions: the API server did not even call


def test_namespace_without_the_label_is_untouched(
    k8s_client: client.ApiClient, registration: Registration, webhook: ThreadedWebhook, namespace: str
) -> None:
    before = webhook.reviews
    stored = _create(k8s_client, namespace, make_pod("unlabelled", OPT_IN))
    assert not _sidecars(stored)
    assert webhook.reviews == before


def test_kube_system_and_the_operator_namespace_are_never_injected(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    core = client.CoreV1Api(k8s_client)
    # Even when someone labels them.
    for excluded in ("kube-system", registration.operator_namespace):
        label_for_injection(k8s_client, excluded)
        name = f"opted-in-{webhook.reviews}-{time.monotonic_ns() % 100000}"
        try:
            stored = _create(k8s_client, excluded, make_pod(name, OPT_IN))
            assert not _sidecars(stored), excluded
        finally:
            label_for_injection(k8s_client, excluded, None)
            core.delete_namespaced_pod(name, excluded, grace_period_seconds=0)


def test_second_admission_of_an_injected_pod_changes_nothing(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    first = _create(
        k8s_client, injected_namespace, make_pod("first", OPT_IN | {"outboundrelay.io/binding": "bulk"})
    )
    # The stored Pod, as a user would re-create it from `kubectl get -o yaml`.
    again = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "again",
            "annotations": first["metadata"]["annotations"],
            "labels": first["metadata"]["labels"],
        },
        "spec": {k: v for k, v in first["spec"].items() if k != "nodeName"},
    }
    before = webhook.reviews
    second = _create(k8s_client, injected_namespace, again)
    assert webhook.reviews == before + 1  # it was admitted again...
    assert second["spec"]["initContainers"] == first["spec"]["initContainers"]  # ...and left alone
    assert second["spec"]["volumes"] == first["spec"]["volumes"]
    assert second["metadata"]["annotations"] == first["metadata"]["annotations"]
    assert "--default-binding" in _sidecars(second)[0]["args"]


def test_dry_run_injects_without_storing(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    returned = create_pod(k8s_client, injected_namespace, make_pod("dry", OPT_IN), dry_run=True)
    assert [c["name"] for c in returned["spec"]["initContainers"]] == [CONTAINER_NAME]
    listed = read_json(client.CoreV1Api(k8s_client).list_namespaced_pod, injected_namespace)
    assert not [p for p in listed["items"] if p["metadata"]["name"] == "dry"]


def test_a_bad_annotation_is_refused_with_the_reason(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    pod = make_pod("typo", OPT_IN | {"outboundrelay.io/binding": "bulk mail!"})
    with pytest.raises(ApiException) as raised:
        create_pod(k8s_client, injected_namespace, pod)
    assert raised.value.status == 422
    body = str(raised.value.body)
    assert "outboundrelay.io/binding" in body and "not a binding name" in body


def test_webhook_down_blocks_no_pod(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    webhook.stop()  # the operator is gone; its configuration and caBundle stay
    started = time.monotonic()
    plain = _create(k8s_client, injected_namespace, make_pod("plain"))
    assert not plain["spec"].get("initContainers")
    assert time.monotonic() - started < 2  # never called: no timeout to wait out
    # An opted-in Pod is admitted too (failurePolicy Ignore), without the sidecar, and quickly: nothing
    # listens, so the call fails at once instead of after timeoutSeconds.
    started = time.monotonic()
    opted_in = _create(k8s_client, injected_namespace, make_pod("opted-in", OPT_IN))
    assert not _sidecars(opted_in)
    assert time.monotonic() - started < 5


def test_ca_bundle_is_restored_when_removed(
    k8s_client: client.ApiClient,
    registration: Registration,
    webhook: ThreadedWebhook,
    injected_namespace: str,
) -> None:
    registration.wait_until_injecting(injected_namespace)
    published = registration.ca_bundle()
    assert published
    admission = client.AdmissionregistrationV1Api(k8s_client)
    patch = [{"op": "remove", "path": "/webhooks/0/clientConfig/caBundle"}]
    admission.patch_mutating_webhook_configuration(registration.configuration, cast(Any, patch))
    wait_for(lambda: registration.ca_bundle() == published, 15, "the caBundle is put back")
    registration.wait_until_injecting(injected_namespace)


def test_certificate_rotation_keeps_injecting(
    k8s_client: client.ApiClient, registration: Registration, injected_namespace: str
) -> None:
    rotation = RotationSettings(
        validity=datetime.timedelta(seconds=20),
        renew_before=datetime.timedelta(seconds=15),  # due 5 s after each issue
        check_interval=0.5,
        propagation_delay=2.0,
    )
    webhook = registration.start(rotation=rotation)
    registration.wait_until_injecting(injected_namespace)
    first_bundle = registration.ca_bundle()
    assert webhook.server is not None
    wait_for(lambda: _rotations(registration) >= 1, 30, "the certificate is rotated")
    assert registration.ca_bundle() != first_bundle
    # Right after a rotation and through the next ones, every opted-in Pod gets the sidecar.
    deadline = time.monotonic() + 12
    count = 0
    while time.monotonic() < deadline:
        stored = _create(k8s_client, injected_namespace, make_pod(f"during-rotation-{count}", OPT_IN))
        assert _sidecars(stored), f"Pod {count} admitted without the sidecar during rotation"
        count += 1
        time.sleep(0.5)
    assert _rotations(registration) >= 2


def _rotations(registration: Registration) -> int:
    (webhook,) = registration.webhooks
    assert webhook.server is not None
    assert isinstance(webhook.server.certificates, SelfManagedCertificates)
    return webhook.server.certificates.rotations
