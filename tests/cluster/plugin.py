"""Pytest fixtures for a real control plane; a plugin so that any test directory can use them.

Registered for the whole suite by `pytest_plugins = ["tests.cluster.plugin"]` in tests/conftest.py.

    control_plane   session: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (one
                    fake Node, so Pods become Running) from hack/control-plane, in a fresh state dir
    kubeconfig      session: path of its kubeconfig (admin, system:masters)
    k8s_client      function: a `kubernetes` ApiClient
    namespace       function: a fresh namespace, deleted afterwards

Tests using them are marked `cluster` (added automatically to any test that uses control_plane) and are
skipped only when Go is missing. The binaries are built before the first test runs, outside any test's
timeout: a cold build takes minutes, a cached one a fraction of a second. Likewise, when a test marked
`node` (a real kubelet) or `image` is selected, the image is built from the Dockerfile by hack/image.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.cluster.controlplane import REPO, ControlPlane, build, go_missing

_build_error: str | None = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = go_missing()
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cluster)
        if reason and item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session: pytest.Session) -> None:
    """Build before the first test, so the build does not count against a test's timeout."""
    global _build_error
    if session.config.option.collectonly:
        return
    cluster = not go_missing() and any(item.get_closest_marker("cluster") for item in session.items)
    image = any(item.get_closest_marker("node") or item.get_closest_marker("image") for item in session.items)
    if not (cluster or image):
        return
    # Uncaptured, so that a cold build (minutes) shows its progress instead of a silent pause.
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        if cluster:
            try:
                build()
            except RuntimeError as err:
                _build_error = str(err)
        if image:
            # A failure shows here; the tests that need the image then fail on their own build.
            with contextlib.suppress(RuntimeError):
                build_image()


def build_image() -> None:
    """hack/image build: the base (debootstrap, cached) and the image (buildah, layers cached)."""
    proc = subprocess.run([str(REPO / "hack" / "image"), "build"], stdout=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"hack/image build failed with {proc.returncode}")


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    if _build_error:
        pytest.fail(_build_error)
    cluster = ControlPlane(tmp_path_factory.mktemp("control-plane"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    return control_plane.kubeconfig


@pytest.fixture
def k8s_client(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    with control_plane.api_client() as api:
        yield api


@pytest.fixture
def namespace(request: pytest.FixtureRequest, k8s_client: client.ApiClient) -> Iterator[str]:
    """A namespace of its own for each test, named after it (e.g. t-secret-round-trips-1a2b3c)."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_")).strip("-")
    name = f"t-{slug[:40].strip('-')}-{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(k8s_client)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    # The ServiceAccount admission plugin refuses Pods until the controller manager has created the
    # namespace's "default" ServiceAccount (a real cluster has the same race); wait for it.
    deadline = time.monotonic() + 30
    while not core.list_namespaced_service_account(name, field_selector="metadata.name=default").items:
        assert time.monotonic() < deadline, f"no ServiceAccount default in namespace {name} after 30s"
        time.sleep(0.1)
    yield name
    # The namespace controller deletes its content in the background.
    core.delete_namespace(name)
