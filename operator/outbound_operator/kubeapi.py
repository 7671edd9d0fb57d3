"""The few Kubernetes API calls the operator makes, awaitable, with plain JSON in and out.

The `kubernetes` client is synchronous; each call runs in a worker thread so the event loop (and kopf's
watch streams) never waits on the network. Responses are read as JSON, not as the client's model
classes: listing a thousand objects stays cheap.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from outbound_operator.resources import GROUP, MANAGED_BY_LABEL, MANAGER, RENDERED_SECRET, VERSION

# At most this many API calls in flight from the operator: it is one client among many.
MAX_CONCURRENT_CALLS = 16


def read_or_none(method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """A read of the `kubernetes` client (blocking: call it in a thread), as its JSON body; None for 404."""
    try:
        response = method(*args, _preload_content=False, **kwargs)
    except ApiException as error:
        if error.status == 404:
            return None
        raise
    found: dict[str, Any] = json.loads(response.data)
    return found


class ConflictError(RuntimeError):
    """The object changed since it was read (HTTP 409); read it again and retry."""


class WatchExpiredError(RuntimeError):
    """The watch's resourceVersion is too old (410 Gone): list again, and assume events were missed."""


class WatchError(RuntimeError):
    """A watch could not start or broke (HTTP status, connection); retried after a pause."""


WATCH_SECONDS = 290
"""A watch request ends after this long (the API server's own limit is longer) and is resumed from the
last resourceVersion seen: a connection silently dropped by the network is never waited on forever."""


