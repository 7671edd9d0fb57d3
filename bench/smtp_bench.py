"""End-to-end SMTP benchmark: outbound-relay side by side with Postfix as a SASL relay.

Everything runs on loopback in one go, against one upstream: Dovecot submission (STARTTLS required,
AUTH PLAIN), which relays each message it accepts to Postfix's `smtp-sink`. Messages are counted where
they arrive, at the sink, never at acceptance. The paths measured:

- the tools alone: `smtp-source` straight into `smtp-sink`;
- (c) ceiling: a Python client with `sessions` pooled connections, each STARTTLS + AUTH once, sending to
  Dovecot directly (bench/smtp_clients.py `pooled`): what the upstream takes at most;
- (a) relay: `smtp-source` -> `outbound-relay serve` (a subprocess, as deployed) -> Dovecot -> sink,
  twice: with its upstream pool as large as the load's sessions (`maxConnections`), and with relay.yaml
  setting nothing but the policy (every other setting, the pool size included, at its default);
- (b) Postfix: `smtp-source` -> Postfix (`relayhost`, `smtp_sasl_password_maps`,
  `smtp_tls_security_level = encrypt`, everything else default) -> Dovecot -> sink, twice: as that, and
  with `smtp_tls_connection_reuse = yes` (TLS connections kept and reused through tlsproxy(8)).

Then the relay's added latency at a fixed moderate rate (bench/smtp_clients.py `paced`: to Dovecot
directly and through the relay, taking turns), and the relay's memory (VmRSS idle, VmHWM under load,
from /proc/<pid>/status). bench/smtp_report.py prints the table and writes bench/results/smtp-*.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.smtp_report import RESULTS, render, write_results
from tests.peers import DovecotSubmission, PostfixRelay, TLSFiles, make_tls_files, shared_workdir
from tests.peers.common import HOST, PeerError, free_port, log_tail, peer_binaries_missing, wait_for_banner
from tests.peers.dovecot import DOVECOT
from tests.peers.postfix import POSTFIX_BINARIES

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"
USER = "alice"  # one of DovecotSubmission's default users
SENDER = "bench@client.test"
RECIPIENT = "rcpt@upstream.test"
# The relay's idleTimeoutSeconds (default 30): shorter, so that the run sees the pool drain.
RELAY_IDLE_TIMEOUT = 10.0


@dataclass(frozen=True, kw_only=True)
class Settings:
    sessions: int = 20
    """Parallel SMTP sessions of each load generator, and the relay's upstream pool size."""
    size: int = 2048
    """Message body bytes (smtp-source -l)."""
    messages: int = 5000
    """Messages per throughput run of the tools alone, the ceiling and the relay."""
    postfix_messages: int = 1500
    """Messages through Postfix: at its 50-150 msg/s, more would take minutes and tell nothing new."""
    latency_rate: float = 100.0
    """Messages per second of the latency run (both paths together)."""
    latency_messages: int = 1500
    """Messages per path in the latency run."""
    rounds: int = 2
    """Throughput runs of the ceiling and the relay, taking turns; the best of each counts (noise from
    the rest of the machine only ever slows a run down)."""
    relay_defaults: bool = True
    """Also run the relay with relay.yaml setting only its policy: the pool size and the rest at their
    defaults."""
    postfix_reuse: bool = True
    """Also run Postfix with `smtp_tls_connection_reuse = yes`."""
    relay_args: tuple[str, ...] = ()
    """Extra arguments for `outbound-relay serve`, e.g. `--uvloop`."""
    timeout: float = 600.0
    """Seconds one run may take before it is given up."""


QUICK = Settings(messages=1500, postfix_messages=300, latency_messages=400, rounds=1)


# -- the sink ----------------------------------------------------------------------------------------


