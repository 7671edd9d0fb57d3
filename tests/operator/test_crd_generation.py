"""crds/ and the generated parts of values.schema.json are what `make crds` writes from the models.

No cluster: tests/operator/test_operator_crds.py applies the same files to the real API server.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from outbound_operator.crd_models import (
    BINDING_MAX_LENGTH,
    RESOURCES,
    CrdModel,
    CustomResource,
    PolicySpec,
    PrinterColumn,
    Rule,
)
from outbound_operator.crd_schema import CrdSchemaError, custom_resource_definition, structural_schema
from outbound_operator.crdgen import crd_yaml, differences
from outbound_operator.injection import InjectionSettings
from outbound_operator.resources import (
    GROUP_KIND,
    GROUP_PLURAL,
    POLICY_KIND,
    POLICY_PLURAL,
    SETTINGS_KIND,
    SETTINGS_PLURAL,
)

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "charts" / "outbound-relay" / "values.yaml"


def test_crds_and_values_schema_are_what_make_crds_writes() -> None:
    diffs = differences(REPO)
    assert not diffs, "generated files differ from the models; run `make crds`:\n" + "".join(diffs)


def test_the_check_finds_a_hand_edit(tmp_path: Path) -> None:
    for path in ("crds", "charts/outbound-relay"):
        (tmp_path / path).mkdir(parents=True)
    for resource in RESOURCES:
        name = f"{resource.plural}.outboundrelay.io.yaml"
        (tmp_path / "crds" / name).write_text((REPO / "crds" / name).read_text())
    schema = (REPO / "charts/outbound-relay/values.schema.json").read_text()
    (tmp_path / "charts/outbound-relay/values.schema.json").write_text(schema)
    assert differences(tmp_path) == []
    policy = tmp_path / "crds" / "outboundauthpolicies.outboundrelay.io.yaml"
    policy.write_text(policy.read_text().replace("maximum: 65535", "maximum: 65536"))
    (diff,) = differences(tmp_path)
    assert "-                      maximum: 65536" in diff and "+                      maximum: 65535" in diff


@pytest.mark.parametrize("seed", ["0", "4242"])
def test_generation_is_deterministic(seed: str) -> None:
    """`--check` in a fresh interpreter with another hash seed: no set or dict order leaks into the files."""
    proc = subprocess.run(
        [sys.executable, "-m", "outbound_operator.crdgen", "--check", "--root", str(REPO)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONHASHSEED": seed},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_names_come_from_resources_py() -> None:
    kinds = {r.kind: r.plural for r in RESOURCES}
    assert kinds == {POLICY_KIND: POLICY_PLURAL, GROUP_KIND: GROUP_PLURAL, SETTINGS_KIND: SETTINGS_PLURAL}


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_the_yaml_reads_back_as_the_definition(resource: CustomResource) -> None:
    """Descriptions are written as folded blocks; they must read back as the same one-line text."""
    assert yaml.safe_load(crd_yaml(resource)) == custom_resource_definition(resource)


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, child in (schema.get("properties") or {}).items():
        found += _nodes(child, f"{path}.{name}")
    if "items" in schema:
        found += _nodes(schema["items"], f"{path}[]")
    return found


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: r.kind)
def test_schemas_are_structural(resource: CustomResource) -> None:
    """What apiextensions v1 requires of a structural schema: a type on every node, no references, no
    unions, no additionalProperties beside properties; and every spec field described for kubectl explain."""
    (version,) = custom_resource_definition(resource)["spec"]["versions"]
    for path, node in _nodes(version["schema"]["openAPIV3Schema"]):
        assert "type" in node, path
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title", "additionalProperties"} & node.keys()
        if path.startswith(".spec.") and not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description"


def test_descriptions_say_what_the_relay_does() -> None:
    """The gateway's description promised MX delivery, which the relay never does."""
    gateway = structural_schema(PolicySpec)["properties"]["gateway"]["description"]
    assert "no MX lookup" in gateway and "451 4.3.5" in gateway


def test_binding_limit_is_one_for_policies_groups_and_the_annotation() -> None:
    spec = structural_schema(PolicySpec)["properties"]
    group = custom_resource_definition(RESOURCES[1])["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    binding = spec["scope"]["properties"]["binding"]
    item = group["properties"]["spec"]["properties"]["bindings"]["items"]
    assert binding["maxLength"] == item["maxLength"] == BINDING_MAX_LENGTH == 63
    assert binding["pattern"] == item["pattern"]


class _Union(CrdModel):
    port: int | str


class _Fixed(CrdModel):
    pair: tuple[int, int]


@pytest.mark.parametrize(("model", "field"), [(_Union, "_Union.port"), (_Fixed, "_Fixed.pair")])
def test_what_a_structural_schema_cannot_say_stops_the_generator(model: type[CrdModel], field: str) -> None:
    with pytest.raises(CrdSchemaError, match=rf"^{field}: "):
        structural_schema(model)


def test_a_printer_column_must_name_a_field() -> None:
    resource = CustomResource(
        kind="X",
        plural="xs",
        model=RESOURCES[0].model,
        columns=(PrinterColumn(name="N", json_path=".spec.nope"),),
    )
    with pytest.raises(CrdSchemaError, match=r"printer column N: \.spec\.nope is not a field"):
        custom_resource_definition(resource)


class _Ruled(CrdModel):
    crd_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.a) && has(self.b))", message="a or b, not both", holds=lambda s: not (s.a and s.b)
        ),
    )
    a: str | None = None
    b: str | None = None


def test_a_rule_is_cel_in_the_schema_and_python_in_the_model() -> None:
    assert structural_schema(_Ruled)["x-kubernetes-validations"] == [
        {"rule": "!(has(self.a) && has(self.b))", "message": "a or b, not both"}
    ]
    assert _Ruled.model_validate({"a": "x"}).a == "x"
    with pytest.raises(ValueError, match="a or b, not both"):
        _Ruled.model_validate({"a": "x", "b": "y"})


def test_chart_defaults_are_the_injection_defaults() -> None:
    """values.yaml's `relay:` section sets what InjectionSettings defaults to: an install with default
    values injects the sidecar the operator's docs describe."""
    relay = yaml.safe_load(VALUES.read_text())["relay"]
    defaults = InjectionSettings()
    from_chart = InjectionSettings.model_validate(
        {
            key: value
            for key, value in relay.items()
            if key != "image" and value != ""  # "" is the chart's "none"/"the operator's"
        }
    )
    assert from_chart == defaults.model_copy(update={"image": from_chart.image})
    assert relay["image"]["pullPolicy"] == ""  # the operator's image.pullPolicy, IfNotPresent
