"""The Python load clients of the SMTP benchmark, each run by the harness as its own process (as
`smtp-source` is), so that their CPU is theirs and not the harness's.

- `pooled`: the reference for the upstream's ceiling: `--sessions` connections, each doing STARTTLS and
  AUTH PLAIN once, then sending `--messages` messages between them as fast as the upstream answers.
- `paced`: a fixed-rate sender (`--rate` messages/s, open loop) that times each transaction from its
  MAIL to the reply to DATA, to the upstream directly and (`--relay`) through a relay, the two taking
  turns in blocks so that the rest of the machine weighs on both alike.

Both print one JSON object on stdout. They run on uvloop when it is installed: a client slower than the
upstream would make the ceiling look lower than it is.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import ssl
import statistics
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib

SENDER = "bench@client.test"
RECIPIENT = "rcpt@upstream.test"


def make_message(size: int, sequence: int) -> bytes:
    """A message whose body is `size` bytes of 76-character lines (CRLF included), as smtp-source's
    `-l` counts payload without headers."""
    head = (
        f"From: <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: bench {sequence}\r\n"
        f"Message-ID: <bench-{sequence}-{time.monotonic_ns()}@client.test>\r\n\r\n"
    ).encode()
    line = b"x" * 74 + b"\r\n"
    return head + (line * (size // len(line) + 1))[: max(size - 2, 0)] + b"\r\n"


@dataclass(frozen=True, kw_only=True)
class Target:
    host: str
    port: int
    ca_file: str | None  # STARTTLS with this CA; None: plaintext, no AUTH (a relay on loopback)
    user: str | None
    password: str | None


async def open_session(target: Target) -> aiosmtplib.SMTP:
    context = ssl.create_default_context(cafile=target.ca_file) if target.ca_file else None
    smtp = aiosmtplib.SMTP(
        hostname=target.host,
        port=target.port,
        start_tls=False,
        tls_context=context,
        local_hostname="bench.localhost",
        timeout=60,
    )
    await smtp.connect()
    if context is not None:
        await smtp.starttls()
        await smtp.ehlo()  # AUTH is offered only after a new EHLO
    if target.user is not None and target.password is not None:
        await smtp.auth_plain(target.user, target.password)
    return smtp


async def pooled(target: Target, *, sessions: int, messages: int, size: int) -> dict[str, Any]:
    started = time.perf_counter()
    smtps = await asyncio.gather(*(open_session(target) for _ in range(sessions)))
    ready = time.perf_counter()
    next_sequence = 0
    failures: list[str] = []

    async def worker(smtp: aiosmtplib.SMTP) -> None:
        nonlocal next_sequence
        while next_sequence < messages:
            sequence, next_sequence = next_sequence, next_sequence + 1
            try:
                await smtp.sendmail(SENDER, [RECIPIENT], make_message(size, sequence))
            except aiosmtplib.SMTPException as error:
                failures.append(str(error))

    await asyncio.gather(*(worker(smtp) for smtp in smtps))
    finished = time.perf_counter()
    for smtp in smtps:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()
    return {
        "messages": messages - len(failures),
        "failures": len(failures),
        "first_failure": failures[0] if failures else None,
        "connect_seconds": ready - started,
        "send_seconds": finished - ready,
    }


@dataclass
class _PacedPath:
    idle: asyncio.Queue[aiosmtplib.SMTP]
    latencies: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def paced(
    targets: dict[str, Target], *, rate: float, messages: int, size: int, connections: int, block: int
) -> dict[str, Any]:
    """Send `messages` to each target at `rate`/s in all, whatever the replies do (open loop), on up to
    `connections` sessions per target. Targets take turns in blocks of `block` messages, so that what
    else runs on the machine meanwhile weighs on each alike."""
    paths: dict[str, _PacedPath] = {}
    for name, target in targets.items():
        sessions = await asyncio.gather(*(open_session(target) for _ in range(connections)))
        paths[name] = _PacedPath(asyncio.Queue())
        for smtp in sessions:
            paths[name].idle.put_nowait(smtp)

    async def send(path: _PacedPath, sequence: int, due: float) -> None:
        smtp = await path.idle.get()
        start = time.perf_counter()
        path.waits.append(start - due)
        try:
            await smtp.sendmail(SENDER, [RECIPIENT], make_message(size, sequence))
            path.latencies.append(time.perf_counter() - start)
        except aiosmtplib.SMTPException as error:
            path.failures.append(str(error))
        finally:
            path.idle.put_nowait(smtp)

    # A few unmeasured messages first: the first transaction on a session pays for lazy set-up.
    now = time.perf_counter()
    await asyncio.gather(*(send(path, -1 - i, now) for path in paths.values() for i in range(connections)))
    for path in paths.values():
        path.latencies.clear()
        path.waits.clear()
    tasks: list[asyncio.Task[None]] = []
    names = list(paths)
    begin = time.perf_counter()
    for sequence in range(messages * len(names)):
        due = begin + sequence / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        path = paths[names[sequence // block % len(names)]]
        tasks.append(asyncio.create_task(send(path, sequence, due)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    for path in paths.values():
        while not path.idle.empty():
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await path.idle.get_nowait().quit()
    return {
        "achieved_rate": messages * len(names) / elapsed,
        "paths": {
            name: {
                "messages": len(path.latencies),
                "failures": len(path.failures),
                "first_failure": path.failures[0] if path.failures else None,
                "latency_ms": summarize(path.latencies),
                "queue_wait_ms": summarize(path.waits),
            }
            for name, path in paths.items()
        },
    }


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not sorted_values:
        return float("nan")
    rank = min(max(1, math.ceil(fraction * len(sorted_values))), len(sorted_values))
    return sorted_values[rank - 1]


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    values = sorted(s * 1000 for s in seconds)
    if not values:
        return {}
    return {
        "p50": percentile(values, 0.50),
        "p90": percentile(values, 0.90),
        "p99": percentile(values, 0.99),
        "max": values[-1],
        "mean": statistics.fmean(values),
    }


def run(coroutine: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smtp_clients", description=__doc__)
    parser.add_argument("mode", choices=["pooled", "paced"])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file", help="STARTTLS trusting this CA (else plaintext)")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--messages", type=int, required=True)
    parser.add_argument("--size", type=int, default=2048, help="body bytes per message (2048)")
    parser.add_argument("--sessions", type=int, default=20, help="pooled: connections (20)")
    parser.add_argument("--rate", type=float, default=100.0, help="paced: messages per second (100)")
    parser.add_argument("--connections", type=int, default=10, help="paced: connections per target (10)")
    parser.add_argument("--block", type=int, default=50, help="paced: messages per turn of a target (50)")
    parser.add_argument(
        "--relay",
        metavar="HOST:PORT",
        help="paced: also send through this relay (plaintext, no AUTH), in turns",
    )
    args = parser.parse_args(argv)
    target = Target(
        host=args.host, port=args.port, ca_file=args.ca_file, user=args.user, password=args.password
    )
    if args.mode == "pooled":
        result = run(pooled(target, sessions=args.sessions, messages=args.messages, size=args.size))
        failed = result["failures"]
    else:
        targets = {"direct": target}
        if args.relay:
            host, _, port = args.relay.rpartition(":")
            targets["relay"] = Target(host=host, port=int(port), ca_file=None, user=None, password=None)
        result = run(
            paced(
                targets,
                rate=args.rate,
                messages=args.messages,
                size=args.size,
                connections=args.connections,
                block=args.block,
            )
        )
        failed = sum(path["failures"] for path in result["paths"].values())
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
