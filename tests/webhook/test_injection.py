"""injection.py and the webhook's admission answer, as pure functions: Pod dict in, JSONPatch / Pod out."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from outbound_operator.injection import (
    ANNOTATION_BINDING,
    ANNOTATION_HOOKS,
    ANNOTATION_INJECT,
    ANNOTATION_INJECTED,
    CONTAINER_NAME,
    TOKEN_DIR,
    VOLUME_NAME,
    InjectionError,
    InjectionSettings,
    ResourceList,
    Resources,
    apply_json_patch,
    inject,
    injection_patch,
)
from outbound_operator.webhook import WebhookSettings, admission_response

SETTINGS = InjectionSettings()


def pod(annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    result: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mailer", "annotations": annotations if annotations is not None else {}},
        "spec": {"containers": [{"name": "app", "image": "app:1"}], **spec},
    }
    return result


OPTED_IN = {ANNOTATION_INJECT: "true"}


def sidecar_of(result: dict[str, Any]) -> dict[str, Any]:
    sidecars: list[dict[str, Any]] = [
        c for c in result["spec"]["initContainers"] if c["name"] == CONTAINER_NAME
    ]
    assert len(sidecars) == 1
    return sidecars[0]


@pytest.mark.parametrize("annotations", [None, {}, {ANNOTATION_INJECT: "false"}, {ANNOTATION_INJECT: "yes"}])
def test_pods_that_did_not_opt_in_are_untouched(annotations: dict[str, str] | None) -> None:
    original = pod(annotations)
    if annotations is None:
        del original["metadata"]["annotations"]
    assert injection_patch(original, SETTINGS) == []
    assert inject(original, SETTINGS) == original


@pytest.mark.parametrize("value", ["true", "True", "TRUE", " true "])
def test_the_opt_in_is_case_insensitive(value: str) -> None:
    assert injection_patch(pod({ANNOTATION_INJECT: value}), SETTINGS)


def test_native_sidecar_with_the_rendered_config() -> None:
    original = pod(OPTED_IN)
    result = inject(original, SETTINGS)
    sidecar = sidecar_of(result)
    assert result["spec"]["initContainers"][0] is sidecar
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == SETTINGS.image
    assert sidecar["command"] == ["outbound-relay"]
    assert sidecar["args"][:3] == ["serve", "--config", "/etc/outbound-relay/config/relay.yaml"]
    assert "--default-binding" not in sidecar["args"]
    assert sidecar["ports"] == [{"name": "relay-metrics", "containerPort": 9425, "protocol": "TCP"}]
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/metrics", "port": "relay-metrics"}
    assert {"name": VOLUME_NAME, "mountPath": "/etc/outbound-relay/config", "readOnly": True} in sidecar[
        "volumeMounts"
    ]
    assert TOKEN_DIR in [m["mountPath"] for m in sidecar["volumeMounts"]]
    (volume,) = [v for v in result["spec"]["volumes"] if v["name"] == VOLUME_NAME]
    # Optional: a namespace with no rendered Secret yet must not hold the Pod in ContainerCreating; the
    # relay starts without it (--allow-missing-config) and defers mail until it appears.
    assert volume == {
        "name": VOLUME_NAME,
        "secret": {"secretName": "outbound-relay-config", "optional": True},
    }
    assert "--allow-missing-config" in sidecar["args"]
    # The probes' port is the relay's metrics port whatever relay.yaml says.
    assert sidecar["args"][sidecar["args"].index("--metrics-port") + 1] == "9425"
    # The app's container and the input are untouched.
    assert result["spec"]["containers"] == original["spec"]["containers"]
    assert original == pod(OPTED_IN)


def test_security_context_is_locked_down() -> None:
    """The "restricted" Pod Security Standard, and by default no fixed UID or GID: the image's (65532), or
    on OpenShift the one its restricted SCC assigns from the namespace's range, which refuses any other."""
    security = sidecar_of(inject(pod(OPTED_IN), SETTINGS))["securityContext"]
    assert security == {
        "runAsNonRoot": True,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    fixed = SETTINGS.model_copy(update={"run_as_user": 1000, "run_as_group": 3000})
    security = sidecar_of(inject(pod(OPTED_IN), fixed))["securityContext"]
    assert security["runAsUser"] == 1000 and security["runAsGroup"] == 3000 and security["runAsNonRoot"]


def test_a_pod_that_runs_as_root_gets_a_sidecar_that_does_not() -> None:
    """Without a UID of its own the sidecar inherits the Pod's: root would be refused (runAsNonRoot) and
    the Pod would never start. It runs as the image's user instead; a Pod's non-root UID is kept."""
    as_root = pod(OPTED_IN)
    as_root["spec"]["securityContext"] = {"runAsUser": 0}
    security = sidecar_of(inject(as_root, SETTINGS))["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"], security["runAsNonRoot"]) == (65532, 65532, True)
    as_user = pod(OPTED_IN)
    as_user["spec"]["securityContext"] = {"runAsUser": 1000}
    assert "runAsUser" not in sidecar_of(inject(as_user, SETTINGS))["securityContext"]