class SmtpSink:
    """Postfix's smtp-sink on a free 127.0.0.1 port; `-c` makes it print `mesg=<n>` as each "." arrives,
    which a thread turns into a count the harness can wait on."""

    _COUNTER = re.compile(rb"mesg=(\d+)")

    def __init__(self, log_dir: Path) -> None:
        self.host = HOST
        self.port = free_port()
        self._log = log_dir / "smtp-sink.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._changed = threading.Condition()
        self._count = 0

    def __enter__(self) -> SmtpSink:
        # As root it insists on dropping privileges after binding.
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                [SMTP_SINK, "-c", *user, f"{self.host}:{self.port}", "256"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        self._reader = threading.Thread(target=self._read, name="smtp-sink-counter", daemon=True)
        self._reader.start()
        wait_for_banner(self.port, 10, alive=self._proc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    def _read(self) -> None:
        assert self._proc is not None
        assert self._proc.stdout is not None
        pending = b""
        while chunk := os.read(self._proc.stdout.fileno(), 65536):
            # Counters end in "\r"; keep a partial one for the next chunk.
            done, _, pending = (pending + chunk).rpartition(b"\r")
            counts = self._COUNTER.findall(done)
            if counts:
                with self._changed:
                    self._count = int(counts[-1])
                    self._changed.notify_all()

    @property
    def count(self) -> int:
        with self._changed:
            return self._count

    def wait_for(self, count: int, timeout: float) -> bool:
        """True once `count` messages have arrived in all, False if `timeout` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self._count >= count, timeout)


# -- the relay under test ----------------------------------------------------------------------------


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MB (2^20 bytes)."""
    found: dict[str, float] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def relay_command() -> list[str]:
    script = Path(sys.executable).parent / "outbound-relay"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "outbound_relay.cli"]


class RelayProcess:
    """`outbound-relay serve` with a relay.yaml whose one global policy sends everything to Dovecot.
    `pool_size` and `idle_timeout` None leave `maxConnections` and `upstream:` out, to their defaults."""

    def __init__(
        self,
        workdir: Path,
        upstream: DovecotSubmission,
        *,
        pool_size: int | None,
        idle_timeout: float | None = RELAY_IDLE_TIMEOUT,
        extra_args: Sequence[str] = (),
        profile_to: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.dir = workdir / f"relay-{self.port}"
        self.dir.mkdir(mode=0o755)
        self._upstream = upstream
        self._pool_size = pool_size
        self._idle_timeout = idle_timeout
        self._extra_args = tuple(extra_args)
        self._profile_to = profile_to
        self._env = env
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._proc is not None, "not started"
        return self._proc.pid

    @property
    def log_file(self) -> Path:
        return self.dir / "relay.log"

    def config(self) -> str:
        up = self._upstream
        config = f"""\
listen: {{host: {HOST}, port: {self.port}}}
metrics: {{host: {HOST}, port: {free_port()}}}
policies:
  - name: bench/dovecot
    type: PLAIN
    user: {USER}
    password: {up.users[USER]}
    gateway: {{host: {up.host}, port: {up.port}}}
    tls: {{mode: starttls, verify: true, caFile: {up.ca_file}}}
"""
        if self._pool_size is not None:
            config += f"    maxConnections: {self._pool_size}\n"
        if self._idle_timeout is not None:
            config += f"upstream: {{idleTimeoutSeconds: {self._idle_timeout:g}}}\n"
        return config

    def __enter__(self) -> RelayProcess:
        config = self.dir / "relay.yaml"
        config.write_text(self.config())
        serve = ["serve", "--config", str(config), *self._extra_args]
        if self._profile_to is None:
            command = [*relay_command(), *serve]
        else:
            # pyinstrument runs the relay in its own process and saves the session when it exits.
            command = [sys.executable, "-m", "pyinstrument", "-r", "session", "-o", str(self._profile_to)]
            command += ["-m", "outbound_relay.cli", *serve]
        with self.log_file.open("wb") as log:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self._env
            )
        try:
            wait_for_banner(self.port, 30, alive=self._proc)
        except PeerError as error:
            self.__exit__()
            raise PeerError(f"the relay did not start: {error}\n{log_tail(self.log_file)}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            # SIGINT: the relay stops gracefully on it, and pyinstrument then writes its report.
            self._proc.send_signal(signal.SIGINT if self._profile_to else signal.SIGTERM)
            try:
                self._proc.wait(60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)

    def memory(self) -> dict[str, float]:
        return memory_mb(self.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)


# -- runs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    path: str
    messages: int
    seconds: float  # from starting the load generator to the last message at the sink
    delivered: int  # counted at the sink; fewer than messages only if the run failed
    error: str | None = None
    upstream_logins: int | None = None  # AUTH exchanges Dovecot logged meanwhile
    reused: int | None = None  # Postfix: deliveries over a connection an earlier delivery had opened
    rss_peak_mb: float | None = None  # the relay's highest VmRSS sampled during the run
    relay_cpu_ms: float | None = None  # the relay's CPU time (user + system) per delivered message

    @property
    def rate(self) -> float:
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "rate": self.rate}


@dataclass(kw_only=True)
class Bench:
    """The peers of one benchmark run, and the ways to load them."""

    settings: Settings
    workdir: Path
    tls: TLSFiles
    sink: SmtpSink
    dovecot: DovecotSubmission
    say: Callable[[str], None] = print

    def smtp_source(self, host: str, port: int, messages: int) -> list[str]:
        s = self.settings
        # -d: keep each session for the next message, as an app with a connection pool does.
        return [
            SMTP_SOURCE, "-d", "-s", str(s.sessions), "-m", str(messages), "-l", str(s.size),
            "-f", SENDER, "-t", RECIPIENT, "-M", "bench.localhost", f"{host}:{port}",
        ]  # fmt: skip

    def client(self, mode: str, *args: str) -> list[str]:
        up = self.dovecot
        return [
            sys.executable, "-m", "bench.smtp_clients", mode, "--host", up.host, "--port", str(up.port),
            "--ca-file", str(up.ca_file), "--user", USER, "--password", up.users[USER],
            "--size", str(self.settings.size), *args,
        ]  # fmt: skip

    def logins(self) -> int:
        """Successful AUTH exchanges in Dovecot's log so far."""
        with contextlib.suppress(OSError):
            return self.dovecot.log_file.read_text(errors="replace").count(f"Login: user=<{USER}>")
        return 0

    def load(
        self, path: str, command: list[str], messages: int, relay: RelayProcess | None = None
    ) -> LoadResult:
        """Start a load generator and time it until `messages` more have arrived at the sink."""
        base, logins = self.sink.count, self.logins()
        cpu_before = relay.cpu_seconds() if relay is not None else 0.0
        started = time.monotonic()
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        rss_peak, error = 0.0, None
        last_count, last_progress = base, started
        while not self.sink.wait_for(base + messages, 0.05):
            now = time.monotonic()
            if relay is not None:
                rss_peak = max(rss_peak, relay.memory().get("VmRSS", 0.0))
            if proc.poll() not in (None, 0):
                error = f"{Path(command[0]).name} exited with {proc.returncode}"
                break
            if (count := self.sink.count) != last_count:
                last_count, last_progress = count, now
            elif now - last_progress > 60:
                error = "nothing arrived at the sink for 60 s"
                break
            if now - started > self.settings.timeout:
                error = f"not done after {self.settings.timeout:g} s"
                break
        seconds = time.monotonic() - started
        delivered = min(self.sink.count - base, messages)
        relay_cpu = None
        if relay is not None:
            rss_peak = max(rss_peak, relay.memory().get("VmRSS", 0.0))
            relay_cpu = (relay.cpu_seconds() - cpu_before) * 1000 / max(delivered, 1)
        if error is not None and proc.poll() is None:
            proc.kill()
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        if proc.returncode != 0 and error is None:
            error = f"{Path(command[0]).name} exited with {proc.returncode}"
        if error is not None and stderr.strip():
            error += ": " + stderr.decode(errors="replace").strip().splitlines()[-1]
        result = LoadResult(
            path=path,
            messages=messages,
            seconds=seconds,
            delivered=delivered,
            error=error,
            upstream_logins=self.logins() - logins,
            rss_peak_mb=rss_peak if relay is not None else None,
            relay_cpu_ms=relay_cpu,
        )
        self.say(f"{path}: {result.rate:,.1f} msg/s {error or ''}")
        return result

    def postfix(self, path: str, *, tls_connection_reuse: bool) -> LoadResult:
        """A fresh Postfix relaying to Dovecot, loaded like the relay; `reused` from its own log."""
        up, messages = self.dovecot, self.settings.postfix_messages
        with PostfixRelay(
            up.host, up.port, USER, up.users[USER], self.workdir, self.tls,
            tls_connection_reuse=tls_connection_reuse,
        ) as postfix:  # fmt: skip
            result = self.load(path, self.smtp_source(postfix.host, postfix.port, messages), messages)
            try:
                sent = postfix.wait_for_log_count(" status=sent ", result.delivered, timeout=10)
            except TimeoutError as error:
                return replace(result, error=result.error or str(error).splitlines()[0])
        # smtp(8) logs `conn_use=<n>` on a delivery over a connection that served n - 1 before it.
        reused = sum("conn_use=" in line for line in sent)
        self.say(f"{path}: {reused} of {len(sent)} deliveries reused a connection")
        return replace(result, reused=reused)

    def latency(self, relay: RelayProcess) -> dict[str, Any]:
        s = self.settings
        found: dict[str, Any] = {"rate": s.latency_rate, "messages": s.latency_messages}
        command = self.client(
            "paced", "--relay", f"{HOST}:{relay.port}", "--messages", str(s.latency_messages), "--rate",
            str(s.latency_rate),
        )  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, check=False, timeout=6 * s.latency_messages / s.latency_rate + 60
        )
        if not done.stdout.strip():
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
            found["error"] = f"paced client exited with {done.returncode}: {tail[0]}"
            return found
        paced = json.loads(done.stdout)
        found.update(paced["paths"], achieved_rate=paced["achieved_rate"])
        self.say(f"latency at {paced['achieved_rate']:.1f} msg/s done")
        return found


