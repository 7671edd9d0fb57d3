"""Several operator replicas serve the webhook with one self-managed certificate, kept in a Secret: the
one caBundle of the webhook configurations trusts every replica, also across a rotation."""

from __future__ import annotations

import base64
import datetime
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from kubernetes import client

from outbound_operator.webhook import MUTATE_PATH
from outbound_operator.webhook_certs import RotationSettings, SharedCertificates
from tests.cluster.controlplane import ControlPlane
from tests.operator.cluster import CRD_DIR, OperatorProcess, call_json
from tests.webhook.conftest import Registration, create_pod, free_port, make_pod, wait_for

pytestmark = pytest.mark.cluster

SECRET = "outbound-relay-webhook-tls"
OPT_IN = {"outboundrelay.io/inject": "true"}


def served_certificate(port: int, bundle: bytes) -> bytes | None:
    """The certificate served on `port`, if it verifies against `bundle` (the caBundle); None if not."""
    context = ssl.create_default_context(cadata=bundle.decode())
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            return der
    except ssl.SSLCertVerificationError:
        return None


def published(registration: Registration) -> bytes:
    bundle = registration.ca_bundle()
    return base64.b64decode(bundle) if bundle else b""


def stored(registration: Registration) -> dict[str, bytes]:
    secret = call_json(
        client.CoreV1Api(registration.api).read_namespaced_secret, SECRET, registration.operator_namespace
    )
    assert secret["type"] == "kubernetes.io/tls"
    return {k: base64.b64decode(v) for k, v in secret["data"].items()}


def test_replicas_serve_one_certificate_that_the_ca_bundle_trusts(
    registration: Registration, injected_namespace: str
) -> None:
    leader = registration.start(cert_secret=SECRET)
    follower = registration.start(lambda: False, cert_secret=SECRET, port=free_port())
    bundle = published(registration)
    assert bundle == stored(registration)["ca.crt"]
    first = served_certificate(registration.port, bundle)
    assert first is not None and served_certificate(follower.settings.port, bundle) == first
    registration.wait_until_injecting(injected_namespace)  # the API server trusts it too
    # A third replica starting later changes nothing: no fight over the caBundle.
    late = registration.start(lambda: False, cert_secret=SECRET, port=free_port())
    time.sleep(1.5)  # three checks of each
    assert published(registration) == bundle
    assert served_certificate(late.settings.port, bundle) == first
    assert leader.server is not None and isinstance(leader.server.certificates, SharedCertificates)
    assert leader.server.certificates.rotations == 0


def test_a_rotation_keeps_every_replica_trusted(registration: Registration) -> None:
    """The leader renews the certificate every few seconds here; the follower picks each one up from the
    Secret. Sampled all along, both replicas' certificates verify against the published caBundle."""
    rotation = RotationSettings(
        validity=datetime.timedelta(seconds=30),
        renew_before=datetime.timedelta(seconds=26),  # due 4 s after each renewal
        check_interval=0.5,
        propagation_delay=1.0,
        retire_after=2.0,
    )
    leader = registration.start(cert_secret=SECRET, rotation=rotation)
    follower = registration.start(lambda: False, cert_secret=SECRET, rotation=rotation, port=free_port())
    ports = (registration.port, follower.settings.port)
    seen: set[bytes] = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        bundle = published(registration)
        for port in ports:
            certificate = served_certificate(port, bundle)
            assert certificate is not None, (
                f"the replica on port {port} serves what the caBundle does not trust"
            )
            seen.add(certificate)
        time.sleep(0.1)
    assert leader.server is not None and follower.server is not None
    assert isinstance(leader.server.certificates, SharedCertificates)
    assert isinstance(follower.server.certificates, SharedCertificates)
    assert leader.server.certificates.rotations >= 2
    assert follower.server.certificates.rotations >= 2  # adopted from the Secret, not made by itself
    assert len(seen) >= 3
    wait_for(
        lambda: (
            served_certificate(follower.settings.port, published(registration))
            == served_certificate(registration.port, published(registration))
        ),
        10,
        "both replicas serve the same certificate",
    )


def test_both_operator_replicas_admit_pods_and_the_follower_keeps_doing_so_when_the_leader_dies(
    control_plane: ControlPlane,
    registration: Registration,
    injected_namespace: str,
    tmp_path: Path,
) -> None:
    """Two `outbound-operator --leader-elect` processes with the webhook on: the follower serves the
    webhook too, with the certificate the caBundle trusts. The API server is pointed at the follower and
    the leader is killed: Pods keep being injected."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    admission = client.AdmissionregistrationV1Api(registration.api)

    def replica(identity: str, port: int) -> OperatorProcess:
        return OperatorProcess(
            control_plane.kubeconfig,
            [injected_namespace],
            tmp_path / f"operator-{identity}.log",
            f"--webhook-port={port}",
            "--webhook-host=127.0.0.1",
            f"--webhook-namespace={registration.operator_namespace}",
            f"--webhook-configuration={registration.configuration}",
            "--webhook-cert-ip-address=127.0.0.1",
            f"--webhook-cert-secret={SECRET}",
            "--leader-elect",
            f"--lease-namespace={registration.operator_namespace}",
            f"--lease-identity={identity}",
            "--lease-duration=3",
        )

    def holder() -> str:
        lease = call_json(
            client.CoordinationV1Api(registration.api).read_namespaced_lease,
            "outbound-operator",
            registration.operator_namespace,
        )
        return str(lease["spec"].get("holderIdentity") or "")

    leader = replica("replica-a", registration.port)
    try:
        wait_for(lambda: holder() == "replica-a", 30, "replica-a leads")
        follower_port = free_port()
        follower = replica("replica-b", follower_port)
        try:
            registration.wait_until_injecting(injected_namespace)  # through the leader
            bundle = published(registration)
            served = served_certificate(registration.port, bundle)
            assert served is not None and served_certificate(follower_port, bundle) == served
            # The API server now calls the follower only.
            url = f"https://127.0.0.1:{follower_port}{MUTATE_PATH}"
            admission.patch_mutating_webhook_configuration(
                registration.configuration,
                [{"op": "replace", "path": "/webhooks/0/clientConfig/url", "value": url}],
            )
            leader.proc.send_signal(signal.SIGKILL)
            leader.proc.wait()
            stored = create_pod(registration.api, injected_namespace, make_pod("mailer", OPT_IN))
            assert "outbound-relay" in [c["name"] for c in stored["spec"].get("initContainers", ())]
            wait_for(lambda: holder() == "replica-b", 15, "replica-b leads")
            assert published(registration) == bundle  # the new leader re-asserts the same caBundle
        finally:
            follower.stop()
            print(follower.logs()[-10000:])
    finally:
        leader.stop()
        print(leader.logs()[-10000:])
