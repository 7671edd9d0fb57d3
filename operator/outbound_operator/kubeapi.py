"""The few Kubernetes API calls the operator makes, awaitable, with plain JSON in and out.

The `kubernetes` client is synchronous; each call runs in a worker thread so the event loop (and kopf's
watch streams) never waits on the network. Responses are read as JSON, not as the client's model
classes: listing a thousand objects stays cheap.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from outbound_operator.resources import GROUP, MANAGER, RENDERED_SECRET, VERSION

# At most this many API calls in flight from the operator: it is one client among many.
MAX_CONCURRENT_CALLS = 16


class ConflictError(RuntimeError):
    """The object changed since it was read (HTTP 409); read it again and retry."""


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


class KubeApi:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_CALLS)

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
        )

    async def write_rendered(
        self,
        namespace: str,
        *,
        data: Mapping[str, bytes],
        owners: tuple[dict[str, Any], ...],
        labels: Mapping[str, str],
        current: RenderedSecret | None,
    ) -> str:
        """Create the rendered Secret, or replace it if unchanged since `current` was read; returns the
        new resourceVersion."""
        metadata: dict[str, Any] = {
            "name": RENDERED_SECRET,
            "namespace": namespace,
            "labels": dict(labels),
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
            "reportingInstance": MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(self.core.create_namespaced_event, namespace, body)
