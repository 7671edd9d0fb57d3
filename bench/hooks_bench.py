"""Cost per message of one hook call: the seed's Lua example and the same in Python, through `HookChain.run`.

Run from the repository root: `.venv/bin/python -m bench.hooks_bench [--calls 20000]`. Prints median and
p99 per call, for:
- lua: the seed's first example verbatim (three `context_set` calls), worker thread included;
- python: the same three sets in a Python hook, worker thread included;
- python-noop: an empty Python hook through the same path: the cost of the path itself;
- lua-direct: the seed example in the sandbox, called in this thread (no worker hop): the Lua part alone;
- dict-update: the three keys put into the context dict directly: the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import email.parser
import email.policy
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from outbound_relay.config import Hooks
from outbound_relay.hooks import VCTX_MESS, HookChain, HookMessage, PythonHookMsg
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


async def measure_async(call: Callable[[], Awaitable[None]], calls: int) -> list[float]:
    for _ in range(min(calls // 10, 1000)):
        await call()
    samples = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        await call()
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


def p99(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=100)[98]


async def main(calls: int) -> None:
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

    results = {
        "lua": await measure_async(lambda: lua.run(message()), calls),
        "python": await measure_async(lambda: python.run(message()), calls),
        "python-noop": await measure_async(lambda: noop.run(message()), calls),
        "lua-direct": measure(lambda: sandbox.run(state()), calls),
        "dict-update": measure(dict_update, calls),
    }
    floor = statistics.median(results["python-noop"])
    print(f"{calls} calls each; microseconds per message")
    print(f"{'':14}{'median':>10}{'p99':>10}{'median / python-noop':>24}")
    for name, samples in results.items():
        median = statistics.median(samples)
        print(f"{name:14}{median:10.1f}{p99(samples):10.1f}{median / floor:24.2f}")
    for chain in (lua, python, noop):
        chain.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20_000)
    asyncio.run(main(parser.parse_args().calls))
