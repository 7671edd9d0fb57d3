"""End to end with OAuth2: an OutboundAuthPolicy with `oauth2` and its Secret in, the relay started from
the rendered Secret gets access tokens from a real Ory Hydra (client_credentials) and delivers to Dovecot,
which accepts a token only while Hydra's introspection calls it active."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from outbound_operator.resources import RENDERED_SECRET
from tests.integration.conftest import require_go
from tests.operator.cluster import Objects
from tests.operator.conftest import StartOperator
from tests.operator.kubelet import projected_secret
from tests.operator.test_operator_delivery import relay_on
from tests.peers import DovecotSubmission, TLSFiles, make_tls_files, require_binaries, shared_workdir
from tests.peers.dovecot import DOVECOT
from tests.peers.hydra import Hydra
from tests.support.relay import message, submit

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def peers() -> Iterator[tuple[Hydra, DovecotSubmission, TLSFiles]]:
    require_go()
    require_binaries("Dovecot submission (dovecot-core, dovecot-submissiond)", DOVECOT)
    with shared_workdir() as workdir:
        ca = make_tls_files(workdir / "tls")
        with (
            Hydra(workdir, ca, access_token_ttl=600) as hydra,
            DovecotSubmission(workdir, ca, oauth2_introspection_url=hydra.introspection_url) as dovecot,
        ):
            yield hydra, dovecot, ca


async def test_rendered_oauth2_policy_gets_tokens_from_hydra_and_delivers(
    objects: Objects,
    start_operator: StartOperator,
    k8s_client: client.ApiClient,
    peers: tuple[Hydra, DovecotSubmission, TLSFiles],
    tmp_path: Path,
) -> None:
    hydra, dovecot, ca = peers
    app = hydra.create_client()
    ca_pem = ca.ca_file.read_bytes()
    objects.put_secret("hydra-oauth2", {"client-id": app.id, "client-secret": app.secret + "\n"})
    objects.put_secret("test-ca", {"ca.crt": ca_pem})
    objects.apply_policy(
        "hydra",
        {
            "type": "XOAUTH2",
            "user": app.id,  # client_credentials: the token's subject is the client
            "oauth2": {
                "tokenURL": hydra.token_url,
                "clientIdSecretRef": {"name": "hydra-oauth2", "key": "client-id"},
                "clientSecretSecretRef": {"name": "hydra-oauth2", "key": "client-secret"},
                "scopes": ["smtp"],
                "caSecretRef": {"name": "test-ca", "key": "ca.crt"},
            },
            "gateway": {"host": dovecot.host, "port": dovecot.port},
            "tls": {"mode": "starttls", "caSecretRef": {"name": "test-ca", "key": "ca.crt"}},
        },
    )
    operator = start_operator()
    await asyncio.to_thread(objects.wait_condition, "hydra", "Ready", "True")
    issued_before = hydra.issued()
    rcpt = f"r-{uuid.uuid4().hex[:12]}@oauth2.test"
    async with (
        projected_secret(k8s_client, objects.namespace, RENDERED_SECRET, tmp_path / "mount") as mount,
        relay_on(mount / "relay.yaml") as relay,
    ):
        outcome = await submit(relay.port, [rcpt], message("via hydra"))
        assert outcome.code == 250, outcome
        assert hydra.issued() > issued_before  # a token from Hydra, not from anywhere else
        (arrived,) = await dovecot.sink.wait_for_async(1, rcpt)
        assert arrived.rcpt_tos == (rcpt,)
    text = operator.logs() + operator.metrics() + str(objects.policy("hydra")["status"])
    text += str(objects.events("hydra"))
    assert app.secret not in text