def best(results: list[LoadResult]) -> LoadResult:
    ok = [r for r in results if r.error is None] or results
    return max(ok, key=lambda r: r.rate)


def render_profile(session: Path) -> dict[str, str]:
    """The relay's pyinstrument session as text: the call tree (library frames folded) and a flat list
    of where the time went, self time per function."""
    outputs = {"session": str(session)}
    for view, options in (("tree", []), ("flat", ["-p", "flat=true", "--show-all"])):
        out = session.with_suffix(f".{view}.txt")
        command = [sys.executable, "-m", "pyinstrument", "--load", str(session), "-r", "text", *options]
        subprocess.run([*command, "-o", str(out)], check=True, capture_output=True)
        outputs[view] = str(out)
    return outputs


# -- the whole benchmark -----------------------------------------------------------------------------


@contextlib.contextmanager
def bench_peers(settings: Settings) -> Iterator[Bench]:
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(shared_workdir("outbound-relay-bench-"))
        tls = make_tls_files(workdir / "tls")
        sink = stack.enter_context(SmtpSink(workdir))
        # Dovecot's per user+IP cap must exceed every pool that logs in as USER at once.
        dovecot = DovecotSubmission(
            workdir, tls, relay_to=(sink.host, sink.port), max_userip_connections=4 * settings.sessions
        )
        stack.enter_context(dovecot)
        _progress(f"peers up: smtp-sink {sink.host}:{sink.port}, Dovecot {dovecot.host}:{dovecot.port}")
        yield Bench(settings=settings, workdir=workdir, tls=tls, sink=sink, dovecot=dovecot, say=_progress)


