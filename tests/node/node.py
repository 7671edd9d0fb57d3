"""What tests need of a real node (`hack/control-plane up --node kubelet`) beyond the API: its containerd,
its Pods' network namespaces and their logs.

The API server cannot reach the kubelet (it listens on 127.0.0.1 in the node's network namespace), so
`kubectl logs` and `exec` do not work; the containers' logs are files under <state dir>/pod-logs, and a
test that must act from inside a Pod's network (start a peer the sidecar talks to, send a message as the
app would) enters that Pod's network namespace from a thread of its own.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from tests.cluster.controlplane import ControlPlane

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


def ctr(cluster: ControlPlane, *args: str) -> str:
    """containerd's own client, on the node's socket, in the CRI's namespace."""
    socket = cluster.state_dir / "containerd" / "containerd.sock"
    return subprocess.run(
        ["ctr", f"--address={socket}", "--namespace=k8s.io", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def pod_netns(cluster: ControlPlane, pod_uid: str, timeout: float = 120) -> Path:
    """The network namespace of a Pod's sandbox (a file under /run/netns), once containerd made it."""
    deadline = time.monotonic() + timeout
    while True:
        for container in ctr(cluster, "containers", "list", "--quiet").split():
            info = json.loads(ctr(cluster, "containers", "info", container))
            labels = info.get("Labels") or {}
            if (
                labels.get("io.kubernetes.pod.uid") != pod_uid
                or labels.get("io.cri-containerd.kind") != "sandbox"
            ):
                continue
            for namespace in info["Spec"]["linux"]["namespaces"]:
                if namespace["type"] == "network" and namespace.get("path"):
                    return Path(namespace["path"])
        assert time.monotonic() < deadline, f"no sandbox with a network namespace for Pod {pod_uid}"
        time.sleep(0.5)


@contextlib.contextmanager
def _entered(netns: Path) -> Iterator[None]:
    """The calling thread in `netns` (setns(2), as nsenter does), and back home afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(netns, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({netns})")
        try:
            yield
        finally:
            if libc.setns(home, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the test's network namespace")
    finally:
        os.close(target)
        os.close(home)


def in_netns(netns: Path, function: Callable[[], T]) -> T:
    """Run `function` in a thread of its own inside `netns`: sockets it creates, threads it starts and
    processes it spawns (e.g. Dovecot) live there; the test's other threads stay where they were."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="netns") as pool:
        return pool.submit(_run_entered, netns, function).result()


def _run_entered(netns: Path, function: Callable[[], T]) -> T:
    with _entered(netns):
        return function()


def container_log(cluster: ControlPlane, namespace: str, pod: str, container: str) -> str:
    """What a container wrote (the kubelet's CRI log files: `<time> <stream> <tag> <line>` per line),
    as plain lines; '' while there is none."""
    lines = []
    for path in sorted((cluster.state_dir / "pod-logs").glob(f"{namespace}_{pod}_*/{container}/*.log")):
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split(" ", 3)
            lines.append(parts[3] if len(parts) == 4 else line)
    return "\n".join(lines)


def volume_file(cluster: ControlPlane, pod_uid: str, volume: str, key: str) -> Path:
    """A key of a Secret volume as the kubelet wrote it for a Pod (through its ..data symlink)."""
    return (
        cluster.state_dir / "kubelet" / "pods" / pod_uid / "volumes" / "kubernetes.io~secret" / volume / key
    )
