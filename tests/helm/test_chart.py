"""charts/outbound-relay with the real helm against the real API server: lint, server-side dry-run of what
`helm template` renders, install and uninstall, and the RBAC it grants as the API server evaluates it."""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from outbound_operator import cli, webhook
from outbound_operator.injection import (
    ANNOTATION_INJECT,
    CONFIG_FILE,
    CONTAINER_NAME,
    NAMESPACE_LABEL,
    inject,
)
from outbound_relay import cli as relay_cli
from tests.cluster.controlplane import ControlPlane
from tests.helm.chart import (
    CHART,
    CRDS,
    TEST_HOOK,
    find,
    hand_crds_to,
    helm,
    installed,
    objects,
    read_json,
    release_name,
    template,
    values_file,
)

pytestmark = pytest.mark.cluster

CRD_NAMES = tuple(sorted(path.name.removesuffix(".yaml") for path in CRDS.glob("*.yaml")))

# Value sets every test renders; "{watched}" is replaced by a real namespace where one is needed.
VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "watch-namespaces": {"operator": {"watchNamespaces": ["{watched}"]}},
    "webhook-url": {
        "webhook": {"url": "https://127.0.0.1:9443/mutate-pods", "certIPAddresses": ["127.0.0.1"]}
    },
    "webhook-off": {"webhook": {"enabled": False}, "metrics": {"service": {"enabled": False}}},
    "crds-off": {"crds": {"install": False}, "tests": {"enabled": False}},
    "digest-and-dashboard": {
        "image": {"digest": "sha256:" + "ab" * 32},
        "relay": {"runAsUser": 1000, "runAsGroup": 3000},
        "metrics": {"grafanaDashboard": {"enabled": True}},
        "networkPolicy": {"apiServerCIDRs": ["10.0.0.10/32"]},
    },
    "relay-settings": {
        "relay": {
            "image": {"repository": "registry.example/relay", "tag": "1.2.3", "pullPolicy": "Always"},
            "resources": {
                "requests": {"cpu": "5m", "memory": "32Mi"},
                "limits": {"cpu": "1", "memory": "1Gi"},
            },
            "hooksConfigMap": "mail-hooks",
            "logLevel": "debug",
        }
    },
    # Everything values.schema.json allows for resources: numbers, and quantity keys besides cpu/memory.
    "relay-numeric-resources": {
        "relay": {
            "metricsPort": 9525,
            "resources": {
                "requests": {"cpu": 0.05, "memory": "32Mi", "ephemeral-storage": "10Mi"},
                "limits": {"cpu": 1, "memory": 268435456, "ephemeral-storage": "100Mi"},
            },
        }
    },
}
# These need CRDs the test cluster lacks (cert-manager, prometheus-operator): rendered and linted only.
CRD_DEPENDENT: dict[str, dict[str, Any]] = {
    "cert-manager": {"webhook": {"certManager": {"enabled": True}}},
    "cert-manager-issuer": {
        "webhook": {
            "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
        }
    },
    "monitors": {
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "podMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        }
    },
}


def _with_namespace(values: dict[str, Any], namespace: str) -> dict[str, Any]:
    return json.loads(json.dumps(values).replace("{watched}", namespace))  # type: ignore[no-any-return]


@pytest.mark.parametrize("variant", [*VARIANTS, *CRD_DEPENDENT])
def test_lint_is_clean(control_plane: ControlPlane, tmp_path: Path, variant: str) -> None:
    values = _with_namespace({**VARIANTS, **CRD_DEPENDENT}[variant], "mail")
    proc = helm(control_plane, "lint", "--strict", str(CHART), "--values", str(values_file(tmp_path, values)))
    assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_template_is_accepted_by_the_api_server(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, variant: str
) -> None:
    values = _with_namespace(VARIANTS[variant], namespace)
    manifest = template(control_plane, tmp_path, values, namespace=namespace)
    out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
    kinds = {line.split("/")[0] for line in out.splitlines()}
    assert ("customresourcedefinition.apiextensions.k8s.io" in kinds) == (variant != "crds-off")
    assert "deployment.apps" in kinds
    # The `helm test` hook's objects (not in `helm template`'s output without --show-only) too.
    if variant != "crds-off":
        hook = objects(template(control_plane, tmp_path, values, namespace=namespace, show_only=TEST_HOOK))
        # The Pod's admission looks its ServiceAccount up: that one is made for real (in the test's
        # namespace, deleted with it), the rest is a dry run.
        (account,) = find(hook, "ServiceAccount")
        control_plane.kubectl("apply", "-f", "-", input=json.dumps(account))
        rest = {"apiVersion": "v1", "kind": "List", "items": [d for d in hook if d is not account]}
        for _ in range(50):  # until the admission plugin's cache has the new ServiceAccount
            try:
                out = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(rest))
                break
            except RuntimeError as error:
                if "serviceaccount" not in str(error):
                    raise
                time.sleep(0.2)
        assert "pod/" in out and "clusterrole.rbac.authorization.k8s.io/" in out
    if variant != "webhook-off":
        assert "mutatingwebhookconfiguration.admissionregistration.k8s.io" in kinds


