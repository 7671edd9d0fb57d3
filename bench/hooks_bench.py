"""Cost per message of one hook call: Momentum's Lua example and the same in Python, through `HookChain.run`.

Run from the repository root: `.venv/bin/python -m bench.hooks_bench [--calls 20000]`. Prints median and
p99 per call, for:
- lua: Momentum's first example verbatim (three `context_set` calls), worker thread included;
- python: the same three sets in a Python hook, worker thread included;
- python-noop: an empty Python hook through the same path: the cost of the path itself;
- lua-direct: Momentum's example in the sandbox, called in this thread (no worker hop): the Lua part alone;
- dict-update: the three keys put into the context dict directly: the floor.
A call that misses its deadline (a loaded machine) is timed like the others and counted under "failed".
Then the CPU time per lua call (this process, and any Lua worker process it started), which a loaded
machine distorts less than wall time, and `--stalls N` times a hook stuck inside one C call (a
backtracking pattern on a 3000-character header): how long until that message fails, and how long the
next message then takes (a new worker, when the relay kills the stuck one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import email.parser
import email.policy
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from outbound_relay.config import Hooks
from outbound_relay.hooks import VCTX_MESS, HookChain, HookError, HookMessage, PythonHookMsg
from outbound_relay.lua_sandbox import LuaSandbox, LuaScript, MessageState

SEED_LUA = """\
local mod = {}
function mod:outbound_smtp_auth_config(msg)
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_type', 'XOAUTH2')
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_user', 'test@contoso.onmicrosoft.com')
  msg:context_set(VCTX_MESS, 'outbound_smtp_auth_pass', 'EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA')
end
msys.registerModule("my_auth", mod)
"""
HEADERS = b"From: app@example.com\r\nTo: a@bird.com\r\nSubject: hello\r\nX-Binding: bulk\r\n\r\n"
SEED_CONTEXT = {
    "outbound_smtp_auth_type": "XOAUTH2",
    "outbound_smtp_auth_user": "test@contoso.onmicrosoft.com",
    "outbound_smtp_auth_pass": "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
}


def seed_python(msg: PythonHookMsg) -> None:
    msg.context_set(VCTX_MESS, "outbound_smtp_auth_type", "XOAUTH2")
    msg.context_set(VCTX_MESS, "outbound_smtp_auth_user", "test@contoso.onmicrosoft.com")
    msg.context_set(VCTX_MESS, "outbound_smtp_auth_pass", "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA")


def noop_python(msg: PythonHookMsg) -> None:
    return None


HEADER_OBJECT = email.parser.BytesHeaderParser(policy=email.policy.SMTP).parsebytes(HEADERS)


def message() -> HookMessage:
    return HookMessage(
        mailfrom="app@example.com", rcptto=("a@bird.com",), headers=HEADER_OBJECT, binding="default"
    )


FAILED: dict[str, int] = {}  # calls that raised HookError (a deadline missed on a loaded machine), by case


async def measure_async(name: str, call: Callable[[], Awaitable[None]], calls: int) -> list[float]:
    for _ in range(min(calls // 10, 1000)):
        with contextlib.suppress(HookError):
            await call()
    samples = []
    FAILED[name] = 0
    for _ in range(calls):
        start = time.perf_counter_ns()
        try:
            await call()
        except HookError:
            FAILED[name] += 1
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


def measure(call: Callable[[], object], calls: int) -> list[float]:
    for _ in range(min(calls // 10, 1000)):
        call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        samples.append((time.perf_counter_ns() - start) / 1000)
    return samples


STALL_LUA = """\
local mod = {}
function mod:outbound_smtp_auth_config(msg)
  local long = msg:header('X-Long')
  if long then long:find('(.-)x(.-)x(.-)y') end
  msg:context_set(VCTX_MESS, 'ok', 'yes')
end
msys.registerModule("stall", mod)
"""


def children_cpu_s() -> float:
    """User and system CPU time of this process's live children (a Lua worker process)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def stalls(times: int) -> tuple[list[float], list[float], int]:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "stall.lua").write_text(STALL_LUA)
        chain = HookChain.load(Hooks(lua=(Path("stall.lua"),)), Path(tmp))
    await chain.run(message())
    to_fail, next_ok, next_failed = [], [], 0
    for _ in range(times):
        stuck = message()
        stuck.headers = email.parser.BytesHeaderParser(policy=email.policy.SMTP).parsebytes(
            HEADERS[:-2] + b"X-Long: " + b"x" * 3000 + b"\r\n\r\n"
        )
        start = time.perf_counter()
        with contextlib.suppress(HookError):
            await chain.run(stuck)
        failed_at = time.perf_counter()
        try:
            await chain.run(message())
        except HookError:
            next_failed += 1
        to_fail.append((failed_at - start) * 1000)
        next_ok.append((time.perf_counter() - failed_at) * 1000)
    chain.close()
    return to_fail, next_ok, next_failed


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


async def main(calls: int, stall_count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "seed.lua").write_text(SEED_LUA)
        lua = HookChain.load(Hooks(lua=(Path("seed.lua"),)), Path(tmp))
    python = HookChain.load(Hooks(python=(f"{__name__}:seed_python",)), Path("."))
    noop = HookChain.load(Hooks(python=(f"{__name__}:noop_python",)), Path("."))
    sandbox = LuaSandbox((LuaScript(name="seed.lua", source=SEED_LUA),), timeout_ms=50)
    template = message()

    def state() -> MessageState:
        return MessageState(
            mailfrom=template.mailfrom, rcptto=template.rcptto, headers=template.headers, binding="default"
        )

    def dict_update() -> None:
        context: dict[str, str] = {}
        context.update(SEED_CONTEXT)

    cpu_before = time.process_time(), children_cpu_s()
    lua_samples = await measure_async("lua", lambda: lua.run(message()), calls)
    cpu_after = time.process_time(), children_cpu_s()
    results = {
        "lua": lua_samples,
        "python": await measure_async("python", lambda: python.run(message()), calls),
        "python-noop": await measure_async("python-noop", lambda: noop.run(message()), calls),
        "lua-direct": measure(lambda: sandbox.run(state()), calls),
        "dict-update": measure(dict_update, calls),
    }
    floor = statistics.median(results["python-noop"])
    print(f"{calls} calls each; microseconds per message")
    print(f"{'':14}{'median':>10}{'p99':>10}{'median / python-noop':>24}{'failed':>8}")
    for name, samples in results.items():
        median = statistics.median(samples)
        failed = FAILED.get(name, 0)
        print(f"{name:14}{median:10.1f}{p99(samples):10.1f}{median / floor:24.2f}{failed:8}")
    for chain in (lua, python, noop):
        chain.close()
    relay_cpu = (cpu_after[0] - cpu_before[0]) / (calls + min(calls // 10, 1000)) * 1e6
    worker_cpu = (cpu_after[1] - cpu_before[1]) / (calls + min(calls // 10, 1000)) * 1e6
    print(f"lua CPU per call: {relay_cpu:.1f} us in this process, {worker_cpu:.1f} us in a worker process")
    if stall_count:
        to_fail, next_ok, next_failed = await stalls(stall_count)
        print(
            f"{stall_count} stalls in C: the stuck message fails after {statistics.median(to_fail):.0f} ms "
            f"(median), the next message takes {statistics.median(next_ok):.0f} ms "
            f"(max {max(next_ok):.0f}); {next_failed} next messages failed"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--stalls", type=int, default=5, help="hooks stuck in C to time (5); 0 skips")
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.stalls))
