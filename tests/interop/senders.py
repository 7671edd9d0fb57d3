"""The real SMTP clients of the interop matrix (docs/interop.md), each run as an app would run it against
the relay's listener. Each sender takes the same envelope and raw message file and answers whether it
reported success, with its own output.

Installed by the project itself, cached under ~/.cache/outbound-relay/interop/ (keyed by the source's
digest): swaks and msmtp come from Debian (hack/setup), smtplib with Python, Go's net/smtp is built from
tests/interop/main.go with the machine's Go, nodemailer is `npm install`ed from tests/interop/package.json,
Jakarta Mail is fetched with Maven and tests/interop/Send.java compiled with the machine's JDK.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import smtplib
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "outbound-relay" / "interop"


@dataclass(frozen=True)
class Send:
    """One submission: what the app hands its mail library."""

    port: int
    mail_from: str
    rcpts: tuple[str, ...]
    file: Path
    user: str | None = None  # AUTH with any password when set
    pipelining: bool = False  # ask the client to pipeline where it has a switch for it
    smtputf8: bool = False  # the envelope has non-ASCII addresses

    password = "app-password"


@dataclass(frozen=True)
class Result:
    ok: bool
    output: str


def _run(argv: list[str], stdin: Path | None = None, env: dict[str, str] | None = None) -> Result:
    with open(stdin or os.devnull, "rb") as data:
        proc = subprocess.run(argv, stdin=data, capture_output=True, timeout=120, check=False, env=env)
    return Result(proc.returncode == 0, (proc.stdout + proc.stderr).decode("utf-8", "replace"))


def swaks(send: Send) -> Result:
    argv = ["swaks", "--server", f"127.0.0.1:{send.port}", "--helo", "app.test", "--from", send.mail_from]
    argv += ["--to", ",".join(send.rcpts), "--data", "-", "--timeout", "60"]
    if send.user:
        argv += ["--auth", "PLAIN", "--auth-user", send.user, "--auth-password", send.password]
    if send.pipelining:
        argv += ["--pipeline"]
    return _run(argv, stdin=send.file)


def msmtp(send: Send) -> Result:
    argv = ["msmtp", "--host=127.0.0.1", f"--port={send.port}", "--tls=off", f"--from={send.mail_from}"]
    argv += ["--domain=app.test", "--timeout=60"]
    if send.user:
        argv += ["--auth=plain", f"--user={send.user}", f"--passwordeval=echo {send.password}"]
    else:
        argv += ["--auth=off"]
    return _run([*argv, "--", *send.rcpts], stdin=send.file)


def python_smtplib(send: Send) -> Result:
    try:
        with smtplib.SMTP("127.0.0.1", send.port, local_hostname="app.test", timeout=60) as client:
            if send.user:
                client.login(send.user, send.password)
            options = ["SMTPUTF8"] if send.smtputf8 else []
            refused = client.sendmail(send.mail_from, list(send.rcpts), send.file.read_bytes(), options)
    except (smtplib.SMTPException, OSError) as error:
        return Result(False, f"{type(error).__name__}: {error}")
    return Result(not refused, f"refused: {refused}")


def go_net_smtp(send: Send) -> Result:
    binary = _cached_build(*_GO)
    argv = [str(binary), f"127.0.0.1:{send.port}", send.mail_from, send.user or "", send.password]
    return _run([*argv, str(send.file), *send.rcpts])


def nodemailer(send: Send) -> Result:
    modules = _cached_build(*_NODE)
    argv = ["node", str(HERE / "send.js"), str(send.port), send.mail_from, send.user or "", send.password]
    env = {**os.environ, "NODE_PATH": str(modules / "node_modules")}
    return _run([*argv, str(send.file), *send.rcpts], env=env)


def jakarta_mail(send: Send) -> Result:
    classes = _cached_build(*_JAVA)
    classpath = (classes / "classpath").read_text().strip() + os.pathsep + str(classes)
    argv = ["java", "-cp", classpath, "Send", str(send.port), send.mail_from, send.user or "", send.password]
    return _run([*argv, str(send.file), *send.rcpts])


def _build_java(sources: list[Path], out: Path) -> Path:
    """Jakarta Mail from Maven Central into a private local repository, then Send.java compiled."""
    out.mkdir(parents=True)
    repo = CACHE / "m2"
    mvn = ["mvn", "-q", "-B", f"-Dmaven.repo.local={repo}"]
    subprocess.run([*mvn, "dependency:get", f"-Dartifact={ANGUS_MAIL}"], cwd=out, check=True, timeout=600)
    # dependency:get fetches the jars; build-classpath needs a project, so list the jars ourselves.
    jars = [str(path) for path in sorted(repo.rglob("*.jar")) if _is_mail_jar(path)]
    (out / "classpath").write_text(os.pathsep.join(jars))
    javac = ["javac", "-d", str(out), "-cp", os.pathsep.join(jars), str(HERE / "Send.java")]
    subprocess.run(javac, check=True, timeout=300)
    return out


def _is_mail_jar(path: Path) -> bool:
    return path.parent.parent.name in {
        "angus-mail",
        "angus-activation",
        "jakarta.mail-api",
        "jakarta.activation-api",
    }


def _build_go(sources: list[Path], out: Path) -> Path:
    out.mkdir(parents=True)
    binary = out / "gosend"
    env = {**os.environ, "GOFLAGS": "-mod=mod", "CGO_ENABLED": "0"}
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=HERE, check=True, env=env, timeout=300)
    return binary


def _npm_install(sources: list[Path], out: Path) -> Path:
    out.mkdir(parents=True)
    shutil.copy(HERE / "package.json", out / "package.json")
    subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--omit=dev", "--silent"],
        cwd=out,
        check=True,
        timeout=300,
    )
    return out


def _cached_build(name: str, sources: list[Path], build: Callable[[list[Path], Path], Path]) -> Path:
    """Build once per source digest, under a lock: parallel test runs share the cache."""
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]
    out = CACHE / f"{name}-{digest}"
    done = out / ".done"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            result = build(sources, out)
            (out / ".result").write_text(str(result))
            done.touch()
    return Path((out / ".result").read_text())


_GO = ("gosend", [HERE / "main.go", HERE / "go.mod"], _build_go)
_NODE = ("node", [HERE / "package.json"], _npm_install)
ANGUS_MAIL = "org.eclipse.angus:angus-mail:2.0.3"  # Jakarta Mail 2.1, as Spring Boot 3 and 4 use
_JAVA = ("java", [HERE / "Send.java"], _build_java)

SENDERS: dict[str, tuple[Callable[[Send], Result], str]] = {
    # name: (sender, the program it needs on PATH)
    "swaks": (swaks, "swaks"),
    "msmtp": (msmtp, "msmtp"),
    "python-smtplib": (python_smtplib, sys.executable),
    "go-net-smtp": (go_net_smtp, "go"),
    "nodemailer": (nodemailer, "node"),
    "jakarta-mail": (jakarta_mail, "mvn"),
}


def build_all() -> None:
    """Install the senders that are built, not packaged, whose toolchain the machine has (hack/setup)."""
    for tool, build in (("go", _GO), ("npm", _NODE), ("mvn", _JAVA)):
        if shutil.which(tool) is None:
            print(f"setup: {tool} is missing: the interop matrix will skip {build[0]}", file=sys.stderr)
        else:
            _cached_build(*build)


if __name__ == "__main__":
    build_all()
