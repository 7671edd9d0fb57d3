"""The operator's admission webhooks: the mutating one that injects the relay sidecar (POST /mutate-pods)
and the validating one that checks who may name which Secret in an OutboundAuthPolicy (POST
/validate-policies, policy_admission.py), served by the operator process.

An aiohttp HTTPS server (not kopf's `@kopf.on.mutate`: kopf's managed MutatingWebhookConfiguration has no
namespace selector, and its server cannot swap its certificate while running). The chart writes the
MutatingWebhookConfiguration (namespaceSelector on the `outboundrelay.io/inject: enabled` label, never
kube-system nor the operator's namespace, failurePolicy Ignore, sideEffects None, 5 s timeout); this
module answers AdmissionReviews, and keeps the configuration's caBundle in sync (webhook_certs.py).

The operator's CLI enables it with three calls (docs/helm.md):

    webhook.add_arguments(parser)                       # --webhook-* options
    settings = webhook.settings_from_args(args)          # None unless --webhook-port was given
    if settings:
        webhook.register(settings, registry, api=api_client)  # kopf startup/cleanup run the server

Answers never depend on anything but the request: no side effects, so dry-run requests are answered as
any other, and a Pod admitted twice is patched once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import kopf
from aiohttp import web
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from outbound_operator.injection import (
    InjectionError,
    InjectionSettings,
    injection_patch,
    is_injected,
    wants_injection,
)
from outbound_operator.kubeapi import load_api_client
from outbound_operator.metrics import OperatorMetrics, Webhook, WebhookResult
from outbound_operator.policy_admission import (
    VALIDATE_POLICIES_PATH,
    ReviewCheckError,
    access_review,
    review_policy,
)
from outbound_operator.webhook_certs import (
    FileCertificates,
    RotationSettings,
    SelfManagedCertificates,
    SharedCertificates,
    server_context,
    service_dns_names,
)

log = logging.getLogger("outbound_operator.webhook")

MUTATE_PATH: Final = "/mutate-pods"
HEALTH_PATH: Final = "/healthz"
SAR_TIMEOUT_S: Final = 5.0  # a SubjectAccessReview that takes longer fails the policy check closed
ALWAYS_EXCLUDED: Final = ("kube-system",)


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    host: str = "0.0.0.0"
    """Address the HTTPS server binds; default all interfaces (the Service targets the Pod IP)."""
    port: int = 9443
    """HTTPS port; the chart's webhook Service targets it by the name `webhook`."""
    namespace: str = "outbound-relay-system"
    """The operator's own namespace: never injected, and where the webhook Service lives."""
    service: str = "outbound-relay-webhook"
    """The webhook Service's name; with `namespace`, the DNS names of the serving certificate."""
    configuration: str = "outbound-relay"
    """MutatingWebhookConfiguration whose caBundle the operator keeps (self-managed certificates)."""
    excluded_namespaces: tuple[str, ...] = ("kube-system",)
    """Namespaces never injected, whatever their labels (the operator's own is always added)."""
    cert_dir: Path | None = None
    """Directory with tls.crt/tls.key (cert-manager); None: the operator makes and rotates its own."""
    cert_secret: str | None = None
    """Self-managed certificates shared by the replicas through this Secret (kubernetes.io/tls) in
    `namespace`; None: this process's own, in memory only (one replica)."""
    extra_ip_addresses: tuple[str, ...] = ()
    """IP SANs of the self-managed certificate, e.g. 127.0.0.1 for a webhook reached by `url`."""
    rotation: RotationSettings = field(default_factory=RotationSettings)
    """When the self-managed certificate is rotated."""
    injection: InjectionSettings = field(default_factory=InjectionSettings)
    """What the sidecar looks like."""

    @property
    def never_injected(self) -> frozenset[str]:
        return frozenset((*ALWAYS_EXCLUDED, *self.excluded_namespaces, self.namespace))


def _allowed(uid: str, **extra: Any) -> dict[str, Any]:
    return {"uid": uid, "allowed": True, **extra}


