"""No core dumps with secrets: `outbound-relay serve` and `outbound-operator` start with a core size limit
of 0 and not dumpable, checked from outside on the real processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.process import terminate

VENV_BIN = Path(sys.executable).parent

# Reads /proc/<pid>/environ as this user but without capabilities: the kernel allows it for a process of
# the same user, itself without capabilities, only when that process is dumpable (ptrace access mode
# PTRACE_MODE_READ; proc(5), ptrace(2)). Run as root, the targets start through WITHOUT_CAPABILITIES.
PROBE = """\
import ctypes, sys

class Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

class Data(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

libc = ctypes.CDLL(None, use_errno=True)
if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
    sys.exit("capset failed")
try:
    open(f"/proc/{sys.argv[1]}/environ", "rb").read()
except PermissionError:
    print("denied")
else:
    print("readable")
"""


# Empties the capability bounding set (possible for root; EPERM otherwise, where there is nothing to drop)
# and runs the command, which then starts without capabilities even as root (capabilities(7)).
WITHOUT_CAPABILITIES = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for cap in range(64):
    libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP
os.execv(sys.argv[1], sys.argv[1:])
"""


def core_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            return " ".join(line.split()[4:6])
    raise AssertionError("no core file size line")


def environ_readable(pid: int) -> bool:
    answer = subprocess.run(
        [sys.executable, "-c", PROBE, str(pid)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert answer in ("denied", "readable"), answer
    return answer == "readable"


def hardened(pid: int) -> bool:
    return core_limit(pid) == "0 0" and not environ_readable(pid)


def wait_until(proc: subprocess.Popen[bytes], check: Callable[[], bool], seconds: float = 20) -> None:
    """Until `check()` holds (start-up hardening runs once the interpreter has started), or fail."""
    deadline = time.monotonic() + seconds
    while not check():
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        assert time.monotonic() < deadline, "not hardened in time"
        time.sleep(0.05)


@pytest.fixture
def dumpable_control() -> None:
    """The probe itself must see a plain process of the same user (else it proves nothing here)."""
    proc = subprocess.Popen([sys.executable, "-c", WITHOUT_CAPABILITIES, "/bin/sleep", "30"])
    while Path(f"/proc/{proc.pid}/cmdline").read_bytes() != b"/bin/sleep\x0030\x00":
        time.sleep(0.01)  # until it has exec'd sleep
    try:
        assert environ_readable(proc.pid)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def silent_apiserver() -> Iterator[int]:
    """A loopback port that accepts connections and never answers: the operator waits on it."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def run_until_hardened(argv: list[str], env: dict[str, str]) -> None:
    argv = [sys.executable, "-c", WITHOUT_CAPABILITIES, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        wait_until(proc, lambda: hardened(proc.pid))
    finally:
        terminate(proc, 10)
        if proc.stderr:
            proc.stderr.close()


def test_relay_serve_disables_core_dumps(tmp_path: Path, dumpable_control: None) -> None:
    argv = [str(VENV_BIN / "outbound-relay"), "serve", "--config", str(tmp_path / "relay.yaml")]
    run_until_hardened([*argv, "--allow-missing-config", "--metrics-port", "0"], {"PATH": os.environ["PATH"]})


def test_operator_disables_core_dumps(tmp_path: Path, dumpable_control: None, silent_apiserver: int) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{silent_apiserver}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]\n"
    )
    argv = [str(VENV_BIN / "outbound-operator"), "--namespace", "x", "--metrics-port", "0", "--liveness", ""]
    run_until_hardened(argv, {"PATH": os.environ["PATH"], "KUBECONFIG": str(kubeconfig)})
