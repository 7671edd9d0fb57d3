"""What the peers share: loopback ports, a directory daemons can read, readiness and clean stops, and
`DaemonPeer`, the lifecycle of a daemon run as our child (Dovecot, Postfix, Hydra)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.peers.certs import TLSFiles, make_tls_files

HOST = "127.0.0.1"


class PeerError(RuntimeError):
    """A peer did not start or stop; the message carries the tail of its log."""


def peer_binaries_missing(*names: str) -> list[str]:
    """The names (absolute paths or commands on PATH) that are not installed."""
    return [name for name in names if not (os.access(name, os.X_OK) or shutil.which(name))]


def require_binaries(what: str, *binaries: str) -> None:
    """Skip the calling test (or fixture) if a peer's binaries are missing; fail instead under CI=true,
    so that a CI machine without the Debian packages can't go green by testing nothing."""
    import pytest  # only tests call this; benchmarks import tests.peers without pytest

    missing = peer_binaries_missing(*binaries)
    if not missing:
        return
    message = f"{what} not installed (missing {', '.join(missing)}); run hack/setup"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def free_port(host: str = HOST) -> int:
    # The kernel picks a free port; it could be taken again before the daemon binds it, but on a
    # test machine's loopback that race is theoretical, and readiness checks would catch it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def shared_workdir(prefix: str = "outbound-relay-peer-") -> Iterator[Path]:
    """A fresh directory under the system temp dir, mode 0755, removed afterwards.

    Daemons drop privileges (dovecot, dovenull, postfix users) and then read config, keys and
    sockets under it; `mktemp -d` and pytest's tmp_path are 0700 and would lock them out.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def check_shared(*paths: Path) -> None:
    """Fail early, and clearly, if a daemon's unprivileged user could not reach these paths: every
    directory above them needs search permission for others (pytest's tmp_path does not have it)."""
    for path in paths:
        for directory in [path, *path.resolve().parents]:
            if directory.is_dir() and not directory.stat().st_mode & 0o001:
                raise PeerError(
                    f"{directory} is not searchable by other users, so the peer's daemons cannot read "
                    f"{path}; use tests.peers.shared_workdir() (mode 0755) instead"
                )


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_for_banner(
    port: int, timeout: float, alive: subprocess.Popen[bytes] | None = None, host: str = HOST
) -> str:
    """Wait until host:port greets with a complete 220 reply; return it."""
    deadline = time.monotonic() + timeout
    last_error = "no attempt"
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise PeerError(f"process exited with {alive.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=2) as sock:
                banner = sock.recv(512).decode(errors="replace")
                if banner.startswith("220 "):
                    sock.sendall(b"QUIT\r\n")
                    return banner.strip()
                last_error = f"unexpected greeting {banner!r}"
        except OSError as exc:
            last_error = str(exc)
        time.sleep(0.05)
    raise PeerError(f"nothing answered 220 on {host}:{port} within {timeout}s ({last_error})")


def stop_process_group(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM a daemon started with start_new_session=True, then SIGKILL whatever is left of its group.

    The master process stops its children on SIGTERM; the group kill is the guarantee that no helper
    (auth, login, smtpd) outlives the test run if the master died first.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class DaemonPeer:
    """A private daemon instance run as our child: a shared working directory (a fresh one unless given),
    TLS files (fresh ones unless given), a process started in its own session and waited for until it
    greets on host:port, and a stop that leaves nothing behind; use as a context manager.

    Subclasses set `name` (working directory names) and `title` (error messages), define `log_file`,
    and implement `_start()` with `_prepare_workdir()` and `_launch()`; one that is not an SMTP server
    overrides `_wait_ready()`.
    """

    name = "peer"
    title = "peer"

    def __init__(
        self, host: str, port: int, workdir: Path | None, tls: TLSFiles | None, startup_timeout: float
    ) -> None:
        self.host = host
        self.port = port
        self._workdir_arg = workdir
        self._tls_arg = tls
        self._startup_timeout = startup_timeout
        self._stack = contextlib.ExitStack()
        self._proc: subprocess.Popen[bytes] | None = None
        self.dir = Path()  # set by start()
        self.tls: TLSFiles | None = None

    @property
    def ca_file(self) -> Path:
        assert self.tls is not None, "not started"
        return self.tls.ca_file

    @property
    def log_file(self) -> Path:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        raise NotImplementedError

    def _prepare_workdir(self) -> None:
        """Set `tls`, and `dir`: `<name>-<port>` under the working directory, not created yet."""
        base = self._workdir_arg or self._stack.enter_context(shared_workdir(f"outbound-relay-{self.name}-"))
        self.tls = self._tls_arg or make_tls_files(base / "tls")
        check_shared(base, self.tls.cert_file.parent)
        self.dir = base / f"{self.name}-{self.port}"

    @property
    def stderr_file(self) -> Path:
        return self.dir / "stderr.log"

    def _launch(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        """Run the daemon in the foreground (stdout and stderr to `stderr_file`) and wait until it is
        ready; a PeerError carries the tails of its logs."""
        output = self._stack.enter_context(self.stderr_file.open("wb"))
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        try:
            self._wait_ready(self._proc)
        except PeerError as exc:
            logs = f"\n--- stderr:\n{log_tail(self.stderr_file)}"
            if self.log_file != self.stderr_file:
                logs += f"\n--- log:\n{log_tail(self.log_file)}"
            raise PeerError(f"{self.title} did not start: {exc}{logs}") from None

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        """Until the daemon greets with 220 on host:port (PeerError if it exits or times out)."""
        wait_for_banner(self.port, self._startup_timeout, alive=proc, host=self.host)

    def stop(self) -> None:
        if self._proc is not None:
            stop_process_group(self._proc)
            self._proc = None
        self._stack.close()
