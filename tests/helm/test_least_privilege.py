"""What the operator's ServiceAccount can do once the chart is installed, on the real API server (RBAC
authorizer, the chart's ValidatingAdmissionPolicy), asked as that ServiceAccount with `kubectl --as`.

`kubectl auth can-i` sees RBAC only; what the ValidatingAdmissionPolicy forbids is tried for real
(`--dry-run=server`: admission runs, nothing is stored) and must come back with its denial. The last test
runs the operator itself with a token of that ServiceAccount: it binds itself in the opted-in namespace,
renders there, touches nothing elsewhere, and unbinds itself when the label goes.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.controlplane import ControlPlane
from tests.helm.chart import hand_crds_to, installed, release_name
from tests.operator.cluster import OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

OPT_IN = "outboundrelay.io/inject=enabled"


@dataclass
class Install:
    control_plane: ControlPlane
    release: str
    namespace: str  # the release's
    opted_in: str  # labelled outboundrelay.io/inject=enabled
    plain: str  # not labelled

    @property
    def fullname(self) -> str:
        return f"{self.release}-outbound-relay"

    @property
    def service_account(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.fullname}"

    @property
    def render_role(self) -> str:
        """The ClusterRole the operator binds, as the Deployment names it (a long name is cut to 63)."""
        deployment = json.loads(
            self.control_plane.kubectl("get", "deployment", self.fullname, "-n", self.namespace, "-o", "json")
        )
        (arg,) = [
            a for a in deployment["spec"]["template"]["spec"]["containers"][0]["args"] if "cluster-role=" in a
        ]
        return str(arg.partition("=")[2])

    def can_i(self, verb: str, resource: str, namespace: str | None = None, *, subresource: str = "") -> str:
        """`kubectl auth can-i` as the operator's ServiceAccount: "yes" or "no"."""
        args = ["kubectl", "auth", "can-i", verb, resource, f"--as={self.service_account}"]
        args += [f"--subresource={subresource}"] if subresource else []
        args += [f"--namespace={namespace}"] if namespace else ["--all-namespaces"]
        return self.control_plane.run(*args, check=False).stdout.strip()

    def create(self, manifest: dict[str, Any], *, dry_run: bool = True) -> subprocess.CompletedProcess[str]:
        """`kubectl create` as the operator's ServiceAccount."""
        args = ["kubectl", "create", "-f", "-", f"--as={self.service_account}"]
        args += ["--dry-run=server"] if dry_run else []
        return self.control_plane.run(*args, input=json.dumps(manifest), check=False)


@pytest.fixture
def install(control_plane: ControlPlane, k8s_client: client.ApiClient, namespace: str) -> Iterator[Install]:
    """The chart with its defaults (webhook off: nothing here needs it, and its policy check would refuse
    every policy with no operator Pod to serve it), one opted-in and one plain namespace."""
    core = client.CoreV1Api(k8s_client)
    opted_in, plain = f"{namespace[:50]}-mail", f"{namespace[:50]}-plain"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=plain)))
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(name=opted_in, labels={"outboundrelay.io/inject": "enabled"})
        )
    )
    release = release_name("lp")
    hand_crds_to(control_plane, release, namespace)
    try:
        with installed(control_plane, release, namespace, "--set", "webhook.enabled=false"):
            yield Install(control_plane, release, namespace, opted_in, plain)
    finally:
        for name in (opted_in, plain):
            core.delete_namespace(name)


def role_binding(install: Install, namespace: str, **changes: Any) -> dict[str, Any]:
    """The RoleBinding the operator makes for itself in an opted-in namespace, with `changes`."""
    body: dict[str, Any] = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": install.render_role, "namespace": namespace},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": install.render_role,
        },
        "subjects": [{"kind": "ServiceAccount", "name": install.fullname, "namespace": install.namespace}],
    }
    for key, value in changes.items():
        body[key] = value
    return body


def secret(namespace: str, name: str, type: str = "Opaque", **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "type": type,
        "stringData": {"x": "y"} if type == "Opaque" else {},
    }


def token_secret(namespace: str, name: str = "stolen-token") -> dict[str, Any]:
    """What `create` + `get` on Secrets buys: the token controller fills this with a token of the
    ServiceAccount `default`, readable by whoever may get the Secret."""
    annotations = {"kubernetes.io/service-account.name": "default"}
    return secret(namespace, name, "kubernetes.io/service-account-token", annotations=annotations)


