"""Drive hack/control-plane from Python: the same entry point `make cluster` uses.

The fixtures in tests/cluster/plugin.py wrap this; operator and Helm tests use those fixtures, and may use
this module directly (e.g. to restart the API server).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client, config

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "hack" / "control-plane"


def go_missing() -> str | None:
    """Why cluster tests cannot run here, or None. Mirrors go_command() in hack/control-plane."""
    candidates = [os.environ["GO"]] if os.environ.get("GO") else ["go", "/usr/local/go/bin/go"]
    if any(shutil.which(candidate) for candidate in candidates):
        return None
    return f"no go command ({' or '.join(candidates)}): cluster tests build kube-apiserver, etcd, ... with Go"


def run_script(*args: str, state_dir: Path | None = None) -> str:
    """Run hack/control-plane; its progress goes to our stderr (pytest shows it on failure)."""
    env = dict(os.environ)
    if state_dir is not None:
        env["OUTBOUND_RELAY_CLUSTER_DIR"] = str(state_dir)
    proc = subprocess.run(
        [str(SCRIPT), *args], env=env, stdout=subprocess.PIPE, text=True, check=False, timeout=3600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"hack/control-plane {' '.join(args)} failed with {proc.returncode}")
    return proc.stdout


def build() -> None:
    """Build (or find cached) etcd, kube-apiserver and helm; minutes when cold, instant when warm."""
    run_script("build")


def versions() -> dict[str, str]:
    """Pinned upstream version of each tool, e.g. {"kube-apiserver": "v1.34.4", "helm": "v3.22.0", ...}."""
    return dict(line.split("\t") for line in run_script("versions").splitlines())


@dataclass(frozen=True)
class ControlPlane:
    """A running etcd + kube-apiserver whose files live in state_dir, and a node: kwok's fake one, or a
    real kubelet (`node="kubelet"`, whose network namespace gets the host's 127.0.0.1:`publish` ports)."""

    state_dir: Path
    node: str = "kwok"
    publish: tuple[int, ...] = ()

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def bin_dir(self) -> Path:
        return self.state_dir / "bin"

    @property
    def helm(self) -> Path:
        return self.bin_dir / "helm"

    def start(self) -> None:
        # --watch-pid: if this Python process dies without teardown, the control plane stops anyway.
        node = ["--node", self.node, *(f"--publish={port}" for port in self.publish)]
        run_script("up", "--watch-pid", str(os.getpid()), *node, state_dir=self.state_dir)

    @property
    def apiserver_port(self) -> int:
        return int(json.loads((self.state_dir / "run" / "ports.json").read_text())["kube-apiserver"])

    def stop(self) -> None:
        run_script("down", state_dir=self.state_dir)

    def restart_apiserver(self) -> None:
        """Stop kube-apiserver only and start it again on the same port; etcd keeps running."""
        run_script("down", "kube-apiserver", state_dir=self.state_dir)
        run_script("up", state_dir=self.state_dir)

    def env(self) -> dict[str, str]:
        """Environment for kubectl/helm subprocesses: this cluster's kubeconfig and the built helm first
        on PATH, with helm's caches inside the state dir so tests never touch the user's."""
        return {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{self.bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HELM_CACHE_HOME": str(self.state_dir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.state_dir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.state_dir / "helm" / "data"),
        }

    def run(
        self, *argv: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command (kubectl, helm, ...) against this cluster; output captured as text."""
        return subprocess.run(
            argv, env=self.env(), input=input, capture_output=True, text=True, check=check, timeout=120
        )

    def kubectl(self, *args: str, input: str | None = None) -> str:
        proc = self.run("kubectl", *args, input=input, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def api_client(self) -> client.ApiClient:
        """A fresh `kubernetes` ApiClient for this cluster (close it, or use it as a context manager)."""
        api: client.ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        return api