def admission_response(review: Mapping[str, Any], settings: WebhookSettings) -> dict[str, Any]:
    """The AdmissionReview (admission.k8s.io/v1) to send back for `review`; pure."""
    request = review.get("request") or {}
    uid = str(request.get("uid", ""))
    response: dict[str, Any]
    pod = request.get("object") or {}
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or ""
    kind = (request.get("kind") or {}).get("kind")
    if kind != "Pod" or request.get("operation") != "CREATE" or request.get("subResource"):
        response = _allowed(uid)
    elif namespace in settings.never_injected:
        response = _allowed(uid)
        if wants_injection(pod):
            response["warnings"] = [f"outbound-relay: no sidecar in namespace {namespace}, by policy"]
    else:
        try:
            patch = injection_patch(pod, settings.injection)
        except InjectionError as error:
            response = {
                "uid": uid,
                "allowed": False,
                "status": {"code": 422, "message": f"outbound-relay: {error}"},
            }
        else:
            response = _allowed(uid)
            if patch:
                response |= {
                    "patchType": "JSONPatch",
                    "patch": base64.b64encode(json.dumps(patch).encode()).decode(),
                }
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


MAX_REVIEW_BYTES: Final = 8 * 1024 * 1024
"""Largest AdmissionReview body read: an object and its old version (the API server refuses requests over
3 MiB) plus the review's own fields. aiohttp refuses a longer body with 413 before anything is parsed."""


class BadReviewError(ValueError):
    """The body is not an AdmissionReview as the API server sends one; the message says what is wrong."""


_REQUEST_FIELDS: Final[dict[str, tuple[tuple[type, ...], str]]] = {
    "kind": ((dict,), "an object"),
    "resource": ((dict,), "an object"),
    "operation": ((str,), "a string"),
    "namespace": ((str,), "a string"),
    "name": ((str,), "a string"),
    "subResource": ((str,), "a string"),
    "object": ((dict, type(None)), "an object or null"),
    "oldObject": ((dict, type(None)), "an object or null"),
    "userInfo": ((dict,), "an object"),
    "dryRun": ((bool,), "true or false"),
}


