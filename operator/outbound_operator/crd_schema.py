"""A CustomResourceDefinition from a typed model (crd_models.py): pydantic's JSON Schema made structural.

pydantic writes JSON Schema with `$defs`/`$ref`, `anyOf [..., {"type": "null"}]` for optional fields,
titles and `additionalProperties: false`; a Kubernetes structural schema has none of these (apiextensions
v1 refuses `$ref`, and `additionalProperties` beside `properties`). So references are inlined, an optional
field becomes its non-null branch (a field left out is how Kubernetes says "none"), titles and null
defaults go, and descriptions become one paragraph each. Anything else that a structural schema cannot
say (a union of two types, a tuple of fixed length, ...) stops the generator with the path of the field,
rather than being written in a form the API server would refuse or read differently.
"""

from __future__ import annotations

import re
from typing import Any

from outbound_operator.crd_models import CustomResource
from outbound_operator.resources import GROUP, VERSION

# Output order of a schema node's keys: the description first, then what constrains the value.
KEY_ORDER = (
    "description",
    "type",
    "format",
    "enum",
    "default",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "minItems",
    "maxItems",
    "items",
    "required",
    "properties",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
)
_DROPPED = ("title",)


class CrdSchemaError(ValueError):
    """The model says something a structural schema cannot; the message names the field."""


def structural_schema(model: type[Any]) -> dict[str, Any]:
    """The model's JSON Schema as a Kubernetes structural schema (openAPIV3Schema)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    definitions = raw.pop("$defs", {})
    return _convert(raw, definitions, model.__name__)


def inline(node: dict[str, Any], definitions: dict[str, Any], path: str) -> dict[str, Any]:
    """Inline `$ref` and drop the null branch of `anyOf`; the outer keys (description, default) win."""
    node = dict(node)
    while True:
        if "$ref" in node:
            name = node.pop("$ref").rsplit("/", 1)[-1]
            node = {**definitions[name], **node}
        elif "anyOf" in node:
            branches = [b for b in node.pop("anyOf") if b != {"type": "null"}]
            if len(branches) != 1:
                raise CrdSchemaError(f"{path}: a union of several types has no structural schema")
            node = {**branches[0], **node}
        else:
            return node


def _convert(node: dict[str, Any], definitions: dict[str, Any], path: str) -> dict[str, Any]:
    node = inline(node, definitions, path)
    for key in _DROPPED:
        node.pop(key, None)
    if "default" in node and node["default"] is None:
        del node["default"]
    if node.get("additionalProperties") is False:
        del node["additionalProperties"]  # an object lists its properties; the API server prunes the rest
    unknown = sorted(set(node) - set(KEY_ORDER))
    if unknown:
        raise CrdSchemaError(f"{path}: {', '.join(unknown)} cannot be said in a structural schema")
    if "type" not in node:
        raise CrdSchemaError(f"{path}: no type")
    if "description" in node:
        node["description"] = " ".join(str(node["description"]).split())
    if "properties" in node:
        node["properties"] = {
            name: _convert(child, definitions, f"{path}.{name}") for name, child in node["properties"].items()
        }
    if "items" in node:
        node["items"] = _convert(node["items"], definitions, f"{path}[]")
    if "x-kubernetes-validations" in node:  # pydantic sorts keys: the rule first again
        node["x-kubernetes-validations"] = [
            {"rule": rule["rule"], "message": rule["message"]} for rule in node["x-kubernetes-validations"]
        ]
    return {key: node[key] for key in KEY_ORDER if key in node}


def _schema_at(schema: dict[str, Any], json_path: str) -> dict[str, Any] | None:
    """The schema node a printer column's simple JSONPath points to (filters such as [?(...)] step into
    the list's items); None when the path leaves the schema."""
    node: dict[str, Any] | None = schema
    for step in re.findall(r"\.([A-Za-z0-9_]+)|\[[^\]]*\]", json_path):
        if node is None:
            return None
        node = (node.get("properties") or {}).get(step) if step else node.get("items")
    return node


def custom_resource_definition(resource: CustomResource) -> dict[str, Any]:
    """The whole CRD object, as `kubectl apply` and Helm take it."""
    schema = structural_schema(resource.model)
    schema["properties"] = {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        **schema["properties"],
    }
    if resource.object_rules:
        schema["x-kubernetes-validations"] = [
            {"rule": rule.cel, "message": rule.message} for rule in resource.object_rules
        ]
    columns = []
    for column in resource.columns:
        if not column.json_path.startswith(".metadata.") and _schema_at(schema, column.json_path) is None:
            raise CrdSchemaError(
                f"{resource.kind} printer column {column.name}: {column.json_path} is not a field"
            )
        entry: dict[str, Any] = {"name": column.name, "type": column.type, "jsonPath": column.json_path}
        if column.priority:
            entry["priority"] = column.priority
        columns.append(entry)
    singular = resource.kind.lower()
    names: dict[str, Any] = {
        "kind": resource.kind,
        "listKind": f"{resource.kind}List",
        "plural": resource.plural,
        "singular": singular,
    }
    if resource.short_names:
        names["shortNames"] = list(resource.short_names)
    names["categories"] = ["outboundrelay"]
    version = {
        "name": VERSION,
        "served": True,
        "storage": True,
        "subresources": {"status": {}},
        "additionalPrinterColumns": columns,
        "schema": {"openAPIV3Schema": schema},
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{resource.plural}.{GROUP}"},
        "spec": {"group": GROUP, "scope": "Namespaced", "names": names, "versions": [version]},
    }
