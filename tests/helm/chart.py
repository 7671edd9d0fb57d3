"""Running the real helm on charts/outbound-relay, for the chart and webhook tests."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.controlplane import REPO, ControlPlane

CHART = REPO / "charts" / "outbound-relay"
CRDS = REPO / "crds"
TEST_HOOK = "templates/tests/check-install.yaml"


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


@contextlib.contextmanager
def installed(
    control_plane: ControlPlane, release: str, namespace: str, *args: str
) -> Iterator[subprocess.CompletedProcess[str]]:
    """`helm install` of the chart, uninstalled afterwards whatever happened, the install itself failing
    included: a release left behind keeps its cluster-wide webhook configurations, whose policy check
    (failurePolicy Fail) would then refuse every policy of every later test on the shared cluster."""
    try:
        yield helm(control_plane, "install", release, str(CHART), "--namespace", namespace, *args)
    finally:
        helm(control_plane, "uninstall", release, "--namespace", namespace, "--wait", check=False)


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
    show_only: str | None = None,
) -> str:
    """`helm template` without the `helm test` hook's objects (what `helm install` makes); show_only: one
    template only, e.g. TEST_HOOK."""
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
    args += ["--show-only", show_only] if show_only else ["--skip-tests"]
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


def hand_crds_to(control_plane: ControlPlane, release: str, namespace: str) -> None:
    """Let `release` take over the CRDs that exist already (the test cluster is shared: other tests apply
    crds/ or installed the chart as another release, and Helm refuses to install over objects it does not
    own). These are the commands docs/helm.md's upgrade notes give, for CRDs installed by an older chart or
    by hand."""
    names = [path.name.removesuffix(".yaml") for path in sorted(CRDS.glob("*.yaml"))]
    found = control_plane.kubectl("get", "crd", *names, "--ignore-not-found", "-o", "name").split()
    if not found:
        return
    control_plane.kubectl(
        "annotate", "--overwrite", *found,
        f"meta.helm.sh/release-name={release}", f"meta.helm.sh/release-namespace={namespace}",
    )  # fmt: skip
    control_plane.kubectl("label", "--overwrite", *found, "app.kubernetes.io/managed-by=Helm")
