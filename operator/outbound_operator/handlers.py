"""kopf handlers: watch events become "namespace X changed" for the controller.

Only `@kopf.on.event` handlers: kopf then writes nothing to the watched objects (no finalizers, no
last-handled annotations), and the controller owns status and Events. Namespace events decide which
namespaces are served (namespaces.py); Secrets are not watched through kopf, whose watch would span every
namespace with `--all-namespaces`, but per served namespace by namespaces.py.

A module per feature registers into the same registry: a webhook module can add
`register_webhook(registry, ...)` beside `register(registry, controller)` without touching this one.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from outbound_operator.controller import Controller
from outbound_operator.namespaces import Namespaces
from outbound_operator.resources import GROUP, GROUP_PLURAL, POLICY_PLURAL, SETTINGS_PLURAL, VERSION


def register(registry: kopf.OperatorRegistry, controller: Controller, namespaces: Namespaces) -> None:
    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> Any:
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="settings", registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Our own Events (controller.py) only: kopf would post handler logs and errors as Events, and an
        # error about a Secret must never carry its data into an Event.
        settings.posting.enabled = False
        settings.posting.level = logging.CRITICAL
        controller.start()  # the periodic re-read of referenced Secrets

    @kopf.on.cleanup(id="stop-rendering", registry=registry)
    async def stop(**_: Any) -> None:
        await namespaces.close()
        await controller.close()

    @kopf.on.probe(id="namespaces", registry=registry)
    def probe(**_: Any) -> dict[str, int]:
        return controller.health()

    @kopf.on.event(GROUP, VERSION, POLICY_PLURAL, id="policy", registry=registry)
    async def policy_event(*, type: str, body: kopf.Body, namespace: str | None, **_: Any) -> None:
        controller.policy_changed(str(namespace), body, deleted=type == "DELETED")

    @kopf.on.event(GROUP, VERSION, GROUP_PLURAL, id="binding-group", registry=registry)
    async def group_event(*, type: str, body: kopf.Body, namespace: str | None, **_: Any) -> None:
        controller.group_changed(str(namespace), body, deleted=type == "DELETED")

    @kopf.on.event(GROUP, VERSION, SETTINGS_PLURAL, id="relay-settings", registry=registry)
    async def settings_event(*, type: str, body: kopf.Body, namespace: str | None, **_: Any) -> None:
        controller.settings_changed(str(namespace), body, deleted=type == "DELETED")

    @kopf.on.event("", "v1", "namespaces", id="namespace", registry=registry)
    async def namespace_event(*, type: str, body: kopf.Body, name: str, **_: Any) -> None:
        labels = dict((body.get("metadata") or {}).get("labels") or {})
        namespaces.namespace_changed(name, labels, deleted=type == "DELETED")