def load_api_client() -> client.ApiClient:
    """In-cluster service account when running in a Pod, else the kubeconfig ($KUBECONFIG)."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


def decode_secret_data(data: Mapping[str, str] | None) -> dict[str, bytes]:
    return {key: base64.b64decode(value) for key, value in (data or {}).items()}


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, kw_only=True)
class RenderedSecret:
    """The rendered Secret as it is in the cluster."""

    data: dict[str, bytes]
    owners: tuple[dict[str, Any], ...]
    labels: dict[str, str]
    resource_version: str
    annotations: dict[str, str] = field(default_factory=dict)


class KubeApi:
    def __init__(self, api: client.ApiClient, *, instance: str = MANAGER) -> None:
        self.api = api
        self.instance = instance
        """reportingInstance of the Events posted: which replica (its Lease identity) wrote them."""
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.rbac = client.RbacAuthorizationV1Api(api)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_CALLS)
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: Callable[..., Any], *args: Any, missing_ok: bool = True, **kwargs: Any
    ) -> Any:
        """Call in a thread; the JSON body of the response, or None for 404 (`missing_ok`; else it raises:
        a list that 404s means the resource type itself is unknown, never "there are none")."""

        def call() -> Any:
            try:
                response = method(*args, _preload_content=False, **kwargs)
            except ApiException as error:
                if error.status == 404 and missing_ok:
                    return None
                if error.status == 409:
                    raise ConflictError(f"{error.status} {error.reason}") from None
                raise
            return json.loads(response.data) if response.data else {}

        async with self._slots:
            return await asyncio.to_thread(call)

    async def list_custom(self, namespace: str, plural: str) -> list[dict[str, Any]]:
        """Every object of `plural` in `namespace`. A 404 (the CRD is not installed, or being uninstalled)
        raises ApiException: taken for "no policies", it would delete every rendered Secret."""
        found = await self._call(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural, missing_ok=False
        )
        return list(found.get("items") or [])

    async def read_secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self._call(self.core.read_namespaced_secret, name, namespace)
        return found

    async def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self._call(self.core.read_namespaced_config_map, name, namespace)
        return found

    async def list_secrets(self, namespace: str) -> list[dict[str, Any]]:
        found = await self._call(self.core.list_namespaced_secret, namespace, missing_ok=False)
        return list(found.get("items") or [])

    async def read_rendered(self, namespace: str) -> RenderedSecret | None:
        body = await self.read_secret(namespace, RENDERED_SECRET)
        if body is None:
            return None
        metadata = body.get("metadata") or {}
        return RenderedSecret(
            data=decode_secret_data(body.get("data")),
            owners=tuple(metadata.get("ownerReferences") or ()),
            labels=dict(metadata.get("labels") or {}),
            resource_version=str(metadata.get("resourceVersion", "")),
            annotations=dict(metadata.get("annotations") or {}),
        )

    async def write_rendered(
        self,
        namespace: str,
        *,
        data: Mapping[str, bytes],
        owners: tuple[dict[str, Any], ...],
        labels: Mapping[str, str],
        current: RenderedSecret | None,
        annotations: Mapping[str, str] | None = None,
    ) -> str:
        """Create the rendered Secret, or replace it if unchanged since `current` was read; returns the
        new resourceVersion."""
        metadata: dict[str, Any] = {
            "name": RENDERED_SECRET,
            "namespace": namespace,
            "labels": dict(labels),
            "annotations": dict(annotations or {}),
            "ownerReferences": list(owners),
        }
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata,
            "type": "Opaque",
            "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
        }
        if current is None:
            result = await self._call(
                self.core.create_namespaced_secret, namespace, body, field_manager=MANAGER
            )
        else:
            metadata["resourceVersion"] = current.resource_version
            result = await self._call(
                self.core.replace_namespaced_secret, RENDERED_SECRET, namespace, body, field_manager=MANAGER
            )
            if result is None:
                raise ConflictError(f"Secret {namespace}/{RENDERED_SECRET} was deleted while being replaced")
        return str(result["metadata"]["resourceVersion"])

    async def delete_rendered(self, namespace: str, current: RenderedSecret) -> None:
        options = {"preconditions": {"resourceVersion": current.resource_version}}
        await self._call(self.core.delete_namespaced_secret, RENDERED_SECRET, namespace, body=options)

    async def patch_status(self, plural: str, namespace: str, name: str, patch: Mapping[str, Any]) -> bool:
        """Merge-patch the status subresource; False if the object is gone."""
        result = await self._call(
            self.custom.patch_namespaced_custom_object_status,
            GROUP,
            VERSION,
            namespace,
            plural,
            name,
            dict(patch),
            field_manager=MANAGER,
            _content_type="application/merge-patch+json",
        )
        return result is not None

    async def post_event(self, involved: Mapping[str, str], *, type: str, reason: str, message: str) -> None:
        """A core/v1 Event on the object (what `kubectl describe` shows)."""
        now = now_rfc3339()
        namespace = involved["namespace"]
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved['name']}.", "namespace": namespace},
            "involvedObject": dict(involved),
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": MANAGER},
            "reportingComponent": MANAGER,
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(self.core.create_namespaced_event, namespace, body)

    async def list_version(self, namespace: str, resource: str = "secrets") -> str:
        """The resourceVersion of the namespace's Secrets (or ConfigMaps) as of now, read without their
        content (a list of at most one item): where a watch starts."""
        method = (
            self.core.list_namespaced_config_map
            if resource == "configmaps"
            else self.core.list_namespaced_secret
        )
        found = await self._call(method, namespace, limit=1, missing_ok=False)
        return str(found["metadata"]["resourceVersion"])

    def _watch_session(self) -> aiohttp.ClientSession:
        """An aiohttp session with the client's credentials: a watch is a long request, which would hold a
        worker thread for its whole life if made with the synchronous client."""
        if self._session is None:
            settings = self.api.configuration
            context = ssl.create_default_context(cafile=settings.ssl_ca_cert)
            if not settings.verify_ssl:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if settings.cert_file:
                context.load_cert_chain(settings.cert_file, settings.key_file)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context), timeout=aiohttp.ClientTimeout(sock_connect=10)
            )
        return self._session

    def _auth_headers(self) -> dict[str, str]:
        headers = {}
        for setting in self.api.configuration.auth_settings().values():  # a refreshed token in a Pod
            if setting.get("in") == "header" and setting.get("value"):
                headers[str(setting["key"])] = str(setting["value"])
        return headers

    async def watch_secrets(
        self, namespace: str, resource_version: str, resource: str = "secrets"
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """(type, Secret) for each change in `namespace` after `resource_version`, until the request ends
        (WATCH_SECONDS); BOOKMARK events carry only the resourceVersion to resume from. Raises
        WatchExpiredError for 410 Gone, WatchError for anything else that ends it early. `resource`
        "configmaps": the same for ConfigMaps."""
        what = "ConfigMaps" if resource == "configmaps" else "Secrets"
        url = f"{self.api.configuration.host}/api/v1/namespaces/{namespace}/{resource}"
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        session = self._watch_session()
        try:
            async with session.get(
                url,
                params=params,
                headers=self._auth_headers(),
                timeout=aiohttp.ClientTimeout(total=WATCH_SECONDS + 30, sock_connect=10),
            ) as response:
                if response.status == 410:
                    raise WatchExpiredError(f"watch of {what} in {namespace}: 410 Gone")
                if response.status != 200:
                    raise WatchError(
                        f"watch of {what} in {namespace}: HTTP {response.status} {response.reason}"
                    )
                async for line in response.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, body = str(event.get("type")), event.get("object") or {}
                    if kind == "ERROR":
                        if body.get("code") == 410:
                            raise WatchExpiredError(f"watch of {what} in {namespace}: 410 Gone")
                        raise WatchError(
                            f"watch of {what} in {namespace}: {body.get('code')} {body.get('reason')}"
                        )
                    yield kind, body
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            raise WatchError(f"watch of {what} in {namespace}: {type(error).__name__}") from None

    async def ensure_role_binding(
        self, namespace: str, name: str, *, cluster_role: str, subject: tuple[str, str]
    ) -> bool:
        """The RoleBinding `name` in `namespace`, giving ClusterRole `cluster_role` to ServiceAccount
        `subject` (namespace, name), as it should be; True if it was created or replaced."""
        body: dict[str, Any] = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name, "namespace": namespace, "labels": {MANAGED_BY_LABEL: MANAGER}},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
            "subjects": [{"kind": "ServiceAccount", "namespace": subject[0], "name": subject[1]}],
        }
        current = await self._call(self.rbac.read_namespaced_role_binding, name, namespace)
        if current is None:
            await self._call(self.rbac.create_namespaced_role_binding, namespace, body, field_manager=MANAGER)
            return True
        if current.get("roleRef") == body["roleRef"] and current.get("subjects") == body["subjects"]:
            return False
        if current.get("roleRef") != body["roleRef"]:  # roleRef is immutable: delete and create
            await self._call(self.rbac.delete_namespaced_role_binding, name, namespace)
            await self._call(self.rbac.create_namespaced_role_binding, namespace, body, field_manager=MANAGER)
            return True
        body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        await self._call(
            self.rbac.replace_namespaced_role_binding, name, namespace, body, field_manager=MANAGER
        )
        return True

    async def delete_role_binding(self, namespace: str, name: str) -> bool:
        """False if there was none."""
        return await self._call(self.rbac.delete_namespaced_role_binding, name, namespace) is not None
