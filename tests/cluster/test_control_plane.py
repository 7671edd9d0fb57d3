"""The control plane from hack/control-plane behaves like a real cluster's, for what the operator needs."""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, cast

import pytest
import trustme
from kubernetes import client
from kubernetes.client import ApiException

from tests.cluster.controlplane import ControlPlane, versions

pytestmark = pytest.mark.cluster

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.tests.outboundrelay.io
spec:
  group: tests.outboundrelay.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {type: integer, minimum: 1}
          status:
            type: object
            x-kubernetes-preserve-unknown-fields: true
"""


def configmap(name: str, **data: str) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name), data=data)


def test_readyz(control_plane: ControlPlane) -> None:
    assert control_plane.kubectl("get", "--raw", "/readyz").strip() == "ok"


def test_version_is_the_pinned_one(control_plane: ControlPlane) -> None:
    # The build stamps the version: helm compares it with a chart's kubeVersion.
    pinned = versions()["kube-apiserver"]
    assert json.loads(control_plane.kubectl("get", "--raw", "/version"))["gitVersion"] == pinned


def test_listens_on_loopback_only(control_plane: ControlPlane) -> None:
    server = control_plane.kubectl("config", "view", "-o", "jsonpath={.clusters[0].cluster.server}")
    assert server.startswith("https://127.0.0.1:")


def test_crd_and_custom_object(
    control_plane: ControlPlane, k8s_client: client.ApiClient, namespace: str
) -> None:
    control_plane.kubectl("apply", "-f", "-", input=CRD)
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.tests.outboundrelay.io"
    )
    objects = client.CustomObjectsApi(k8s_client)
    widget = {"apiVersion": "tests.outboundrelay.io/v1", "kind": "Widget", "metadata": {"name": "w"}}
    created = cast(
        dict[str, Any],
        objects.create_namespaced_custom_object(
            "tests.outboundrelay.io", "v1", namespace, "widgets", {**widget, "spec": {"size": 3}}
        ),
    )
    assert created["metadata"]["generation"] == 1
    objects.patch_namespaced_custom_object_status(
        "tests.outboundrelay.io", "v1", namespace, "widgets", "w", {"status": {"ready": True}}
    )
    read = cast(
        dict[str, Any],
        objects.get_namespaced_custom_object("tests.outboundrelay.io", "v1", namespace, "widgets", "w"),
    )
    assert read["spec"] == {"size": 3}
    assert read["status"] == {"ready": True}
    # The schema is enforced by the server, as the operator's CRDs will be.
    with pytest.raises(ApiException) as invalid:
        objects.create_namespaced_custom_object(
            "tests.outboundrelay.io", "v1", namespace, "widgets", {**widget, "spec": {"size": 0}}
        )
    assert invalid.value.status == 422


def test_secret_round_trips(k8s_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(k8s_client)
    secret = bytes(range(256))  # every byte value survives base64 and etcd
    core.create_namespaced_secret(
        namespace,
        client.V1Secret(
            metadata=client.V1ObjectMeta(name="smtp"),
            data={"password": base64.b64encode(secret).decode()},
            string_data={"user": "sparkpost"},
        ),
    )
    data = core.read_namespaced_secret("smtp", namespace).data or {}
    assert base64.b64decode(data["password"]) == secret
    assert base64.b64decode(data["user"]) == b"sparkpost"


def test_server_side_dry_run(control_plane: ControlPlane, namespace: str) -> None:
    manifest = json.dumps(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "dry", "namespace": namespace}}
    )
    out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
    assert "configmap/dry created (server dry run)" in out
    assert (
        control_plane.run("kubectl", "get", "configmap", "dry", "-n", namespace, check=False).returncode != 0
    )
    # The server, not kubectl, validates: an invalid name is refused in a dry run too.
    bad = control_plane.run(
        "kubectl",
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=manifest.replace('"dry"', '"Not_Valid"'),
        check=False,
    )
    assert bad.returncode != 0
    assert "Invalid value" in bad.stderr


def test_api_server_restart_keeps_etcd_data(
    control_plane: ControlPlane, k8s_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_client)
    before = core.create_namespaced_config_map(namespace, configmap("survivor", n="1"))

    control_plane.restart_apiserver()

    # A client created before the restart keeps working: same address, same CA, same credentials.
    after = core.read_namespaced_config_map("survivor", namespace)
    assert after.data == {"n": "1"}
    assert after.metadata
    assert before.metadata
    assert after.metadata.uid == before.metadata.uid
    # Resource versions continue from etcd's revision, so a watch resumed from `before` stays valid.
    updated = core.patch_namespaced_config_map("survivor", namespace, {"data": {"n": "2"}})
    assert updated.metadata
    assert updated.metadata.resource_version
    assert before.metadata.resource_version
    assert int(updated.metadata.resource_version) > int(before.metadata.resource_version)


def test_helm_version(control_plane: ControlPlane) -> None:
    out = control_plane.run(str(control_plane.helm), "version", "--short").stdout
    pinned = versions()["helm"]
    assert out.startswith(pinned)


def test_helm_installs_a_chart(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> None:
    chart = tmp_path / "demo"
    (chart / "templates").mkdir(parents=True)
    # kubeVersion makes helm check the server's reported version.
    (chart / "Chart.yaml").write_text(
        "apiVersion: v2\nname: demo\nversion: 0.1.0\nkubeVersion: '>=1.30.0-0'\n"
    )
    (chart / "templates" / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\n"
        "metadata: {name: '{{ .Release.Name }}-cm'}\ndata: {greeting: hello}\n"
    )
    helm = str(control_plane.helm)
    control_plane.run(
        helm, "install", "demo", str(chart), "--namespace", namespace, "--wait", "--timeout=60s"
    )
    assert control_plane.kubectl(
        "get", "configmap", "demo-cm", "-n", namespace, "-o", "jsonpath={.data.greeting}"
    ) == ("hello")
    control_plane.run(helm, "uninstall", "demo", "--namespace", namespace, "--wait")


# --- admission webhooks: the operator's sidecar injection depends on the API server calling out -------


class DenyingWebhook(BaseHTTPRequestHandler):
    """Validating webhook that refuses ConfigMaps named deny-*."""

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = review["request"]["name"]
        response: dict[str, Any] = {"uid": review["request"]["uid"], "allowed": not name.startswith("deny-")}
        if not response["allowed"]:
            response["status"] = {"code": 403, "message": f"{name} denied by the test webhook"}
        body = json.dumps(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def webhook_url() -> Iterator[tuple[str, bytes]]:
    """An HTTPS webhook on 127.0.0.1 and its CA bundle."""
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = HTTPServer(("127.0.0.1", 0), DenyingWebhook)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/validate", ca.cert_pem.bytes()
    server.shutdown()
    server.server_close()


def test_validating_webhook_is_called(
    k8s_client: client.ApiClient, namespace: str, webhook_url: tuple[str, bytes]
) -> None:
    url, ca_bundle = webhook_url
    admission = client.AdmissionregistrationV1Api(k8s_client)
    core = client.CoreV1Api(k8s_client)
    webhook = client.V1ValidatingWebhook(
        name="deny.tests.outboundrelay.io",
        client_config=client.AdmissionregistrationV1WebhookClientConfig(
            url=url, ca_bundle=base64.b64encode(ca_bundle).decode()
        ),
        rules=[
            client.V1RuleWithOperations(
                api_groups=[""], api_versions=["v1"], operations=["CREATE"], resources=["configmaps"]
            )
        ],
        # Only this test's namespace: other tests keep running while the webhook exists.
        namespace_selector=client.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": namespace}),
        side_effects="None",
        admission_review_versions=["v1"],
        failure_policy="Fail",
        timeout_seconds=5,
    )
    admission.create_validating_webhook_configuration(
        client.V1ValidatingWebhookConfiguration(
            metadata=client.V1ObjectMeta(name=namespace), webhooks=[webhook]
        )
    )
    try:
        core.create_namespaced_config_map(namespace, configmap("allow-me"))
        with pytest.raises(ApiException) as denied:
            core.create_namespaced_config_map(namespace, configmap("deny-me"))
        assert "denied by the test webhook" in str(denied.value.body)
    finally:
        admission.delete_validating_webhook_configuration(namespace)


# --- beyond a bare API server: controller manager, scheduler and kwok ------------------------------


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        time.sleep(0.2)


def test_pods_of_a_deployment_become_running(control_plane: ControlPlane, namespace: str) -> None:
    # Scheduled by kube-scheduler onto kwok's fake node, made Running by kwok: no image is ever pulled.
    control_plane.kubectl(
        "create", "deployment", "app", "--image=registry.invalid/app:1", "--replicas=2", "-n", namespace
    )
    control_plane.kubectl("rollout", "status", "deployment/app", "-n", namespace, "--timeout=90s")
    pods = json.loads(control_plane.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
    assert [pod["status"]["phase"] for pod in pods] == ["Running", "Running"]
    assert {pod["spec"]["nodeName"] for pod in pods} == {"kwok-node-0"}


def test_owned_objects_are_garbage_collected(k8s_client: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(k8s_client)
    owner = core.create_namespaced_config_map(namespace, configmap("owner"))
    assert owner.metadata
    reference = client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    core.create_namespaced_secret(
        namespace, client.V1Secret(metadata=client.V1ObjectMeta(name="owned", owner_references=[reference]))
    )
    core.delete_namespaced_config_map("owner", namespace)

    def owned_is_gone() -> bool:
        return not core.list_namespaced_secret(namespace, field_selector="metadata.name=owned").items

    wait_for(owned_is_gone, "the garbage collector to delete the owned Secret")
