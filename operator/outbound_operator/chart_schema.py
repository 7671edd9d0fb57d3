"""The parts of the chart's values.schema.json that mirror code, generated from that code (`make crds`).

The chart's `relay:` values become the webhook's sidecar.yaml (charts/outbound-relay/templates/
_helpers.tpl, `outbound-relay.sidecarSettings`), which the operator loads into
injection.InjectionSettings. So each `relay.*` value's schema is that setting's, and a resource quantity is
the pattern the operator checks (injection.QUANTITY_PATTERN), for the relay's and the operator's own
resources alike: Helm then refuses at install what the operator would refuse at start. The rest of the
file (the operator's Deployment, the webhook, RBAC, monitors) is the chart's own and kept by hand.
"""

from __future__ import annotations

import copy
from typing import Any

from outbound_operator.crd_schema import inline
from outbound_operator.injection import QUANTITY_PATTERN, InjectionSettings, Resources

# Each InjectionSettings field by its sidecar.yaml key: the path of the chart value that sets it, or None
# when the chart derives it (the image from relay.image.*, the Secret from the operator's fixed name).
RELAY_VALUES: dict[str, tuple[str, ...] | None] = {
    "image": None,
    "imagePullPolicy": ("image", "pullPolicy"),
    "resources": ("resources",),
    "runAsUser": ("runAsUser",),
    "runAsGroup": ("runAsGroup",),
    "metricsPort": ("metricsPort",),
    "configSecret": None,
    "hooksConfigMap": ("hooksConfigMap",),
    "logLevel": ("logLevel",),
    "shutdownTimeoutSeconds": ("shutdownTimeoutSeconds",),
    "prometheusAnnotations": ("prometheusAnnotations",),
}
# Output order of a generated node's keys, as in the rest of the file.
_KEY_ORDER = (
    "type",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "maxLength",
    "pattern",
    "anyOf",
    "properties",
    "additionalProperties",
    "description",
)

QUANTITY: dict[str, Any] = {
    "anyOf": [{"type": "string", "pattern": QUANTITY_PATTERN}, {"type": "number", "minimum": 0}]
}


def _description(text: str | None) -> dict[str, str]:
    return {"description": " ".join(text.split())} if text else {}


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(node) - set(_KEY_ORDER))
    if unknown:
        raise ValueError(f"values schema: {', '.join(unknown)} not expected in {node}")
    return {key: node[key] for key in _KEY_ORDER if key in node}


def resources_schema(description: str | None) -> dict[str, Any]:
    """requests and limits: any resource name (cpu, memory, ephemeral-storage, hugepages-2Mi, ...), each a
    quantity as a string or a non-negative number, as ResourceList takes them."""
    lists = {
        name: _ordered(
            {
                "type": "object",
                "additionalProperties": QUANTITY,
                **_description(Resources.model_fields[name].description),
            }
        )
        for name in ("requests", "limits")
    }
    return _ordered(
        {
            "type": "object",
            "properties": lists,
            "additionalProperties": False,
            **_description(description),
        }
    )


def _setting(key: str, schema: dict[str, Any], definitions: dict[str, Any]) -> dict[str, Any]:
    node = inline(schema, definitions, f"InjectionSettings.{key}")
    node.pop("title", None)
    node.pop("default", None)
    if key == "hooksConfigMap":
        node["pattern"] = f"^$|{node['pattern']}"  # "" is the chart's "none"
    if key == "imagePullPolicy":
        node["enum"] = ["", *node["enum"]]  # "": the operator's image.pullPolicy
        node.pop("type", None)
        node.pop("description", None)
    if "description" in node:
        node.update(_description(node["description"]))
    return _ordered(node)


def update_values_schema(current: dict[str, Any]) -> dict[str, Any]:
    """`current` (the chart's values.schema.json) with the generated parts replaced."""
    result = copy.deepcopy(current)
    raw = InjectionSettings.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.get("$defs", {})
    settings: dict[str, Any] = raw["properties"]
    unmapped = sorted(set(settings) - set(RELAY_VALUES))
    if unmapped:
        raise ValueError(f"InjectionSettings {', '.join(unmapped)}: map them to chart values in RELAY_VALUES")
    relay = result["properties"]["relay"]["properties"]
    for key, path in RELAY_VALUES.items():
        if path is None:
            continue
        *parents, last = path
        node = relay
        for parent in parents:
            node = node[parent]["properties"]
        if key == "resources":
            node[last] = resources_schema(InjectionSettings.model_fields["resources"].description)
        else:
            node[last] = _setting(key, settings[key], definitions)
    operator = result["properties"]["operator"]["properties"]
    operator["resources"] = resources_schema("Requests and limits of the operator's container.")
    operator["hookChecker"]["properties"]["resources"] = resources_schema(
        "Requests and limits of the hook checker's container."
    )
    return result