def test_resources_and_image_come_from_the_settings() -> None:
    settings = InjectionSettings(
        image="registry.example/relay:2",
        resources=Resources(requests=ResourceList(cpu="5m", memory="16Mi"), limits=ResourceList(cpu="1")),
        log_level="debug",
    )
    sidecar = sidecar_of(inject(pod(OPTED_IN), settings))
    assert sidecar["image"] == "registry.example/relay:2"
    assert sidecar["resources"] == {"requests": {"cpu": "5m", "memory": "16Mi"}, "limits": {"cpu": "1"}}
    assert sidecar["args"][sidecar["args"].index("--log-level") + 1] == "debug"
    assert sidecar["args"][sidecar["args"].index("--log-format") + 1] == "json"


def test_metrics_port_setting_reaches_the_relay_and_the_probes() -> None:
    sidecar = sidecar_of(inject(pod(OPTED_IN), InjectionSettings(metrics_port=9525)))
    assert sidecar["args"][sidecar["args"].index("--metrics-port") + 1] == "9525"
    assert sidecar["ports"][0]["containerPort"] == 9525
    assert sidecar["startupProbe"]["httpGet"]["port"] == sidecar["ports"][0]["name"]


def test_liveness_asks_the_relay_whether_it_can_still_run_hooks() -> None:
    """/metrics answers while the hook worker cannot start; only /healthz tells, so liveness asks it."""
    sidecar = sidecar_of(inject(pod(OPTED_IN), SETTINGS))
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": sidecar["ports"][0]["name"]}
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/metrics"


def test_resources_take_every_quantity_the_chart_schema_allows(tmp_path: Path) -> None:
    """values.schema.json allows numbers and any quantity key: sidecar.yaml with them must load (an error
    here is an operator crash-loop at start), and reach the container as strings."""
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "resources:\n"
        "  requests: {cpu: 0.5, memory: 64Mi, ephemeral-storage: 10Mi}\n"
        "  limits: {cpu: 2, memory: 268435456, ephemeral-storage: 1Gi, hugepages-2Mi: 0}\n"
    )
    settings = InjectionSettings.load(path)
    sidecar = sidecar_of(inject(pod(OPTED_IN), settings))
    assert sidecar["resources"] == {
        "requests": {"cpu": "0.5", "memory": "64Mi", "ephemeral-storage": "10Mi"},
        "limits": {"cpu": "2", "memory": "268435456", "ephemeral-storage": "1Gi", "hugepages-2Mi": "0"},
    }
    for bad in ("{cpu: lots}", "{cpu: true}", "{cpu: [1]}"):
        path.write_text(f"resources: {{limits: {bad}}}\n")
        with pytest.raises(ValueError, match=r"sidecar\.yaml: resources\.limits"):
            InjectionSettings.load(path)


def test_binding_annotation_becomes_the_default_binding() -> None:
    sidecar = sidecar_of(inject(pod(OPTED_IN | {ANNOTATION_BINDING: "bulk-a"}), SETTINGS))
    assert sidecar["args"][-2:] == ["--default-binding", "bulk-a"]


@pytest.mark.parametrize("binding", ["", "bulk mail", "-x", "a;rm -rf /", "x" * 64])
def test_bad_binding_is_refused_with_the_reason(binding: str) -> None:
    with pytest.raises(InjectionError, match=r"outboundrelay\.io/binding.*not a binding name"):
        injection_patch(pod(OPTED_IN | {ANNOTATION_BINDING: binding}), SETTINGS)