def test_crds_come_from_the_one_source_in_crds(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Every file of crds/ (what `make crds` writes) is a template of the release, as it is but for the
    chart's labels and the keep policy: Helm installs and upgrades it. Helm's own crds/ directory is gone:
    it would install the CRDs once and never upgrade them."""
    files = CHART / "files" / "crds"
    assert files.is_symlink() and files.resolve() == CRDS.resolve()
    assert not (CHART / "crds").exists()
    docs = objects(template(control_plane, tmp_path))
    rendered = {d["metadata"]["name"]: d for d in find(docs, "CustomResourceDefinition")}
    assert set(rendered) == set(CRD_NAMES)
    for name, crd in rendered.items():
        metadata = crd.pop("metadata")
        assert metadata["annotations"] == {"helm.sh/resource-policy": "keep"}
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "Helm"
        source = yaml.safe_load((CRDS / f"{name}.yaml").read_text())
        assert {"metadata": {"name": name}, **crd} == source
    # crds.keep: false leaves the annotation off; crds.install: false, the CRDs.
    docs = objects(template(control_plane, tmp_path, {"crds": {"keep": False}}))
    assert all("annotations" not in d["metadata"] for d in find(docs, "CustomResourceDefinition"))
    assert not find(
        objects(template(control_plane, tmp_path, {"crds": {"install": False}})), "CustomResourceDefinition"
    )
    # `helm package` follows the symlink: the packaged chart carries the files themselves.
    helm(control_plane, "package", str(CHART), "--destination", str(tmp_path))
    packaged = next(tmp_path.glob("outbound-relay-*.tgz"))
    with tarfile.open(packaged) as tgz:
        members = {m.name: m for m in tgz.getmembers()}
    for crd_file in CRDS.glob("*.yaml"):
        assert members[f"outbound-relay/files/crds/{crd_file.name}"].isfile()
    assert not [m for m in members if m.startswith("outbound-relay/crds/")]


def test_a_new_file_in_crds_is_templated_without_a_chart_change(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """The template takes every file of the directory (.Files.Glob): a CRD kind added to the models and
    written by `make crds` ships without a chart change. On a copy of the chart with one more file."""
    chart = tmp_path / "outbound-relay"
    shutil.copytree(CHART, chart, symlinks=False, ignore=shutil.ignore_patterns("crds"))
    (chart / "files" / "crds").mkdir()
    for crd_file in CRDS.glob("*.yaml"):
        shutil.copy(crd_file, chart / "files" / "crds" / crd_file.name)
    extra = yaml.safe_load((CRDS / f"{CRD_NAMES[0]}.yaml").read_text())
    extra["metadata"]["name"] = "outboundwidgets.outboundrelay.io"
    extra["spec"]["names"] |= {
        "kind": "OutboundWidget",
        "plural": "outboundwidgets",
        "singular": "outboundwidget",
    }
    extra["spec"]["names"].pop("shortNames", None)
    (chart / "files" / "crds" / "outboundwidgets.outboundrelay.io.yaml").write_text(yaml.safe_dump(extra))
    out = helm(
        control_plane, "template", "x", str(chart), "--namespace", "outbound-relay-system",
        "--show-only", "templates/crds.yaml",
    ).stdout  # fmt: skip
    names = {d["metadata"]["name"] for d in objects(out)}
    assert names == {*CRD_NAMES, "outboundwidgets.outboundrelay.io"}
    hook = helm(
        control_plane, "template", "x", str(chart), "--namespace", "outbound-relay-system",
        "--show-only", TEST_HOOK,
    ).stdout  # fmt: skip
    (role,) = find(objects(hook), "ClusterRole")
    assert set(role["rules"][0]["resourceNames"]) == names  # the helm test checks the new one too


@pytest.mark.parametrize(
    ("values", "operator", "sidecar"),
    [
        ({}, "ghcr.io/outbound-relay/outbound-relay:0.1.0", "ghcr.io/outbound-relay/outbound-relay:0.1.0"),
        (
            {"image": {"digest": "sha256:" + "1" * 64, "tag": "ignored"}},
            "ghcr.io/outbound-relay/outbound-relay@sha256:" + "1" * 64,
            "ghcr.io/outbound-relay/outbound-relay@sha256:" + "1" * 64,
        ),
        (
            {
                "image": {"digest": "sha256:" + "1" * 64},
                "relay": {"image": {"repository": "r.example/relay"}},
            },
            "ghcr.io/outbound-relay/outbound-relay@sha256:" + "1" * 64,
            "r.example/relay:0.1.0",  # another image: the operator's digest does not apply
        ),
        (
            {"relay": {"image": {"repository": "r.example/relay", "digest": "sha256:" + "2" * 64}}},
            "ghcr.io/outbound-relay/outbound-relay:0.1.0",
            "r.example/relay@sha256:" + "2" * 64,
        ),
    ],
)
def test_image_digest(
    control_plane: ControlPlane, tmp_path: Path, values: dict[str, Any], operator: str, sidecar: str
) -> None:
    docs = objects(template(control_plane, tmp_path, values))
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == operator
    (sidecar_config,) = find(docs, "ConfigMap", "-sidecar")
    assert yaml.safe_load(sidecar_config["data"]["sidecar.yaml"])["image"] == sidecar
    hook = template(control_plane, tmp_path, values, show_only=TEST_HOOK)
    (pod,) = find(objects(hook), "Pod")
    assert pod["spec"]["containers"][0]["image"] == operator


RESTRICTED_CONTAINER = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "privileged": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def test_operator_deployment_is_locked_down(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Pod Security "restricted", and no fixed UID, GID or fsGroup: OpenShift's restricted SCC assigns the
    UID from the namespace's range and refuses any other (the image's own user is 65532)."""
    docs = objects(template(control_plane, tmp_path))
    (deployment,) = find(docs, "Deployment")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
    container, checker = pod["containers"]
    assert container["securityContext"] == checker["securityContext"] == RESTRICTED_CONTAINER
    (hook_pod,) = find(objects(template(control_plane, tmp_path, show_only=TEST_HOOK)), "Pod")
    assert hook_pod["spec"]["securityContext"] == pod["securityContext"]
    assert hook_pod["spec"]["containers"][0]["securityContext"] == RESTRICTED_CONTAINER
    # A UID of one's own, where a platform wants it.
    values = {"operator": {"podSecurityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 2000}}}
    (deployment,) = find(objects(template(control_plane, tmp_path, values)), "Deployment")
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 1000
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= container.keys()
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert "--all-namespaces" in container["args"]


def test_the_hook_checker_holds_no_token(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Lua from ConfigMaps runs in the hook-checker container, which gets no ServiceAccount token: the Pod
    mounts none by itself, and the operator container mounts its own (docs/security.md, "Lua hooks")."""
    (deployment,) = find(objects(template(control_plane, tmp_path)), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    operator, checker = pod["containers"]
    assert (operator["name"], checker["name"]) == ("operator", "hook-checker")
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    assert {"name": "kube-api-access", "mountPath": token_dir, "readOnly": True} in operator["volumeMounts"]
    assert [m["name"] for m in checker["volumeMounts"]] == ["hook-checker"]
    assert "envFrom" not in checker and "env" not in checker
    (api_access,) = [v for v in pod["volumes"] if v["name"] == "kube-api-access"]
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in api_access["projected"][
        "sources"
    ]
    socket = "/run/hook-checker/check.sock"
    assert f"--hook-checker-socket={socket}" in operator["args"]
    assert checker["command"] == ["outbound-hook-checker"] and checker["args"] == [f"--socket={socket}"]
    assert checker["image"] == operator["image"]

    in_process = {"operator": {"hookChecker": {"isolated": False}}}
    (deployment,) = find(objects(template(control_plane, tmp_path, in_process)), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (operator,) = pod["containers"]
    assert "automountServiceAccountToken" not in pod
    assert not [a for a in operator["args"] if a.startswith("--hook-checker-socket")]


def test_operator_runs_highly_available(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Two replicas by default, one Lease, rolling updates that keep one serving, a PodDisruptionBudget,
    replicas spread over nodes; one replica without leader election, never two at once."""
    docs = objects(template(control_plane, tmp_path))
    (deployment,) = find(docs, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    fullname = deployment["metadata"]["name"]
    assert {"--leader-elect", f"--lease-name={fullname}", "--lease-duration=15"} <= set(container["args"])
    assert f"--webhook-cert-secret={fullname}-webhook-tls" in container["args"]
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in container["env"]
    (term,) = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    (budget,) = find(docs, "PodDisruptionBudget")
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": spec["selector"]["matchLabels"]}}

    own: dict[str, Any] = {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}
    }
    docs = objects(template(control_plane, tmp_path, {"operator": {"affinity": own}}))
    assert find(docs, "Deployment")[0]["spec"]["template"]["spec"]["affinity"] == own

    on_the_node = {"operator": {"hostNetwork": True}}
    docs = objects(template(control_plane, tmp_path, on_the_node))
    strategy = find(docs, "Deployment")[0]["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {
        "maxUnavailable": 1,
        "maxSurge": 0,
    }  # the node's ports: one at a time

    single = {"operator": {"replicas": 1, "leaderElection": {"enabled": False}}}
    docs = objects(template(control_plane, tmp_path, single))
    (deployment,) = find(docs, "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert "--leader-elect" not in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert not find(docs, "PodDisruptionBudget")
    assert not [r for d in find(docs, "Role") for r in d["rules"] if "leases" in r["resources"]]

    two_writers = {"operator": {"replicas": 2, "leaderElection": {"enabled": False}}}
    args = ["template", "x", str(CHART), "--values", str(values_file(tmp_path, two_writers))]
    proc = helm(control_plane, *args, check=False)
    assert proc.returncode != 0 and "needs operator.leaderElection.enabled" in proc.stderr


@pytest.mark.parametrize(
    "variant",
    [
        "defaults",
        "watch-namespaces",
        "webhook-url",
        "relay-settings",
        "relay-numeric-resources",
        "cert-manager",
    ],
)
def test_operator_accepts_what_the_chart_passes(
    control_plane: ControlPlane, namespace: str, tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Deployment's args parse with outbound-operator's own parser (plus the webhook's options), the
    sidecar.yaml of the chart's ConfigMap loads into the webhook's InjectionSettings, and a Pod injected
    with those settings is accepted by the API server."""
    values = _with_namespace({**VARIANTS, **CRD_DEPENDENT}[variant], "mail")
    docs = objects(template(control_plane, tmp_path, values))
    (deployment,) = find(docs, "Deployment")
    (configuration,) = find(docs, "MutatingWebhookConfiguration")
    (sidecar_config,) = find(docs, "ConfigMap", "-sidecar")
    sidecar_file = tmp_path / "sidecar.yaml"
    sidecar_file.write_text(sidecar_config["data"]["sidecar.yaml"])
    args = [
        f"--webhook-sidecar-config={sidecar_file}" if arg.startswith("--webhook-sidecar-config=") else arg
        for arg in deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    ]
    parser = cli.build_parser()
    with contextlib.suppress(argparse.ArgumentError):  # already there once the CLI adds them itself
        webhook.add_arguments(parser)
    parsed = parser.parse_args(args)
    monkeypatch.setenv("POD_NAMESPACE", "outbound-relay-system")  # the Deployment's env
    serving = cli.serve_settings(parsed)
    if variant == "watch-namespaces":
        assert serving.patterns == ("mail",) and serving.bind_cluster_role is None
    else:
        # Only opted-in namespaces, with rights the operator grants itself there (docs/security.md).
        assert serving.label == ("outboundrelay.io/inject", "enabled")
        assert serving.bind_cluster_role is not None and serving.bind_cluster_role.endswith("-render")
        assert serving.service_account is not None
    settings = webhook.settings_from_args(parsed)
    assert settings is not None
    assert settings.configuration == configuration["metadata"]["name"]
    assert settings.port == 9443
    assert "kube-system" in settings.never_injected
    if variant == "relay-settings":
        assert settings.injection.image == "registry.example/relay:1.2.3"
        assert settings.injection.resources.limits.cpu == "1"
        assert settings.injection.hooks_config_map == "mail-hooks"
        assert settings.injection.log_level == "debug"
    else:
        assert settings.injection.image == "ghcr.io/outbound-relay/outbound-relay:0.1.0"
    if variant == "relay-numeric-resources":
        assert settings.injection.metrics_port == 9525
        assert settings.injection.resources.requests.as_dict() == {
            "cpu": "0.05",
            "memory": "32Mi",
            "ephemeral-storage": "10Mi",
        }
        assert settings.injection.resources.limits.as_dict() == {
            "cpu": "1",
            "memory": "268435456",
            "ephemeral-storage": "100Mi",
        }
    if variant == "webhook-url":
        assert settings.extra_ip_addresses == ("127.0.0.1",)
    pod = inject(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "mailer", "annotations": {ANNOTATION_INJECT: "true"}},
            "spec": {"containers": [{"name": "app", "image": "busybox:1.37"}]},
        },
        settings.injection,
    )
    # A resource name or quantity the API server does not take would fail every injected Pod.
    out = control_plane.kubectl(
        "create", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-", input=json.dumps(pod)
    )
    (sidecar,) = [c for c in json.loads(out)["spec"]["initContainers"] if c["name"] == "outbound-relay"]
    assert sidecar["resources"]["limits"].keys() == settings.injection.resources.limits.as_dict().keys()
    assert sidecar["ports"][0]["containerPort"] == settings.injection.metrics_port
    if variant.startswith("cert-manager"):
        assert settings.cert_dir == Path("/etc/outbound-operator/tls") and settings.cert_secret is None
    else:
        assert settings.cert_secret == f"{deployment['metadata']['name']}-webhook-tls"
    lease = cli.lease_settings(parsed)
    assert lease is not None and lease.name == deployment["metadata"]["name"]
    assert (lease.lease_duration, lease.renew_deadline, lease.retry_period) == (15, 10, 2)


def test_webhook_configuration_cannot_take_a_namespace_down(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    docs = objects(template(control_plane, tmp_path, namespace="mail-system"))
    (configuration,) = find(docs, "MutatingWebhookConfiguration")
    (webhook,) = configuration["webhooks"]
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["sideEffects"] == "None"
    assert webhook["timeoutSeconds"] <= 5
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    expressions = webhook["namespaceSelector"]["matchExpressions"]
    assert {"key": "outboundrelay.io/inject", "operator": "In", "values": ["enabled"]} in expressions
    (excluded,) = [e for e in expressions if e["operator"] == "NotIn"]
    assert {"kube-system", "mail-system"} <= set(excluded["values"])
    assert "caBundle" not in webhook["clientConfig"]  # the operator's to write; helm must not reset it
    assert webhook["clientConfig"]["service"]["path"] == "/mutate-pods"


@pytest.mark.parametrize("bad", [
    {"webhook": {"failurePolicy": "Maybe"}},
    {"webhook": {"timeoutSeconds": 60}},
    {"operator": {"watchNamespaces": ["Not_A_Namespace"]}},
    {"relay": {"logLevel": "chatty"}},
    {"relay": {"metricsPort": 0}},
    # Generated from the operator's own checks (chart_schema.py): values it would refuse at start.
    {"relay": {"resources": {"limits": {"cpu": "1.2.3"}}}},
    {"relay": {"hooksConfigMap": "Mail_Hooks"}},
    {"image": {"repository": ""}},
    {"image": {"digest": "latest"}},
    {"relay": {"image": {"digest": "sha256:xyz"}}},
    {"crds": {"install": "yes"}},
    {"metrics": {"prometheusRule": {"deferralRatio": 2}}},
    {"metrics": {"grafanaDashboard": {"namespace": "Monitoring"}}},
    {"unknownTopLevel": True},
])  # fmt: skip
def test_values_schema_rejects_mistakes(
    control_plane: ControlPlane, tmp_path: Path, bad: dict[str, Any]
) -> None:
    args = ["template", "x", str(CHART), "--values", str(values_file(tmp_path, bad))]
    proc = helm(control_plane, *args, check=False)
    assert proc.returncode != 0
    assert "values don't meet the specifications of the schema" in proc.stderr


def _rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [rule for d in docs if d["kind"] in ("ClusterRole", "Role") for rule in d["rules"]]


@pytest.mark.parametrize("variant", ["defaults", "watch-namespaces", "cert-manager"])
def test_rbac_has_no_wildcards_and_writes_only_its_secret(
    control_plane: ControlPlane, tmp_path: Path, variant: str
) -> None:
    values = _with_namespace({**VARIANTS, **CRD_DEPENDENT}[variant], "mail")
    rules = _rules(objects(template(control_plane, tmp_path, values)))
    hook_rules = _rules(objects(template(control_plane, tmp_path, values, show_only=TEST_HOOK)))
    # The `helm test` Pod's: get, by name, of the CRDs and the webhook configuration only.
    assert hook_rules and all(rule["verbs"] == ["get"] and rule["resourceNames"] for rule in hook_rules)
    assert {r for rule in hook_rules for r in rule["resources"]} <= {
        "customresourcedefinitions",
        "mutatingwebhookconfigurations",
    }
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, ()), rule
    docs = objects(template(control_plane, tmp_path, values))
    (deployment,) = find(docs, "Deployment")
    certificate = [f"{deployment['metadata']['name']}-webhook-tls"]
    for document in docs:
        if document["kind"] not in ("ClusterRole", "Role"):
            continue
        for rule in document["rules"]:
            writes = set(rule["verbs"]) & {"update", "patch", "delete"}
            if "secrets" in rule["resources"] and writes:
                # The rendered Secret, or, in its own namespace only, the webhook certificate it keeps.
                assert rule["resourceNames"] == ["outbound-relay-config"] or (
                    document["kind"] == "Role"
                    and rule["resourceNames"] == certificate
                    and variant != "cert-manager"
                ), rule
            if "leases" in rule["resources"]:
                assert document["kind"] == "Role"  # never cluster-wide
                if writes:
                    assert rule["resourceNames"] == [deployment["metadata"]["name"]]
    webhook_rules = [r for r in rules if "mutatingwebhookconfigurations" in r["resources"]]
    if variant == "cert-manager":
        assert not webhook_rules  # cainjector writes the caBundle
    else:
        (rule,) = webhook_rules
        assert set(rule["verbs"]) == {"get", "patch"} and len(rule["resourceNames"]) == 1


def _can(
    control_plane: ControlPlane, who: str, verb: str, resource: str, namespace: str | None = None
) -> bool:
    resource, _, subresource = resource.partition(":")
    args = ["auth", "can-i", verb, resource, f"--as={who}"]
    args += [f"--subresource={subresource}"] if subresource else []
    args += [f"--namespace={namespace}"] if namespace else []
    proc = control_plane.run("kubectl", *args, check=False)
    return proc.stdout.strip() == "yes"


def _wait_established(api: client.ApiClient, names: set[str], timeout: float = 60) -> None:
    extensions = client.ApiextensionsV1Api(api)
    deadline = time.monotonic() + timeout
    pending = set(names)
    while pending:
        for name in sorted(pending):
            crd = read_json(extensions.read_custom_resource_definition, name)
            conditions = crd.get("status", {}).get("conditions", [])
            if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                pending.discard(name)
        assert time.monotonic() < deadline, f"CRDs not established after {timeout}s: {pending}"
        time.sleep(0.2)


def test_install_and_uninstall(
    control_plane: ControlPlane, k8s_client: client.ApiClient, namespace: str, tmp_path: Path
) -> None:
    release = release_name()
    hand_crds_to(control_plane, release, namespace)
    out = helm(
        control_plane, "install", release, str(CHART), "--namespace", namespace, "--wait", "--timeout", "120s"
    )
    assert "STATUS: deployed" in out.stdout
    _wait_established(k8s_client, set(CRD_NAMES))
    extensions = client.ApiextensionsV1Api(k8s_client)
    for name in CRD_NAMES:  # the release owns them: `helm upgrade` upgrades them
        annotations = read_json(extensions.read_custom_resource_definition, name)["metadata"]["annotations"]
        assert annotations["meta.helm.sh/release-name"] == release
        assert annotations["helm.sh/resource-policy"] == "keep"

    apps = client.AppsV1Api(k8s_client)
    fullname = f"{release}-outbound-relay"
    deadline = time.monotonic() + 60  # helm's --wait may return before the Deployment's status says so
    while (
        read_json(apps.read_namespaced_deployment, fullname, namespace)["status"].get("availableReplicas")
        != 2
    ):
        assert time.monotonic() < deadline, "the two operator replicas are not available"  # kwok runs them
        time.sleep(0.2)
    configuration = f"{fullname}-{namespace}"
    admission = client.AdmissionregistrationV1Api(k8s_client)
    stored = read_json(admission.read_mutating_webhook_configuration, configuration)
    assert stored["webhooks"][0]["failurePolicy"] == "Ignore"
    # A policy reaches admission (the CRDs serve) and is refused unchecked: the operator's Pod (kwok runs
    # no container) cannot answer the policy check, whose failurePolicy is Fail.
    example = str(Path(__file__).parents[2] / "docs/examples/policy.yaml")
    refused = control_plane.run("kubectl", "apply", "-n", namespace, "-f", example, check=False)
    assert refused.returncode != 0 and 'failed calling webhook "policies.outboundrelay.io"' in refused.stderr

    who = f"system:serviceaccount:{namespace}:{fullname}"
    # No Secret rights anywhere until the operator binds itself in an opted-in namespace.
    assert not _can(control_plane, who, "list", "secrets", "default")
    assert not _can(control_plane, who, "update", "secrets/outbound-relay-config", "default")
    assert _can(control_plane, who, "create", "subjectaccessreviews.authorization.k8s.io")
    assert _can(control_plane, who, "list", "outboundauthpolicies.outboundrelay.io", "default")
    assert not _can(control_plane, who, "patch", "outboundauthpolicies.outboundrelay.io", "default")
    assert not _can(control_plane, who, "delete", "outboundauthpolicies.outboundrelay.io", "default")
    assert _can(control_plane, who, "patch", f"validatingwebhookconfigurations/{configuration}")
    assert _can(control_plane, who, "patch", f"mutatingwebhookconfigurations/{configuration}")
    assert not _can(control_plane, who, "patch", "mutatingwebhookconfigurations/another")
    assert not _can(control_plane, who, "create", "pods", "default")

    helm(control_plane, "uninstall", release, "--namespace", namespace, "--wait", "--timeout", "120s")
    listed = read_json(admission.list_mutating_webhook_configuration)["items"]
    assert configuration not in [c["metadata"]["name"] for c in listed]
    roles = read_json(client.RbacAuthorizationV1Api(k8s_client).list_cluster_role)["items"]
    assert not [r for r in roles if r["metadata"]["name"].startswith(fullname)]
    # helm.sh/resource-policy: keep: the CRDs, and so every policy, survive an uninstall.
    _wait_established(k8s_client, set(CRD_NAMES))


def test_watch_namespaces_confine_secret_access(
    control_plane: ControlPlane, k8s_client: client.ApiClient, namespace: str
) -> None:
    core = client.CoreV1Api(k8s_client)
    watched = f"{namespace}-watched"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=watched)))
    release = release_name()
    try:
        hand_crds_to(control_plane, release, namespace)
        with installed(
            control_plane, release, namespace,
            "--set", f"operator.watchNamespaces={{{watched}}}", "--wait", "--timeout", "120s",
        ):  # fmt: skip
            who = f"system:serviceaccount:{namespace}:{release}-outbound-relay"
            assert _can(control_plane, who, "watch", "secrets", watched)
            assert _can(control_plane, who, "list", "outboundauthpolicies.outboundrelay.io", watched)
            assert not _can(control_plane, who, "get", "secrets", "default")
            assert not _can(control_plane, who, "get", "secrets", namespace)
            assert not _can(control_plane, who, "list", "outboundauthpolicies.outboundrelay.io", "default")
    finally:
        core.delete_namespace(watched)


def _names(docs: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {(d["kind"], d["metadata"]["name"]): d["metadata"].get("namespace", "") for d in docs}


def test_long_names_are_cut_consistently_and_stay_distinct(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    """A 53-character release name (helm's limit) makes the full name 68 characters: every name is cut to
    63 with a hash suffix, the operator's args name the objects as they are, two namespaces' cluster-scoped
    objects do not collide, and the API server takes it all."""
    release = "r" * 45 + "-" + "x" * 7
    values: dict[str, Any] = {"webhook": {"certManager": {"enabled": True}}}
    docs = objects(template(control_plane, tmp_path, values, release=release, namespace=namespace))
    for doc in docs:
        assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]
    (deployment,) = find(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    names = _names(docs)
    service = next(a.split("=", 1)[1] for a in args if a.startswith("--webhook-service="))
    configuration = next(a.split("=", 1)[1] for a in args if a.startswith("--webhook-configuration="))
    assert ("Service", service) in names
    assert ("MutatingWebhookConfiguration", configuration) in names
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert ("ConfigMap", volumes["sidecar"]["configMap"]["name"]) in names
    assert ("Certificate", service) in names  # cert-manager.io/inject-ca-from names it
    certificate = next(d for d in find(docs, "Certificate") if d["metadata"]["name"] == service)
    assert certificate["spec"]["secretName"] == volumes["webhook-tls"]["secret"]["secretName"]
    assert len({name for kind, name in names if kind == "Service"}) == len(find(docs, "Service"))
    # The same release in another namespace: no cluster-scoped name in common.
    other = objects(template(control_plane, tmp_path, values, release=release, namespace=f"{namespace}-b"))
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration"}
    mine = {(k, n) for (k, n) in names if k in cluster_scoped}
    assert mine and not mine & {(k, n) for (k, n) in _names(other) if k in cluster_scoped}
    # Without the cert-manager objects (no CRDs here), what the API server says of the rest.
    plain = template(control_plane, tmp_path, release=release, namespace=namespace)
    control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=plain)


def test_cert_manager_mode_issues_from_a_ca_of_its_own(control_plane: ControlPlane, tmp_path: Path) -> None:
    """selfSigned Issuer -> CA Certificate -> CA Issuer -> serving Certificate: the caBundle (the CA) then
    survives the serving certificate's renewals. Issued by the selfSigned Issuer directly, the serving
    certificate would be its own CA, and each renewal would break TLS until everything reloads."""
    docs = objects(template(control_plane, tmp_path, CRD_DEPENDENT["cert-manager"]))
    issuers = {d["metadata"]["name"]: d for d in find(docs, "Issuer")}
    certificates = {d["metadata"]["name"]: d for d in find(docs, "Certificate")}
    (configuration,) = find(docs, "MutatingWebhookConfiguration")
    injected_from = configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"].split("/")[1]
    serving = certificates[injected_from]
    assert serving["spec"].get("isCA") is not True
    ca_issuer = issuers[serving["spec"]["issuerRef"]["name"]]
    assert "selfSigned" not in ca_issuer["spec"]
    ca_certificate = next(
        c for c in certificates.values() if c["spec"]["secretName"] == ca_issuer["spec"]["ca"]["secretName"]
    )
    assert ca_certificate["spec"]["isCA"] is True
    assert ca_certificate["spec"]["duration"] == "87600h"
    assert issuers[ca_certificate["spec"]["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    # With an issuer of the user's own, the chart makes none.
    docs = objects(template(control_plane, tmp_path, CRD_DEPENDENT["cert-manager-issuer"]))
    assert not find(docs, "Issuer")
    (serving,) = find(docs, "Certificate")
    assert serving["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


def test_default_sidecar_fits_a_namespace_with_a_cpu_limit_quota(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    """A ResourceQuota on limits.cpu makes the API server refuse any container without a CPU limit; a
    LimitRange's defaults are applied before the webhook runs, so they never reach the sidecar. With the
    chart's defaults, an injected Pod (whose app sets its own limits) is accepted there."""
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "limits", "namespace": namespace},
        "spec": {"hard": {"limits.cpu": "8", "limits.memory": "8Gi"}},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(quota))
    docs = objects(template(control_plane, tmp_path))
    (sidecar_config,) = find(docs, "ConfigMap", "-sidecar")
    sidecar_file = tmp_path / "sidecar.yaml"
    sidecar_file.write_text(sidecar_config["data"]["sidecar.yaml"])
    settings = webhook.parse_settings(["--webhook-port=9443", f"--webhook-sidecar-config={sidecar_file}"])
    assert settings is not None
    app = {"name": "app", "image": "busybox:1.37", "resources": {"limits": {"cpu": "1", "memory": "64Mi"}}}
    pod = inject(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "mailer", "annotations": {ANNOTATION_INJECT: "true"}},
            "spec": {"containers": [app]},
        },
        settings.injection,
    )
    with control_plane.api_client() as api:
        core = client.CoreV1Api(api)
        for _ in range(100):  # the quota controller fills in status.hard shortly after creation
            quota_now = read_json(core.read_namespaced_resource_quota, "limits", namespace)
            if quota_now.get("status", {}).get("hard"):
                break
            time.sleep(0.1)
    control_plane.kubectl("create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(pod))
    without = json.loads(json.dumps(pod))
    sidecar = without["spec"]["initContainers"][0]
    del sidecar["resources"]["limits"]["cpu"]
    with pytest.raises(RuntimeError, match=r"must specify limits\.cpu"):
        control_plane.kubectl(
            "create", "--dry-run=server", "-n", namespace, "-f", "-", input=json.dumps(without)
        )


def _notes(control_plane: ControlPlane, tmp_path: Path, values: dict[str, Any] | None = None) -> str:
    # Without the CRDs: Helm would check who owns those the other tests left in the cluster.
    values = {"crds": {"install": False}, **(values or {})}
    out = helm(
        control_plane, "install", release_name("notes"), str(CHART), "--namespace", "outbound-relay-system",
        "--dry-run=client", "--values", str(values_file(tmp_path, values)),
    ).stdout  # fmt: skip
    return out.split("\nNOTES:\n", 1)[1]


def test_notes_commands_work_as_written(control_plane: ControlPlane, tmp_path: Path) -> None:
    """NOTES.txt's commands name the opt-in label, the sidecar's container and config file and metrics
    port, and parse with the relay's own CLI; the test message's Python is valid."""
    notes = _notes(control_plane, tmp_path, {"relay": {"metricsPort": 9525}})
    commands = [
        shlex.split(line.strip())
        for line in notes.splitlines()
        if line.strip().startswith(("kubectl", "helm"))
    ]
    label = next(c for c in commands if c[:3] == ["kubectl", "label", "namespace"])
    assert label[-1] == f"{NAMESPACE_LABEL}=enabled"
    execs = [c for c in commands if c[:2] == ["kubectl", "exec"]]
    assert len(execs) == 2
    for command in execs:
        assert command[command.index("-c") + 1] == CONTAINER_NAME
    send, explain = (c[c.index("--") + 1 :] for c in execs)
    assert send[:2] == ["python", "-c"]
    compile(send[2], "NOTES.txt", "exec")
    assert "smtplib.SMTP('127.0.0.1', 2525)" in send[2]
    assert explain[0] == "outbound-relay"
    parsed = relay_cli.build_parser().parse_args(explain[1:])
    assert str(parsed.config) == CONFIG_FILE and parsed.metrics_port == 9525 and parsed.rcpt
    assert next(c for c in commands if c[0] == "helm")[:2] == ["helm", "test"]
    # Without the webhook no sidecar: nothing to exec into.
    notes = _notes(control_plane, tmp_path, {"webhook": {"enabled": False}})
    assert "kubectl exec" not in notes and f"{NAMESPACE_LABEL}=enabled" in notes
