"""Test helpers for the operator on the real API server: the operator as a process, and the objects."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client

from outbound_operator.resources import (
    CONFIG_KEY,
    GROUP,
    GROUP_PLURAL,
    POLICY_PLURAL,
    RENDERED_SECRET,
    SETTINGS_KIND,
    SETTINGS_NAME,
    SETTINGS_PLURAL,
    VERSION,
)
from tests.support.process import terminate

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
OPERATOR = Path(sys.executable).parent / "outbound-operator"

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(check: Callable[[], T | None], *, timeout: float = 30, what: str = "condition") -> T:
    """Poll `check` until it returns something truthy; that is the result."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class OperatorProcess:
    """`outbound-operator --namespace NS` as a child process, as it runs in its Pod."""

    def __init__(self, kubeconfig: Path, namespaces: list[str], log_file: Path, *extra: str) -> None:
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.log_file = log_file
        argv = [str(OPERATOR)]
        for namespace in namespaces:
            argv += ["--namespace", namespace]
        argv += [
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(self.metrics_port),
            "--liveness",
            f"http://127.0.0.1:{self.health_port}/healthz",
            "--log-format",
            "plain",
            "--debounce",
            "0.05",
            *extra,
        ]
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        with log_file.open("ab") as log:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.healthy, timeout=30, what="the operator's liveness endpoint")

    def _get(self, port: int, path: str) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.logs()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
                body: bytes = response.read()
                return body.decode()
        except (urllib.error.URLError, ConnectionError):
            return None

    def healthy(self) -> bool:
        return self._get(self.health_port, "/healthz") is not None

    def metrics(self) -> str:
        return self._get(self.metrics_port, "/metrics") or ""

    def metric(self, name: str, **labels: str) -> float:
        selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
        wanted = f"{name}{{{selector}}}" if selector else name
        for line in self.metrics().splitlines():
            if line.startswith(wanted + " "):
                return float(line.split()[-1])
        raise KeyError(wanted)

    def logs(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        terminate(self.proc, 15)


def call_json(method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """A `kubernetes` client call with its response as plain JSON (the client's models are not needed)."""
    response = method(*args, _preload_content=False, **kwargs)
    loaded: dict[str, Any] = json.loads(response.data)
    return loaded


@dataclass
class Objects:
    """Create, read and delete the operator's objects in one namespace."""

    api: client.ApiClient
    namespace: str

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def _create(self, plural: str, kind: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": kind,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": dict(spec),
        }
        return call_json(
            self.custom.create_namespaced_custom_object, GROUP, VERSION, self.namespace, plural, body
        )

    def apply_policy(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self._create(POLICY_PLURAL, "OutboundAuthPolicy", name, spec)

    def apply_group(self, name: str, bindings: list[str]) -> dict[str, Any]:
        return self._create(GROUP_PLURAL, "OutboundBindingGroup", name, {"bindings": bindings})

    def apply_settings(self, spec: Mapping[str, Any], name: str = SETTINGS_NAME) -> dict[str, Any]:
        return self._create(SETTINGS_PLURAL, SETTINGS_KIND, name, spec)

    def put_config_map(self, name: str, data: Mapping[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": dict(data)}
        try:
            call_json(self.core.create_namespaced_config_map, self.namespace, body)
        except client.exceptions.ApiException as error:
            if error.status != 409:
                raise
            call_json(self.core.replace_namespaced_config_map, name, self.namespace, body)

    def get(self, name: str, plural: str = POLICY_PLURAL) -> dict[str, Any]:
        return call_json(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, self.namespace, plural, name
        )

    def policy(self, name: str) -> dict[str, Any]:
        return self.get(name)

    def policies(self) -> list[dict[str, Any]]:
        found = call_json(
            self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, POLICY_PLURAL
        )
        items: list[dict[str, Any]] = found["items"]
        return items

    def delete_policy(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, POLICY_PLURAL, name)

    def condition(self, name: str, kind: str, *, plural: str = POLICY_PLURAL) -> dict[str, Any]:
        for item in (self.get(name, plural).get("status") or {}).get("conditions") or ():
            if item["type"] == kind:
                found: dict[str, Any] = item
                return found
        return {}

    def wait_condition(
        self, name: str, kind: str, status: str, *, plural: str = POLICY_PLURAL
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            found = self.condition(name, kind, plural=plural)
            return found if found.get("status") == status else None

        return wait_for(check, what=f"{name}: {kind}={status}")

    def wait_for_message(self, name: str, text: str, plural: str = POLICY_PLURAL) -> dict[str, Any]:
        """Wait until the Ready condition's message holds `text`; that condition."""

        def check() -> dict[str, Any] | None:
            found = self.condition(name, "Ready", plural=plural)
            return found if text in str(found.get("message")) else None

        return wait_for(check, what=f"{name}: Ready's message with {text!r}")

    def put_secret(self, name: str, data: Mapping[str, bytes | str]) -> None:
        encoded = {
            k: base64.b64encode(v.encode() if isinstance(v, str) else v).decode() for k, v in data.items()
        }
        body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded}
        try:
            call_json(self.core.create_namespaced_secret, self.namespace, body)
        except client.exceptions.ApiException as error:
            if error.status != 409:
                raise
            call_json(self.core.replace_namespaced_secret, name, self.namespace, body)

    def delete_secret(self, name: str) -> None:
        self.core.delete_namespaced_secret(name, self.namespace)

    def rendered(self) -> dict[str, Any] | None:
        """The rendered Secret as JSON, or None."""
        try:
            return call_json(self.core.read_namespaced_secret, RENDERED_SECRET, self.namespace)
        except client.exceptions.ApiException as error:
            if error.status == 404:
                return None
            raise

    def rendered_data(self) -> dict[str, bytes]:
        secret = self.rendered()
        if secret is None:
            return {}
        return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}

    def relay_yaml(self) -> dict[str, Any]:
        data = self.rendered_data()
        loaded: dict[str, Any] = yaml.safe_load(data[CONFIG_KEY]) if CONFIG_KEY in data else {}
        return loaded

    def rendered_policies(self) -> dict[str, dict[str, Any]]:
        return {p["name"]: p for p in self.relay_yaml().get("policies") or ()}

    def events(self, name: str) -> list[tuple[str, str, str]]:
        found = call_json(
            self.core.list_namespaced_event, self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [(e["type"], e["reason"], e["message"]) for e in found["items"]]
