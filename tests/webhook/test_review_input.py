"""The webhook server on bad input: anything that is not an AdmissionReview as the API server sends one is
answered 400 with the reason (never 500), a body over the cap 413 before it is parsed, and parsing runs
off the event loop. The real server on loopback over TLS, called with aiohttp."""

from __future__ import annotations

import io
import json
import ssl
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbound_operator import webhook as webhook_module
from outbound_operator.policy_admission import VALIDATE_POLICIES_PATH
from outbound_operator.webhook import (
    MAX_REVIEW_BYTES,
    MUTATE_PATH,
    BadReviewError,
    WebhookServer,
    WebhookSettings,
    parse_review,
    serve,
)
from outbound_operator.webhook_certs import generate_certificates

PATHS = (MUTATE_PATH, VALIDATE_POLICIES_PATH)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=12,
)
REQUEST_KEYS = ["uid", "kind", "operation", "namespace", "name", "object", "oldObject", "userInfo", "dryRun"]
# Review-like documents: the right keys with values of any JSON type, so that the checks are reached.
review_like = st.fixed_dictionaries(
    {
        "apiVersion": st.just("admission.k8s.io/v1"),
        "kind": st.just("AdmissionReview"),
        "request": st.dictionaries(st.sampled_from(REQUEST_KEYS), json_values, max_size=6)
        | st.fixed_dictionaries(
            {
                "uid": st.just("u1"),
                "kind": st.sampled_from([{"kind": "Pod"}, {"kind": "OutboundAuthPolicy"}]),
                "operation": st.sampled_from(["CREATE", "UPDATE"]),
                "namespace": st.just("mail"),
                "object": st.dictionaries(st.sampled_from(["metadata", "spec"]), json_values, max_size=2),
                "oldObject": json_values,
                "userInfo": st.dictionaries(
                    st.sampled_from(["username", "groups", "uid", "extra"]), json_values, max_size=4
                ),
            }
        ),
    }
)


class Caller:
    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.port = port

    async def post(self, path: str, body: bytes) -> tuple[int, str]:
        url = f"https://127.0.0.1:{self.port}{path}"
        headers = {"Content-Type": "application/json"}
        async with self.session.post(url, data=io.BytesIO(body), headers=headers) as response:
            return response.status, await response.text()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[WebhookServer]:
    pair = generate_certificates([], ["127.0.0.1"])
    (tmp_path / "tls.crt").write_bytes(pair.cert_pem)
    (tmp_path / "tls.key").write_bytes(pair.key_pem)
    (tmp_path / "ca.crt").write_bytes(pair.ca_pem)
    async with serve(WebhookSettings(host="127.0.0.1", port=0, cert_dir=tmp_path)) as running:
        yield running


@pytest.fixture
async def caller(server: WebhookServer, tmp_path: Path) -> AsyncIterator[Caller]:
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        assert server.port is not None
        yield Caller(session, server.port)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"[]", "got a JSON list"),
        (b'"x"', "got a JSON str"),
        (b"{}", "request is missing or not an object"),
        (b'{"request": "x"}', "request is missing or not an object"),
        (b'{"request": {}}', "request.uid is missing"),
        (b'{"request": {"uid": 7}}', "request.uid is missing"),
        (b'{"request": {"uid": "u", "kind": "Pod"}}', "request.kind is not an object"),
        (b'{"request": {"uid": "u", "object": []}}', "request.object is not an object or null"),
        (b'{"request": {"uid": "u", "userInfo": "root"}}', "request.userInfo is not an object"),
        (
            b'{"request": {"uid": "u", "object": {"metadata": []}}}',
            "request.object.metadata is not an object",
        ),
        (b'{"request": {"uid": "u", "object": {"spec": 1}}}', "request.object.spec is not an object"),
        (b"[" * 100_000, "not JSON"),
    ],
)
async def test_bad_bodies_get_400_with_the_reason(
    caller: Caller, path: str, body: bytes, reason: str
) -> None:
    status, text = await caller.post(path, body)
    assert status == 400
    assert reason in json.loads(text)["error"]


async def test_a_body_over_the_cap_is_refused_before_parsing(
    caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    original = webhook_module.parse_review

    def spy(body: bytes) -> dict[str, Any]:
        parsed.append(len(body))
        return original(body)

    monkeypatch.setattr(webhook_module, "parse_review", spy)
    status, _ = await caller.post(MUTATE_PATH, b" " * (MAX_REVIEW_BYTES + 1))
    assert status == 413
    assert parsed == []


async def test_parsing_runs_off_the_event_loop(caller: Caller, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    original = webhook_module.parse_review

    def spy(body: bytes) -> dict[str, Any]:
        threads.append(threading.current_thread())
        return original(body)

    monkeypatch.setattr(webhook_module, "parse_review", spy)
    review = {"request": {"uid": "u", "kind": {"kind": "Secret"}, "operation": "CREATE"}}
    for path in PATHS:
        status, text = await caller.post(path, json.dumps(review).encode())
        assert status == 200 and json.loads(text)["response"] == {"uid": "u", "allowed": True}
    assert len(threads) == 2
    assert all(thread is not threading.main_thread() for thread in threads)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=json_values | review_like)
async def test_any_json_is_answered_200_or_400_never_500(caller: Caller, document: Any) -> None:
    for path in PATHS:
        status, text = await caller.post(path, json.dumps(document).encode())
        assert status in (200, 400), text
        if status == 200:
            assert json.loads(text)["response"]["uid"] == document["request"]["uid"]


@settings(deadline=None)
@given(document=json_values | review_like)
def test_parse_review_accepts_or_says_why(document: Any) -> None:
    try:
        review = parse_review(json.dumps(document).encode())
    except BadReviewError as error:
        reason = str(error)
    else:
        reason = ""
        assert isinstance(review["request"]["uid"], str)
    assert reason or isinstance(document, dict)