def parse_review(body: bytes) -> dict[str, Any]:
    """An AdmissionReview from a request body, its request's fields checked for type (the ones the
    webhook reads); raises BadReviewError naming the first thing wrong."""
    try:
        review = json.loads(body)
    except (ValueError, RecursionError) as error:  # RecursionError: nesting deeper than the parser goes
        raise BadReviewError(f"the body is not JSON ({type(error).__name__})") from None
    if not isinstance(review, dict):
        raise BadReviewError(f"expected an AdmissionReview object, got a JSON {type(review).__name__}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise BadReviewError("AdmissionReview.request is missing or not an object")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise BadReviewError("AdmissionReview.request.uid is missing or not a string")
    for key, (types, wanted) in _REQUEST_FIELDS.items():
        if key in request and not isinstance(request[key], types):
            raise BadReviewError(f"AdmissionReview.request.{key} is not {wanted}")
    for key in ("object", "oldObject"):
        if isinstance(request.get(key), dict):
            for part in ("metadata", "spec"):
                if not isinstance(request[key].get(part, {}), dict):
                    raise BadReviewError(f"AdmissionReview.request.{key}.{part} is not an object")
    return review


def _describe(review: Mapping[str, Any]) -> str:
    request = review.get("request") or {}
    meta = (request.get("object") or {}).get("metadata") or {}
    name = request.get("name") or meta.get("name") or f"{meta.get('generateName', '')}*"
    return f"{request.get('namespace', '')}/{name}"


class WebhookUnhealthyError(RuntimeError):
    """The webhook cannot serve, or will not be able to (its certificate upkeep died)."""


def _upkeep_ended(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    log.error(
        "webhook certificate upkeep stopped (%s); liveness fails from now on",
        f"{type(error).__name__}: {error}" if error else "returned",
    )


class WebhookServer:
    """The HTTPS server: POST /mutate-pods and /validate-policies (AdmissionReview), GET /healthz. A body
    that is not an AdmissionReview is answered 400 with the reason, one too large 413."""

    def __init__(
        self,
        settings: WebhookSettings,
        context: ssl.SSLContext,
        api: client.ApiClient | None = None,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.context = context
        self.api = api
        """For the SubjectAccessReviews of the policy check (default: loaded at the first one)."""
        self.metrics = metrics
        """outbound_operator_webhook_requests_total is counted here (None: not counted)."""
        self.reviews = 0
        """AdmissionReviews answered so far (tests use it to show who never called)."""
        self.injected = 0
        self.refused_policies = 0
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._handlers: set[web.RequestHandler] = set()
        self.port: int | None = None
        self.certificates: SelfManagedCertificates | FileCertificates | None = None
        self.upkeep: asyncio.Task[None] | None = None
        """The certificate upkeep task (serve() starts it): it must run as long as the server does."""

    def health(self) -> dict[str, Any]:
        """For the operator's liveness probe (register()); raises WebhookUnhealthyError when the server no
        longer listens or the certificate upkeep has stopped (the certificate would expire unrenewed, or
        cert-manager's renewals never be loaded): a restart is the cure."""
        if self._listener is None or not self._listener.is_serving():
            raise WebhookUnhealthyError("the webhook's HTTPS server is not listening")
        if self.upkeep is not None and self.upkeep.done():
            raise WebhookUnhealthyError("the webhook's certificate upkeep has stopped")
        return {"reviews": self.reviews, "injected": self.injected}

    async def _read_review(self, request: web.Request) -> dict[str, Any]:
        """The AdmissionReview of `request`: the body is read up to MAX_REVIEW_BYTES (413 beyond), then
        parsed in a worker thread, so a large or deeply nested body never holds up the event loop that
        runs the operator's watches. Raises BadReviewError (answered 400)."""
        body = await request.read()
        return await asyncio.to_thread(parse_review, body)

    def _count(self, webhook: Webhook, response: Mapping[str, Any] | None) -> None:
        """One answered request: `response` is the AdmissionReview's response, None for a 400."""
        if self.metrics is None:
            return
        if response is None:
            result = WebhookResult.INVALID
        elif response["allowed"]:
            result = WebhookResult.ALLOWED
        elif response["status"]["code"] >= 500:  # the policy check could not decide (fails closed)
            result = WebhookResult.ERROR
        else:
            result = WebhookResult.DENIED
        self.metrics.webhook_requests.labels(webhook=webhook.value, result=result.value).inc()

    def _bad_request(self, webhook: Webhook, error: Exception) -> web.Response:
        log.warning("bad AdmissionReview refused: %s", error)
        self._count(webhook, None)
        return web.json_response({"error": f"expected an AdmissionReview: {error}"}, status=400)

    async def _mutate(self, request: web.Request) -> web.Response:
        try:
            review = await self._read_review(request)
            answer = admission_response(review, self.settings)
        except BadReviewError as error:
            return self._bad_request(Webhook.MUTATE_PODS, error)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError) as error:
            # A Pod of a shape the API server never sends (the request's fields were checked above).
            return self._bad_request(
                Webhook.MUTATE_PODS,
                BadReviewError(f"the Pod is malformed ({type(error).__name__}: {error})"),
            )
        self.reviews += 1
        response = answer["response"]
        self._count(Webhook.MUTATE_PODS, response)
        if "patch" in response:
            self.injected += 1
            dry = " (dry run)" if (review.get("request") or {}).get("dryRun") else ""
            log.info("[%s] relay sidecar injected%s", _describe(review), dry)
        elif not response["allowed"]:
            log.warning("[%s] refused: %s", _describe(review), response["status"]["message"])
        elif is_injected((review.get("request") or {}).get("object") or {}):
            log.debug("[%s] has the sidecar already", _describe(review))
        return web.json_response(answer)

    async def _validate_policy(self, request: web.Request) -> web.Response:
        try:
            review = await self._read_review(request)
            response = await review_policy(review["request"], self._may_get)
        except BadReviewError as error:
            return self._bad_request(Webhook.VALIDATE_POLICIES, error)
        except (AttributeError, TypeError, KeyError, IndexError, ValueError) as error:
            malformed = f"the request is malformed ({type(error).__name__}: {error})"
            return self._bad_request(Webhook.VALIDATE_POLICIES, BadReviewError(malformed))
        self.reviews += 1
        self._count(Webhook.VALIDATE_POLICIES, response)
        if not response["allowed"]:
            self.refused_policies += 1
            log.warning("policy refused: %s", response["status"]["message"])
        return web.json_response(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        )

    async def _may_get(self, user_info: Mapping[str, Any], namespace: str, name: str) -> bool:
        """A SubjectAccessReview (the operator's RBAC: create subjectaccessreviews)."""
        body = access_review(user_info, namespace, name)

        def call() -> bool:
            if self.api is None:  # in-cluster, else $KUBECONFIG; injection alone never needs it
                self.api = load_api_client()
            authorization = client.AuthorizationV1Api(self.api)
            try:
                # Bounded: a hung API server must not hold the threads that also parse injection reviews.
                response: Any = authorization.create_subject_access_review(
                    cast(Any, body), _preload_content=False, _request_timeout=SAR_TIMEOUT_S
                )
            except ApiException as error:
                raise ReviewCheckError(f"SubjectAccessReview: {error.status} {error.reason}") from None
            except Exception as error:  # timed out or connection lost: the check fails closed
                raise ReviewCheckError(f"SubjectAccessReview: {type(error).__name__}") from None
            status = json.loads(response.data).get("status") or {}
            return status.get("allowed") is True and not status.get("denied")

        return await asyncio.to_thread(call)

    async def _health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post(MUTATE_PATH, self._mutate)
        app.router.add_post(VALIDATE_POLICIES_PATH, self._validate_policy)
        app.router.add_get(HEALTH_PATH, self._health)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        server = self._runner.server
        assert server is not None

        def connection() -> asyncio.BaseProtocol:
            handler = server()
            # aiohttp's handlers take no weak references: forget the closed ones now and then (a handler in
            # its TLS handshake has no transport yet either, hence not at every connection).
            if len(self._handlers) >= 64:
                self._handlers = {h for h in self._handlers if h.transport is not None}
            self._handlers.add(handler)
            return handler

        # Our own socket, so that port 0 (tests) tells which port it got.
        sock = socket.create_server((self.settings.host, self.settings.port))
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(connection, sock=sock, ssl=self.context)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
        # aiohttp forgets a connection's transport when it closes it, but a TLS close waits for the peer's
        # close_notify, which the API server's idle connections may not send before our loop ends (leaving
        # their sockets open): keep the transports to cut what is left afterwards.
        transports = [h.transport for h in self._handlers if h.transport is not None]
        if self._runner is not None:
            await self._runner.cleanup()  # lets requests in flight finish, closes idle keep-alives
            self._runner = None
        for transport in transports:
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self._handlers.clear()
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None


@contextlib.asynccontextmanager
async def serve(
    settings: WebhookSettings,
    api: client.ApiClient | None = None,
    metrics: OperatorMetrics | None = None,
    may_write: Callable[[], bool] = lambda: True,
) -> AsyncIterator[WebhookServer]:
    """Run the webhook (server and certificate upkeep) for the duration of the `async with`; answered
    requests are counted in `metrics` when given. With shared certificates, only while `may_write` (the
    leader) are they rotated and their caBundle published."""
    context = server_context()
    certificates: SelfManagedCertificates | FileCertificates
    if settings.cert_dir is not None:
        certificates = FileCertificates(
            context=context, directory=settings.cert_dir, check_interval=settings.rotation.check_interval
        )
    elif settings.cert_secret is not None:
        certificates = SharedCertificates(
            secret=settings.cert_secret,
            namespace=settings.namespace,
            may_write=may_write,
            context=context,
            api=api or load_api_client(),
            configuration=settings.configuration,
            dns_names=service_dns_names(settings.service, settings.namespace),
            ip_addresses=settings.extra_ip_addresses,
            rotation=settings.rotation,
        )
    else:
        certificates = SelfManagedCertificates(
            context=context,
            api=api or load_api_client(),
            configuration=settings.configuration,
            dns_names=service_dns_names(settings.service, settings.namespace),
            ip_addresses=settings.extra_ip_addresses,
            rotation=settings.rotation,
        )
    await certificates.start()
    server = WebhookServer(settings, context, api, metrics)
    server.certificates = certificates
    await server.start()
    upkeep = asyncio.create_task(certificates.run(), name="outbound-relay webhook certificates")
    upkeep.add_done_callback(_upkeep_ended)
    server.upkeep = upkeep
    try:
        yield server
    finally:
        upkeep.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await upkeep
        await server.stop()


def register(
    settings: WebhookSettings,
    registry: kopf.OperatorRegistry | None = None,
    *,
    api: client.ApiClient | None = None,
    metrics: OperatorMetrics | None = None,
    may_write: Callable[[], bool] = lambda: True,
) -> None:
    """Run the webhook inside a kopf operator: started by an on.startup handler (before any watch
    begins), stopped by an on.cleanup handler. `api` patches the caBundle (default: in-cluster config,
    else $KUBECONFIG); `metrics` counts the answered requests."""
    stack = contextlib.AsyncExitStack()
    running: list[WebhookServer] = []

    @kopf.on.startup(registry=registry)
    async def start_outbound_relay_webhook(**_: Any) -> None:
        running.append(await stack.enter_async_context(serve(settings, api, metrics, may_write)))

    @kopf.on.probe(id="webhook", registry=registry)
    def outbound_relay_webhook_health(**_: Any) -> dict[str, Any]:
        """Part of the operator's /healthz: a webhook that stopped serving (or renewing) fails liveness."""
        if not running:
            return {"starting": True}
        try:
            return running[-1].health()
        except WebhookUnhealthyError as error:
            raise kopf.PermanentError(str(error)) from None

    @kopf.on.cleanup(registry=registry)
    async def stop_outbound_relay_webhook(**_: Any) -> None:
        running.clear()
        await stack.aclose()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --webhook-* options of `outbound-operator` (the chart passes them)."""
    group = parser.add_argument_group("admission webhook (sidecar injection)")
    group.add_argument("--webhook-port", type=int, help="serve the webhook on this HTTPS port (off if unset)")
    group.add_argument("--webhook-host", default="0.0.0.0", help="address to bind (0.0.0.0)")
    group.add_argument(
        "--webhook-namespace",
        default=os.environ.get("POD_NAMESPACE", "outbound-relay-system"),
        help="the operator's namespace: never injected; the webhook Service's (env POD_NAMESPACE)",
    )
    group.add_argument(
        "--webhook-service", default="outbound-relay-webhook", help="the webhook Service's name"
    )
    group.add_argument(
        "--webhook-configuration",
        default="outbound-relay",
        help="MutatingWebhookConfiguration to keep the caBundle of",
    )
    group.add_argument(
        "--webhook-exclude-namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="never inject here (repeatable; kube-system and the operator's namespace always)",
    )
    group.add_argument(
        "--webhook-cert-dir", type=Path, help="tls.crt/tls.key from cert-manager (else self-managed)"
    )
    group.add_argument(
        "--webhook-cert-secret",
        metavar="NAME",
        help="self-managed certificate shared by all replicas through this Secret of the webhook namespace "
        "(created by the first replica); else each process keeps its own in memory (one replica only)",
    )
    group.add_argument(
        "--webhook-sidecar-config",
        type=Path,
        help="sidecar.yaml: image, resources, ... (the chart's relay: values)",
    )
    group.add_argument(
        "--webhook-cert-ip-address",
        action="append",
        default=[],
        metavar="IP",
        help="also valid for this IP (repeatable): a webhook the API server reaches by URL, in development",
    )
    group.add_argument(
        "--webhook-cert-validity-days",
        type=float,
        default=365.0,
        help="self-managed certificate lifetime (365)",
    )


def settings_from_args(args: argparse.Namespace) -> WebhookSettings | None:
    """WebhookSettings from the parsed options; None when --webhook-port was not given (webhook off).
    Raises ValueError for an unreadable or invalid --webhook-sidecar-config."""
    if args.webhook_port is None:
        return None
    injection = (
        InjectionSettings.load(args.webhook_sidecar_config)
        if args.webhook_sidecar_config
        else InjectionSettings()
    )
    validity = datetime.timedelta(days=args.webhook_cert_validity_days)
    return WebhookSettings(
        host=args.webhook_host,
        port=args.webhook_port,
        namespace=args.webhook_namespace,
        service=args.webhook_service,
        configuration=args.webhook_configuration,
        excluded_namespaces=tuple(args.webhook_exclude_namespace),
        cert_dir=args.webhook_cert_dir,
        cert_secret=args.webhook_cert_secret,
        extra_ip_addresses=tuple(args.webhook_cert_ip_address),
        rotation=RotationSettings(validity=validity, renew_before=validity / 12),
        injection=injection,
    )


def parse_settings(argv: Sequence[str]) -> WebhookSettings | None:
    """settings_from_args for a bare argv (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="outbound-operator")
    add_arguments(parser)
    return settings_from_args(parser.parse_args(argv))
