"""outbound_operator_webhook_requests_total: every request the webhook answers is counted once, by webhook
and result. The real server on loopback over TLS, called with aiohttp; the policy check's failure is a real
one (its SubjectAccessReview goes to a port where nothing listens)."""

from __future__ import annotations

import io
import json
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client

from outbound_operator.metrics import OperatorMetrics, Webhook, WebhookResult
from outbound_operator.policy_admission import VALIDATE_POLICIES_PATH
from outbound_operator.webhook import MUTATE_PATH, WebhookSettings, serve
from outbound_operator.webhook_certs import generate_certificates

USER = {"username": "alice", "groups": ["system:authenticated"]}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # closed again: connections are refused


def _pod(annotations: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mailer", "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "busybox:1.37"}]},
    }


def _review(kind: str, obj: dict[str, Any]) -> bytes:
    request = {"uid": "u1", "kind": {"kind": kind}, "operation": "CREATE", "namespace": "mail"}
    request |= {"object": obj, "userInfo": USER}
    return json.dumps(
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}
    ).encode()


def _policy(secret: str) -> dict[str, Any]:
    return {
        "apiVersion": "outboundrelay.io/v1alpha1",
        "kind": "OutboundAuthPolicy",
        "metadata": {"name": "sparkpost", "namespace": "mail"},
        "spec": {
            "scope": {"domain": "sparkpost.com"},
            "type": "PLAIN",
            "user": "sparkpost",
            "passwordSecretRef": {"name": secret, "key": "password"},
            "gateway": {"host": "smtp.sparkpost.com", "port": 587},
        },
    }


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[OperatorMetrics, aiohttp.ClientSession, int]]:
    pair = generate_certificates([], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    (tmp_path / "ca.crt").write_bytes(pair.ca_pem)
    configuration = client.Configuration()
    configuration.host = f"https://127.0.0.1:{_closed_port()}"
    metrics = OperatorMetrics()
    settings = WebhookSettings(host="127.0.0.1", port=0, cert_dir=tmp_path)
    with client.ApiClient(configuration) as unreachable:
        async with serve(settings, unreachable, metrics) as server:
            context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
                assert server.port is not None
                yield metrics, session, server.port


def _counts(metrics: OperatorMetrics) -> dict[tuple[str, str], float]:
    counts = {}
    for webhook in Webhook:
        for result in WebhookResult:
            labels = {"webhook": webhook.value, "result": result.value}
            value = metrics.registry.get_sample_value("outbound_operator_webhook_requests_total", labels)
            assert value is not None, labels  # every series exists from the start, at 0
            counts[webhook.value, result.value] = value
    return counts


async def test_each_answer_is_counted_by_webhook_and_result(
    running: tuple[OperatorMetrics, aiohttp.ClientSession, int],
) -> None:
    metrics, session, port = running
    assert set(_counts(metrics).values()) == {0.0}
    calls = [
        (MUTATE_PATH, _review("Pod", _pod({"outboundrelay.io/inject": "true"})), 200),  # injected
        (MUTATE_PATH, _review("Pod", _pod({})), 200),  # not opted in: allowed unchanged
        (MUTATE_PATH, _review("Pod", _pod({"outboundrelay.io/inject": "true",
                                           "outboundrelay.io/binding": "bulk mail!"})), 200),
        (MUTATE_PATH, b"{", 400),
        (VALIDATE_POLICIES_PATH, _review("OutboundAuthPolicy", _policy("outbound-relay-config")), 200),
        (VALIDATE_POLICIES_PATH, _review("OutboundAuthPolicy", _policy("sparkpost-smtp")), 200),
        (VALIDATE_POLICIES_PATH, b"[]", 400),
        (VALIDATE_POLICIES_PATH, b"[]", 400),
    ]  # fmt: skip
    for path, body, status in calls:
        headers = {"Content-Type": "application/json"}
        url = f"https://127.0.0.1:{port}{path}"
        async with session.post(url, data=io.BytesIO(body), headers=headers) as response:
            assert response.status == status, await response.text()
    assert _counts(metrics) == {
        ("mutate-pods", "allowed"): 2,
        ("mutate-pods", "denied"): 1,  # the bad binding annotation: 422
        ("mutate-pods", "error"): 0,
        ("mutate-pods", "invalid"): 1,
        ("validate-policies", "allowed"): 0,
        ("validate-policies", "denied"): 1,  # names the rendered Secret: 403, no access review needed
        ("validate-policies", "error"): 1,  # the SubjectAccessReview's connection was refused: 500
        ("validate-policies", "invalid"): 2,
    }
