"""The README's quick start, word for word: helm install, a labelled namespace, the Secret and the policy of
docs/examples, and the annotated Pod of docs/examples; on the real API server, with the operator process
rendering the Secret and the webhook (in-process on loopback) injecting the sidecar.

The only difference from a real cluster: the chart is installed with `webhook.url` pointing at the
in-process webhook, because the operator's Pod (faked Running by kwok) runs no container here.
"""

from __future__ import annotations

import base64
import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from outbound_operator import webhook as webhook_module
from outbound_operator.webhook import MUTATE_PATH
from outbound_operator.webhook_certs import RotationSettings
from tests.cluster.controlplane import REPO, ControlPlane
from tests.helm.chart import find, hand_crds_to, installed, objects, read_json, release_name
from tests.support.process import terminate
from tests.webhook.conftest import ThreadedWebhook, free_port, wait_for

pytestmark = pytest.mark.cluster

EXAMPLES = REPO / "docs" / "examples"


@pytest.fixture
def operator_process(control_plane: ControlPlane, namespace: str, tmp_path: Path) -> Iterator[None]:
    """outbound-operator watching the quick start's namespace, as a process."""
    log = (tmp_path / "operator.log").open("wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("outbound-operator")), "--namespace", namespace,
         "--metrics-port", "0", "--liveness", "", "--log-format", "plain"],
        env=control_plane.env(), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield
    finally:
        terminate(proc, 30)
        log.close()


def test_quick_start(
    control_plane: ControlPlane,
    k8s_client: client.ApiClient,
    namespace: str,
    operator_process: None,
    tmp_path: Path,
) -> None:
    system = f"{namespace[:45]}-system"
    release = release_name("quick")
    port = free_port()
    url = f"https://127.0.0.1:{port}{MUTATE_PATH}"
    # The cluster is shared with other tests, which may have made the CRDs already: hand them to this
    # release first, as docs/helm.md's upgrade notes say (on a fresh cluster there is nothing to hand over).
    hand_crds_to(control_plane, release, system)
    # helm install outbound-relay charts/outbound-relay --namespace outbound-relay-system --create-namespace
    try:
        with installed(
            control_plane, release, system, "--create-namespace",
            "--set", f"webhook.url={url}", "--set", "webhook.certIPAddresses={127.0.0.1}",
            "--wait", "--timeout", "120s",
        ):  # fmt: skip
            webhook = _webhook_as_the_chart_configures_it(control_plane, release, system, port, tmp_path)
            try:
                _quick_start(control_plane, k8s_client, namespace)
            finally:
                webhook.stop()
                webhook.api.close()  # type: ignore[no-untyped-call]
    finally:
        client.CoreV1Api(k8s_client).delete_namespace(system)


def _quick_start(control_plane: ControlPlane, api: client.ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(api)
    # kubectl label namespace mail outboundrelay.io/inject=enabled
    control_plane.kubectl("label", "namespace", namespace, "outboundrelay.io/inject=enabled")
    # kubectl apply -n mail -f docs/examples/secret.yaml -f docs/examples/policy.yaml
    secret, policy = str(EXAMPLES / "secret.yaml"), str(EXAMPLES / "policy.yaml")
    _wait_until_checking_policies(control_plane, namespace, policy)
    control_plane.kubectl("apply", "-n", namespace, "-f", secret, "-f", policy)

    def rendered() -> bool:
        listed = read_json(core.list_namespaced_secret, namespace)["items"]
        return any(s["metadata"]["name"] == "outbound-relay-config" for s in listed)

    wait_for(rendered, 60, "the operator renders outbound-relay-config")
    config = read_json(core.read_namespaced_secret, "outbound-relay-config", namespace)
    relay_yaml = yaml.safe_load(base64.b64decode(config["data"]["relay.yaml"]))
    assert [p["name"] for p in relay_yaml["policies"]] == [f"{namespace}/sparkpost"]

    _wait_until_injecting(control_plane, namespace)
    # kubectl apply -n mail -f docs/examples/pod.yaml
    control_plane.kubectl("apply", "-n", namespace, "-f", str(EXAMPLES / "pod.yaml"))
    pod = read_json(core.read_namespaced_pod, "mailer", namespace)
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["name"] == "outbound-relay"
    assert sidecar["args"][-2:] == ["--default-binding", "transactional"]
    assert sidecar["image"] == "ghcr.io/outbound-relay/outbound-relay:0.1.0"

    def running() -> bool:
        phase: str | None = read_json(core.read_namespaced_pod, "mailer", namespace)["status"].get("phase")
        return phase == "Running"

    wait_for(running, 60, "the quick start's Pod is Running")


def _webhook_as_the_chart_configures_it(
    control_plane: ControlPlane, release: str, namespace: str, port: int, tmp_path: Path
) -> ThreadedWebhook:
    """The webhook with the settings the chart's Deployment passes (its args and sidecar ConfigMap),
    bound to loopback on the port the chart's `webhook.url` names."""
    fullname = f"{release}-outbound-relay"
    with control_plane.api_client() as api:
        deployment = read_json(client.AppsV1Api(api).read_namespaced_deployment, fullname, namespace)
        sidecar = read_json(
            client.CoreV1Api(api).read_namespaced_config_map, f"{fullname}-sidecar", namespace
        )
    sidecar_file = tmp_path / "sidecar.yaml"
    sidecar_file.write_text(sidecar["data"]["sidecar.yaml"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]  # the operator; then hook-checker
    args = [a for a in container["args"] if a.startswith("--webhook-")]
    args = [a for a in args if not a.startswith(("--webhook-port=", "--webhook-sidecar-config="))]
    args += [f"--webhook-port={port}", "--webhook-host=127.0.0.1", f"--webhook-namespace={namespace}"]
    args += [f"--webhook-sidecar-config={sidecar_file}"]
    settings = webhook_module.parse_settings(args)
    assert settings is not None and settings.extra_ip_addresses == ("127.0.0.1",)
    settings = dataclasses.replace(settings, rotation=RotationSettings(check_interval=0.5))
    return ThreadedWebhook(settings, control_plane.api_client()).start()


def _wait_until_checking_policies(control_plane: ControlPlane, namespace: str, policy: str) -> None:
    """Until the API server trusts the policy check's caBundle (a test harness step: a real operator has
    long been up by the time someone applies a policy)."""

    def checked() -> bool:
        proc = control_plane.run(
            "kubectl", "create", "--dry-run=server", "-n", namespace, "-f", policy, check=False
        )
        return proc.returncode == 0

    wait_for(checked, 30, "the API server calls the policy check")


def _wait_until_injecting(control_plane: ControlPlane, namespace: str) -> None:
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "annotations": {"outboundrelay.io/inject": "true"}},
        "spec": {"containers": [{"name": "app", "image": "busybox:1.37"}]},
    }

    def injected() -> bool:
        out = control_plane.kubectl(
            "create",
            "--dry-run=server",
            "-n",
            namespace,
            "-o",
            "yaml",
            "-f",
            "-",
            input=yaml.safe_dump(probe),
        )
        (created,) = find(objects(out), "Pod")
        return bool(created["spec"].get("initContainers"))

    wait_for(injected, 30, "the API server calls the webhook")