def test_the_service_account_can_neither_read_secrets_widely_nor_mint_tokens(install: Install) -> None:
    no = [
        ("get", "secrets", "kube-system"),
        ("list", "secrets", None),  # --all-namespaces
        ("watch", "secrets", None),
        ("create", "secrets", "kube-system"),
        ("get", "secrets", install.plain),
        ("create", "secrets", install.plain),
        ("list", "secrets", install.namespace),
        # Before it binds itself, not even the opted-in namespace.
        ("get", "secrets", install.opted_in),
        ("create", "serviceaccounts/token", "kube-system"),
        ("create", "serviceaccounts/token", install.opted_in),
        ("bind", "clusterroles/cluster-admin", None),
        ("escalate", "clusterroles", None),
        ("create", "pods", install.opted_in),
        # ConfigMaps (the Lua hooks of an OutboundRelaySettings): read only where it renders, never written.
        ("get", "configmaps", "kube-system"),
        ("list", "configmaps", None),
        ("watch", "configmaps", install.plain),
        ("create", "configmaps", install.opted_in),
        ("patch", "namespaces", None),
        ("update", "validatingadmissionpolicies", None),
        ("delete", "validatingadmissionpolicybindings", None),
        # Leader election: its own Lease in its own namespace, nothing else.
        ("update", "leases.coordination.k8s.io", None),
        ("get", "leases.coordination.k8s.io", "kube-node-lease"),
        ("create", "leases.coordination.k8s.io", install.opted_in),
        ("update", "leases.coordination.k8s.io/another", install.namespace),
        ("delete", f"leases.coordination.k8s.io/{install.fullname}", install.namespace),
    ]
    answers = {(verb, resource, ns): install.can_i(verb, resource, ns) for verb, resource, ns in no}
    assert answers == {key: "no" for key in no}
    # What it has cluster-wide: reading policies (names of Secrets, no values) and binding one role.
    assert install.can_i("list", "outboundauthpolicies.outboundrelay.io") == "yes"
    assert install.can_i("watch", "outboundrelaysettings.outboundrelay.io") == "yes"
    assert install.can_i("create", "outboundrelaysettings.outboundrelay.io") == "no"
    assert install.can_i("bind", f"clusterroles/{install.render_role}") == "yes"
    for verb in ("get", "update"):
        assert (
            install.can_i(verb, f"leases.coordination.k8s.io/{install.fullname}", install.namespace) == "yes"
        )