def _mounts(result: dict[str, Any]) -> dict[str, str]:
    """mountPath -> the name of the Pod volume (secret or configMap) mounted there, in the sidecar."""
    volumes = {v["name"]: v for v in result["spec"]["volumes"]}
    found = {}
    for mount in sidecar_of(result)["volumeMounts"]:
        volume = volumes[mount["name"]]
        source = volume.get("secret", {}).get("secretName") or volume.get("configMap", {}).get("name")
        if source:
            found[mount["mountPath"]] = source
    return found


def test_hooks_config_map_has_a_directory_of_its_own() -> None:
    """A ConfigMap key relay.yaml or ca-*.pem cannot replace the operator's files: the ConfigMap is
    mounted apart from the Secret, and the relay's --config is in the Secret's directory."""
    result = inject(pod(OPTED_IN | {ANNOTATION_HOOKS: "mail-hooks"}), SETTINGS)
    assert _mounts(result) == {
        "/etc/outbound-relay/config": "outbound-relay-config",
        "/etc/outbound-relay/hooks": "mail-hooks",
    }
    config = sidecar_of(result)["args"][sidecar_of(result)["args"].index("--config") + 1]
    assert config.startswith("/etc/outbound-relay/config/")
    assert not any(v.get("projected") for v in result["spec"]["volumes"])
    # The settings give a default; the Pod's annotation wins over it.
    settings = InjectionSettings(hooks_config_map="default-hooks")
    assert _mounts(inject(pod(OPTED_IN), settings))["/etc/outbound-relay/hooks"] == "default-hooks"
    assert "/etc/outbound-relay/hooks" not in _mounts(inject(pod(OPTED_IN), SETTINGS))
    with pytest.raises(InjectionError, match="not a ConfigMap name"):
        injection_patch(pod(OPTED_IN | {ANNOTATION_HOOKS: "Bad_Name"}), SETTINGS)


def test_existing_init_containers_volumes_and_labels_are_kept() -> None:
    original = pod(
        OPTED_IN,
        initContainers=[{"name": "migrate", "image": "app:1"}],
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    original["metadata"]["labels"] = {"app": "mailer"}
    result = inject(original, SETTINGS)
    assert [c["name"] for c in result["spec"]["initContainers"]] == [CONTAINER_NAME, "migrate"]
    assert [v["name"] for v in result["spec"]["volumes"]] == ["data", VOLUME_NAME, "outbound-relay-no-token"]
    assert result["metadata"]["labels"] == {"app": "mailer", ANNOTATION_INJECTED: "true"}


def test_prometheus_annotations_only_when_the_pod_has_none() -> None:
    result = inject(pod(OPTED_IN), SETTINGS)
    assert result["metadata"]["annotations"] == OPTED_IN | {
        ANNOTATION_INJECTED: "true",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9425",
        "prometheus.io/path": "/metrics",
    }
    own = OPTED_IN | {"prometheus.io/scrape": "true", "prometheus.io/port": "8080"}
    result = inject(pod(own), SETTINGS)
    assert result["metadata"]["annotations"] == own | {ANNOTATION_INJECTED: "true"}
    result = inject(pod(OPTED_IN), InjectionSettings(prometheus_annotations=False))
    assert "prometheus.io/scrape" not in result["metadata"]["annotations"]


def test_injection_is_idempotent() -> None:
    once = inject(pod(OPTED_IN | {ANNOTATION_BINDING: "b"}), SETTINGS)
    assert injection_patch(once, SETTINGS) == []
    assert inject(once, SETTINGS) == once


def test_a_pod_with_the_container_name_already_is_left_alone() -> None:
    original = pod(OPTED_IN, containers=[{"name": CONTAINER_NAME, "image": "mine"}])
    assert injection_patch(original, SETTINGS) == []


def test_host_network_pods_and_volume_clashes_are_refused() -> None:
    with pytest.raises(InjectionError, match="hostNetwork"):
        injection_patch(pod(OPTED_IN, hostNetwork=True), SETTINGS)
    with pytest.raises(InjectionError, match="already has a volume named 'outbound-relay-config'"):
        injection_patch(pod(OPTED_IN, volumes=[{"name": VOLUME_NAME, "emptyDir": {}}]), SETTINGS)


def test_patch_escapes_slashes_in_annotation_keys() -> None:
    patch = injection_patch(pod(OPTED_IN), SETTINGS)
    paths = [op["path"] for op in patch]
    assert "/metadata/annotations/outboundrelay.io~1injected" in paths
    assert all(op["op"] == "add" for op in patch)


def test_apply_json_patch_does_not_modify_its_input() -> None:
    document = {"a": {"b": [1, 2]}}
    kept = copy.deepcopy(document)
    result = apply_json_patch(
        document, [{"op": "add", "path": "/a/b/0", "value": 0}, {"op": "add", "path": "/a/c~1d", "value": 3}]
    )
    assert result == {"a": {"b": [0, 1, 2], "c/d": 3}}
    assert document == kept
    with pytest.raises(ValueError, match="unsupported"):
        apply_json_patch(document, [{"op": "remove", "path": "/a"}])


def test_settings_load_from_the_charts_camel_case(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "image: r/relay:1\nimagePullPolicy: Always\nresources: {requests: {cpu: 1m}, limits: {memory: 1Gi}}\n"
        "runAsUser: 1000\nmetricsPort: 9999\nhooksConfigMap: h\nprometheusAnnotations: false\n"
    )
    settings = InjectionSettings.load(path)
    assert settings.image == "r/relay:1" and settings.metrics_port == 9999 and settings.run_as_user == 1000
    path.write_text("imagePullPolicy: Sometimes\n")
    with pytest.raises(ValueError, match=r"sidecar\.yaml: imagePullPolicy: Input should be 'Always'"):
        InjectionSettings.load(path)
    path.write_text("imageTypo: x\n")
    with pytest.raises(ValueError, match="imageTypo"):
        InjectionSettings.load(path)
    # What values.schema.json refuses (generated from these settings), the operator refuses at start.
    for bad, where in (
        ("hooksConfigMap: Mail_Hooks", "hooksConfigMap: String should match pattern"),
        (
            "shutdownTimeoutSeconds: 25000",
            "shutdownTimeoutSeconds: Input should be less than or equal to 3600",
        ),
        ("resources: {limits: {cpu: '-1'}}", "resources.limits: Value error, cpu: '-1' is not a Kubernetes"),
    ):
        path.write_text(bad + "\n")
        with pytest.raises(ValueError, match=re.escape(where)):
            InjectionSettings.load(path)


# --- the AdmissionReview answer ------------------------------------------------------------------------


def review(pod_: dict[str, Any], namespace: str = "mail", **request: Any) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "4f2a",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE",
            "namespace": namespace,
            "object": pod_,
            **request,
        },
    }


