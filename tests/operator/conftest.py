"""Fixtures for the operator tests; the control plane comes from tests/cluster/plugin.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.cluster.controlplane import ControlPlane
from tests.operator.cluster import CRD_DIR, Objects, OperatorProcess
from tests.peers.certs import TLSFiles, make_tls_files

CRD_NAMES = (
    "outboundauthpolicies.outboundrelay.io",
    "outboundbindinggroups.outboundrelay.io",
    "outboundrelaysettings.outboundrelay.io",
)


@pytest.fixture(scope="session")
def crds(control_plane: ControlPlane) -> None:
    """The CRDs from crds/, the single source, applied and established."""
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{name}" for name in CRD_NAMES)
    )


@pytest.fixture
def objects(crds: None, k8s_client: client.ApiClient, namespace: str) -> Objects:
    return Objects(k8s_client, namespace)


StartOperator = Callable[..., OperatorProcess]


@pytest.fixture
def start_operator(crds: None, kubeconfig: Path, namespace: str, tmp_path: Path) -> Iterator[StartOperator]:
    """Start `outbound-operator --namespace <the test's namespace>`; stopped at the end of the test. Its
    log must never hold a Secret value: tests pass the values they used to `assert_no_secret_in_logs`."""
    started: list[OperatorProcess] = []

    def start(*extra: str) -> OperatorProcess:
        process = OperatorProcess(kubeconfig, [namespace], tmp_path / "operator.log", *extra)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
    if started:
        print(started[0].logs()[-20000:])  # pytest shows it when the test failed


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))