def test_the_admission_policy_confines_its_role_bindings(install: Install) -> None:
    """`create rolebindings` with `bind` on its render ClusterRole: RBAC would let it bind that role in
    any namespace (kube-system's Secrets) to any subject. The ValidatingAdmissionPolicy refuses all but
    its own binding in an opted-in namespace."""
    attempts = {
        "in kube-system": role_binding(install, "kube-system"),
        "in a namespace not opted in": role_binding(install, install.plain),
        "to another subject": role_binding(
            install,
            install.opted_in,
            subjects=[{"kind": "ServiceAccount", "name": "default", "namespace": install.opted_in}],
        ),
        "under another name": role_binding(
            install, install.opted_in, metadata={"name": "innocent", "namespace": install.opted_in}
        ),
    }
    for what, body in attempts.items():
        proc = install.create(body)
        assert proc.returncode != 0, f"a RoleBinding {what} was admitted"
        assert "ValidatingAdmissionPolicy" in proc.stderr and "denied request" in proc.stderr, proc.stderr
    admin = role_binding(
        install,
        install.opted_in,
        roleRef={"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
    )
    proc = install.create(admin)
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower()  # RBAC's escalation check
    assert install.create(role_binding(install, install.opted_in)).returncode == 0


def test_the_admission_policy_confines_its_secret_writes(install: Install) -> None:
    """`create secrets` cannot be limited by name in RBAC: in a namespace it renders, the operator could
    create a ServiceAccount token Secret and read the token. Only the Opaque outbound-relay-config
    passes."""
    bound = install.create(role_binding(install, install.opted_in), dry_run=False)
    assert bound.returncode == 0, bound.stderr
    wait_for(lambda: install.can_i("create", "secrets", install.opted_in) == "yes", what="the binding")
    # The API server applies an admission policy and its binding once its informers have them: seconds.
    wait_for(
        lambda: install.create(token_secret(install.opted_in)).returncode != 0,
        what="the admission policy in force",
    )
    attempts = {
        "a ServiceAccount token": token_secret(install.opted_in),
        "another Opaque Secret": secret(install.opted_in, "stolen"),
        "a token under the rendered name": token_secret(install.opted_in, "outbound-relay-config"),
    }
    for what, body in attempts.items():
        proc = install.create(body)
        assert proc.returncode != 0, f"{what} was admitted"
        assert "writes only the Opaque Secret outbound-relay-config" in proc.stderr, proc.stderr
    proc = install.create(token_secret("kube-system"))
    assert proc.returncode != 0 and "forbidden" in proc.stderr.lower()
    proc = install.create(secret(install.opted_in, "outbound-relay-config"))
    assert proc.returncode == 0, proc.stderr


def _token_kubeconfig(control_plane: ControlPlane, install: Install, path: Path) -> Path:
    """A kubeconfig that authenticates with a token of the operator's ServiceAccount, as in its Pod."""
    token = control_plane.kubectl(
        "create", "token", install.fullname, "--namespace", install.namespace, "--duration=1h"
    ).strip()
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "operator", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "operator"}}],
        "current-context": "c",
    }
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_operator_binds_itself_only_where_a_namespace_opted_in(
    control_plane: ControlPlane,
    k8s_client: client.ApiClient,
    install: Install,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    core, rbac = client.CoreV1Api(k8s_client), client.RbacAuthorizationV1Api(k8s_client)
    password = "Opt3d-in-pw"
    for ns in (install.opted_in, install.plain):
        core.create_namespaced_secret(
            ns, client.V1Secret(metadata=client.V1ObjectMeta(name="smtp"), string_data={"password": password})
        )
        client.CustomObjectsApi(k8s_client).create_namespaced_custom_object(
            "outboundrelay.io",
            "v1alpha1",
            ns,
            "outboundauthpolicies",
            {
                "apiVersion": "outboundrelay.io/v1alpha1",
                "kind": "OutboundAuthPolicy",
                "metadata": {"name": "global"},
                "spec": {
                    "type": "PLAIN",
                    "user": "u",
                    "passwordSecretRef": {"name": "smtp", "key": "password"},
                },
            },
        )
    monkeypatch.setenv("POD_NAMESPACE", install.namespace)
    kubeconfig = _token_kubeconfig(control_plane, install, tmp_path / "operator.kubeconfig")
    operator = OperatorProcess(
        kubeconfig,
        [],
        tmp_path / "operator.log",
        "--all-namespaces",
        f"--namespace-label={OPT_IN}",
        f"--bind-cluster-role={install.render_role}",
        f"--service-account={install.fullname}",
        "--leader-elect",
        f"--lease-name={install.fullname}",
        "--lease-identity=least-privilege-test",
    )
    try:

        def rendered(ns: str) -> dict[str, Any] | None:
            listed = core.list_namespaced_secret(ns, field_selector="metadata.name=outbound-relay-config")
            return listed.items[0].data if listed.items else None

        data = wait_for(
            lambda: rendered(install.opted_in), timeout=60, what="the opted-in namespace rendered"
        )
        lease = client.CoordinationV1Api(k8s_client).read_namespaced_lease(
            install.fullname, install.namespace
        )
        assert (
            lease.spec is not None and lease.spec.holder_identity == "least-privilege-test"
        )  # the chart's Role suffices
        assert password in base64.b64decode(data["relay.yaml"]).decode()
        binding = rbac.read_namespaced_role_binding(install.render_role, install.opted_in)
        assert binding.role_ref.name == install.render_role
        # Bound: it reads ConfigMaps and writes the settings' status there, and writes no ConfigMap.
        answers = {
            (verb, resource): install.can_i(verb, resource, install.opted_in)
            for verb, resource in (
                ("get", "configmaps"),
                ("list", "configmaps"),
                ("watch", "configmaps"),
                ("update", "configmaps"),
            )
        }
        status = "outboundrelaysettings.outboundrelay.io"
        answers[("patch", "status")] = install.can_i("patch", status, install.opted_in, subresource="status")
        assert answers == {
            ("get", "configmaps"): "yes",
            ("list", "configmaps"): "yes",
            ("watch", "configmaps"): "yes",
            ("update", "configmaps"): "no",
            ("patch", "status"): "yes",
        }
        # A change of a referenced Secret arrives through the per-namespace watch and is rendered.
        core.patch_namespaced_secret("smtp", install.opted_in, {"stringData": {"password": "Ch4nged-pw"}})
        wait_for(
            lambda: b"Ch4nged-pw" in base64.b64decode((rendered(install.opted_in) or {})["relay.yaml"]),
            what="the changed password rendered",
        )
        assert rendered(install.plain) is None
        assert not rbac.list_namespaced_role_binding(install.plain).items
        # The label goes: so do the operator's rights there.
        core.patch_namespace(install.opted_in, {"metadata": {"labels": {"outboundrelay.io/inject": None}}})
        wait_for(
            lambda: (
                not rbac.list_namespaced_role_binding(
                    install.opted_in, field_selector=f"metadata.name={install.render_role}"
                ).items
            ),
            what="the RoleBinding deleted",
        )
        assert install.can_i("get", "secrets", install.opted_in) == "no"
        assert install.can_i("get", "configmaps", install.opted_in) == "no"
        assert rendered(install.plain) is None
        logs, metrics = operator.logs(), operator.metrics()
    finally:
        operator.stop()
    for value in (password, "Ch4nged-pw"):
        assert value not in logs and value not in metrics