def run_benchmark(settings: Settings, *, mode: str, with_postfix: bool, profile: bool) -> dict[str, Any]:
    s = settings
    results: dict[str, Any] = {
        "mode": mode,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "settings": asdict(s),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    session = RESULTS / f"relay-{time.strftime('%Y%m%d-%H%M%S')}.pyisession"
    with bench_peers(s) as bench:
        tools = bench.load(
            "tools alone", bench.smtp_source(bench.sink.host, bench.sink.port, s.messages), s.messages
        )
        warm = 10 * s.sessions
        bench.load(
            "warm-up", bench.client("pooled", "--messages", str(warm), "--sessions", str(s.sessions)), warm
        )

        profile_to = session if profile else None
        with RelayProcess(bench.workdir, bench.dovecot, pool_size=s.sessions, extra_args=s.relay_args,
                          profile_to=profile_to) as relay:  # fmt: skip
            time.sleep(1.0)  # let start-up settle before calling it idle
            idle = relay.memory()
            _progress(
                f"relay up on {HOST}:{relay.port}, pid {relay.pid}, VmRSS {idle.get('VmRSS', 0):.1f} MB"
            )
            ceilings: list[LoadResult] = []
            relays: list[LoadResult] = []
            defaults: list[LoadResult] = []
            with contextlib.ExitStack() as stack:
                default_relay = None
                if s.relay_defaults and not profile:
                    default_relay = stack.enter_context(
                        RelayProcess(bench.workdir, bench.dovecot, pool_size=None, idle_timeout=None,
                                     extra_args=s.relay_args)
                    )  # fmt: skip
                    _progress(f"relay at its defaults up on {HOST}:{default_relay.port}")
                relay_runs = [("relay", relay, relays)]
                if default_relay is not None:
                    relay_runs.append(("relay, defaults", default_relay, defaults))
                for round_ in range(s.rounds):
                    pooled = bench.client(
                        "pooled", "--messages", str(s.messages), "--sessions", str(s.sessions)
                    )
                    ceilings.append(bench.load("ceiling", pooled, s.messages))
                    # The relays swap places every round, so that neither always follows the ceiling.
                    for path, process, runs in relay_runs[:: -1 if round_ % 2 else 1]:
                        source = bench.smtp_source(HOST, process.port, s.messages)
                        runs.append(bench.load(path, source, s.messages, relay=process))
            latency = {"rate": s.latency_rate} if profile else bench.latency(relay)
            last_used, peak = time.monotonic(), relay.memory().get("VmHWM")

            postfix = postfix_reuse = None
            if with_postfix and not profile:
                if os.geteuid() != 0:
                    _progress("Postfix skipped: a private Postfix instance needs root")
                else:
                    postfix = bench.postfix("postfix", tls_connection_reuse=False)
                    if s.postfix_reuse:
                        postfix_reuse = bench.postfix("postfix, TLS reuse", tls_connection_reuse=True)

            # Idle again: once the reaper (every idleTimeout/2) has closed the pooled sessions.
            drained = last_used + 1.5 * RELAY_IDLE_TIMEOUT + 1
            if not profile and (wait := drained - time.monotonic()) > 0:
                _progress(f"waiting {wait:.0f} s for the relay's pool to drain")
                time.sleep(wait)
            idle_after = relay.memory()
            relay_log = log_tail(relay.log_file, 20)

    results["machine"]["loadavg_end"] = os.getloadavg()
    results["throughput"] = {
        "sink_alone": tools.as_json(),
        "ceiling": best(ceilings).as_json(),
        "relay": best(relays).as_json(),
        "relay_defaults": best(defaults).as_json() if defaults else None,
        "postfix": postfix.as_json() if postfix else None,
        "postfix_reuse": postfix_reuse.as_json() if postfix_reuse else None,
        "rounds": {
            "ceiling": [r.as_json() for r in ceilings],
            "relay": [r.as_json() for r in relays],
            "relay_defaults": [r.as_json() for r in defaults],
        },
    }
    results["latency"] = latency
    results["memory_mb"] = {
        "idle": idle.get("VmRSS"),
        "idle_after_load": idle_after.get("VmRSS"),
        "load_rss_peak": best(relays).rss_peak_mb,
        "load_hwm": peak,
    }
    results["relay_log_tail"] = relay_log
    if profile:
        results["profile"] = render_profile(session)
    return results


def _progress(text: str) -> None:
    print(f"  .. {text}", file=sys.stderr, flush=True)


def check_prerequisites(*, postfix: bool) -> list[str]:
    problems = []
    missing = peer_binaries_missing(SMTP_SINK, SMTP_SOURCE, DOVECOT, relay_command()[0])
    if missing:
        problems.append(f"missing {', '.join(missing)}: run `make setup` (hack/setup)")
    if postfix and peer_binaries_missing(*POSTFIX_BINARIES):
        problems.append("Postfix is not installed: run `make setup` (hack/setup), or pass --no-postfix")
    return problems


def main(settings: Settings, *, mode: str, with_postfix: bool, profile: bool) -> int:
    problems = check_prerequisites(postfix=with_postfix)
    for problem in problems:
        print(f"bench: {problem}", file=sys.stderr)
    if problems:
        return 2
    results = run_benchmark(settings, mode=mode, with_postfix=with_postfix, profile=profile)
    print(render(results))
    print(f"\nresults: {write_results(results)}")
    if profile:
        print(f"profile: {results['profile']['flat']} (flat), {results['profile']['tree']} (tree)")
    # A run that failed is an error; a target missed is a result (and noise can cause it): both print.
    runs = [r for r in results["throughput"].values() if isinstance(r, dict) and "error" in r]
    failed = any(r["error"] for r in runs) or "error" in results["latency"]
    return 1 if failed else 0
