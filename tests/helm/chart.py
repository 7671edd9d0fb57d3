"""Running the real helm on charts/outbound-relay, for the chart and webhook tests."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import REPO, ControlPlane

CHART = REPO / "charts" / "outbound-relay"
CRDS = REPO / "crds"


def release_name(prefix: str = "or") -> str:
    """A release name of its own: the chart's cluster-scoped objects are named after it."""
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def helm(
    control_plane: ControlPlane, *args: str, check: bool = True, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = control_plane.run(str(control_plane.helm), *args, input=input, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def values_file(directory: Path, values: dict[str, Any]) -> Path:
    path = directory / f"values-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    return path


def template(
    control_plane: ControlPlane,
    directory: Path,
    values: dict[str, Any] | None = None,
    *,
    release: str = "outbound-relay",
    namespace: str = "outbound-relay-system",
    include_crds: bool = False,
) -> str:
    args = [
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        str(values_file(directory, values or {})),
    ]
    if include_crds:
        args.append("--include-crds")
    return helm(control_plane, *args).stdout


def objects(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


def read_json(call: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """A call of the `kubernetes` client, answered as plain JSON (its models make every field Optional)."""
    response: Any = call(*args, _preload_content=False)
    data: dict[str, Any] = json.loads(response.data)
    return data


def find(docs: list[dict[str, Any]], kind: str, name_suffix: str = "") -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(name_suffix)]