WEBHOOK = WebhookSettings(namespace="outbound-relay-system", excluded_namespaces=("kube-public",))


def test_admission_answer_carries_the_patch() -> None:
    answer = admission_response(review(pod(OPTED_IN)), WEBHOOK)
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == "4f2a" and response["allowed"] is True and response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    assert patch == injection_patch(pod(OPTED_IN), WEBHOOK.injection)


def test_dry_run_is_answered_the_same() -> None:
    assert admission_response(review(pod(OPTED_IN), dryRun=True), WEBHOOK) == admission_response(
        review(pod(OPTED_IN), dryRun=False), WEBHOOK
    )


@pytest.mark.parametrize("namespace", ["kube-system", "outbound-relay-system", "kube-public"])
def test_never_in_excluded_namespaces(namespace: str) -> None:
    response = admission_response(review(pod(OPTED_IN), namespace), WEBHOOK)["response"]
    assert response["allowed"] is True and "patch" not in response
    assert "no sidecar in namespace" in response["warnings"][0]


@pytest.mark.parametrize(
    "request_",
    [
        {"operation": "UPDATE"},
        {"kind": {"group": "", "version": "v1", "kind": "Service"}},
        {"subResource": "ephemeralcontainers"},
    ],
)
def test_only_pod_creates_are_mutated(request_: dict[str, Any]) -> None:
    response = admission_response(review(pod(OPTED_IN), **request_), WEBHOOK)["response"]
    assert response == {"uid": "4f2a", "allowed": True}


def test_a_bad_annotation_is_denied_with_the_reason() -> None:
    response = admission_response(review(pod(OPTED_IN | {ANNOTATION_BINDING: "a b"})), WEBHOOK)["response"]
    assert response["allowed"] is False
    assert response["status"]["code"] == 422
    assert "outboundrelay.io/binding" in response["status"]["message"]
