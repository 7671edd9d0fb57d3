"""The image `make image` builds from the Dockerfile (hack/image), read from the docker-archive it leaves:
what the chart and the kubelet rely on."""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.controlplane import REPO

pytestmark = pytest.mark.image


@pytest.fixture(scope="module")
def archive() -> Path:
    # Built before the tests by tests/cluster/plugin.py; this finds it cached.
    out = subprocess.run(
        [str(REPO / "hack" / "image"), "build"], stdout=subprocess.PIPE, text=True, check=True, timeout=600
    )
    return Path(out.stdout.strip())


def _read(tar: tarfile.TarFile, name: str) -> Any:
    member = tar.extractfile(name)
    assert member is not None, name
    return json.load(member)


def test_archive_names_the_image_and_its_config(archive: Path) -> None:
    with tarfile.open(archive) as tar:
        (manifest,) = _read(tar, "manifest.json")
        config = _read(tar, manifest["Config"])
    assert manifest["RepoTags"] == ["localhost/outbound-relay:dev"]
    # The chart's securityContext runs both containers as 65532 with a read-only root filesystem.
    assert config["config"]["User"] == "65532:65532"
    assert (
        "PATH=/opt/outbound-relay/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        in (config["config"]["Env"])
    )
    assert config["config"].get("Entrypoint") is None  # the chart names the command
    assert set(config["config"]["ExposedPorts"]) == {"9425/tcp", "9426/tcp", "9443/tcp"}
    assert config["os"] == "linux"


def test_layers_hold_the_venv_and_compiled_bytecode(archive: Path) -> None:
    """Nothing is compiled at run time (read-only root, PYTHONDONTWRITEBYTECODE): the stdlib of Debian's
    python3.11 and the venv carry their .pyc files."""
    names: set[str] = set()
    with tarfile.open(archive) as tar:
        (manifest,) = _read(tar, "manifest.json")
        for layer in manifest["Layers"]:
            member = tar.extractfile(layer)
            assert member is not None
            with tarfile.open(fileobj=member) as inner:
                names.update(name.removeprefix("./") for name in inner.getnames())
    assert "opt/outbound-relay/bin/outbound-relay" in names
    assert "opt/outbound-relay/bin/outbound-operator" in names
    assert "usr/lib/python3.11/__pycache__/os.cpython-311.pyc" in names
    assert any(
        n.startswith("opt/outbound-relay/lib/python3.11/site-packages/outbound_relay/__pycache__/")
        for n in names
    )
