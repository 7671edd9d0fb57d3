"""Memory per message stays close to one copy of the body: the relay, run as a process in a memory
cgroup limited to the sidecar's default (operator/outbound_operator/injection.py: 256Mi), relays two
messages of the maximum size at once, and its peak usage stays under the limit."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from outbound_operator.injection import Resources
from tests.support.faulty import FaultyUpstream, plain_policy
from tests.support.relay import submit, write_config
from tests.unit.test_cli import free_port, wait_listening

MESSAGE_SIZE = 10_240_000  # limits.messageSizeBytes' default


def _limit_bytes() -> int:
    memory = Resources().limits.memory
    assert memory is not None and memory.endswith("Mi"), memory
    return int(memory[:-2]) * 1024 * 1024


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path]:
    """A child of this process's cgroup v1 memory cgroup, limited to `limit` bytes."""
    line = next((x for x in Path("/proc/self/cgroup").read_text().splitlines() if ":memory:" in x), None)
    parent = Path("/sys/fs/cgroup/memory") / line.split(":", 2)[2].lstrip("/") if line else None
    if parent is None or not os.access(parent, os.W_OK):
        if os.environ.get("CI") == "true":
            pytest.fail("no writable cgroup v1 memory controller: the memory bound cannot be checked")
        pytest.skip("no writable cgroup v1 memory controller")
    group = parent / f"relay-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        yield group
    finally:
        with contextlib.suppress(OSError):
            group.rmdir()


async def test_two_maximum_size_messages_in_parallel_stay_under_the_sidecar_limit(config_path: Path) -> None:
    limit = _limit_bytes()
    body = (b"x" * 76 + b"\r\n") * (MESSAGE_SIZE // 78 - 10)
    content = b"Subject: big\r\n\r\n" + body
    async with FaultyUpstream() as up:
        port = free_port()
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        data = yaml.safe_load(config_path.read_text())
        data["listen"]["port"], data["metrics"]["enabled"] = port, False
        config_path.write_text(yaml.safe_dump(data))
        with memory_cgroup(limit) as group:
            procs = str(group / "cgroup.procs")

            def enter_group() -> None:
                Path(procs).write_text(str(os.getpid()))

            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "outbound_relay.cli", "serve", "--config", str(config_path),
                stderr=asyncio.subprocess.PIPE, preexec_fn=enter_group,
            )  # fmt: skip
            try:
                await wait_listening(port, proc)
                outcomes = await asyncio.gather(
                    submit(port, ["a@example.net"], content), submit(port, ["b@example.net"], content)
                )
                peak = int((group / "memory.max_usage_in_bytes").read_text())
                failures = int((group / "memory.failcnt").read_text())
            finally:
                proc.terminate()
                await proc.wait()
    assert [o.code for o in outcomes] == [250, 250], outcomes
    assert len(up.messages) == 2
    assert failures == 0 and peak < limit, f"peak {peak / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB"
    print(f"relay peak memory with two {MESSAGE_SIZE}-octet messages: {peak / 2**20:.0f} MiB")
