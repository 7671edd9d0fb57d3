"""Hooks cannot wedge the relay: Lua runs in a worker process that is killed at its own CPU deadline and
replaced, a deadline counts a call's execution (not its wait in the queue), and /healthz reports a relay
that can no longer run hooks."""

from __future__ import annotations

import asyncio
import gc
import http.client
import os
import signal
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest

from outbound_relay.hooks import VCTX_MESS, HookError, PythonHookMsg
from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream
from tests.unit.test_hooks import chain, lua_module, lua_workers
from tests.unit.test_hooks import message as hook_message

# A backtracking pattern on a long header runs inside one C call (string.find), where Lua's count hook
# never fires: on 3000 characters it would take minutes.
STALL = (
    "local long = msg:header('X-Long')\n"
    "if long then long:find('(.-)x(.-)x(.-)y') end\n"
    "msg:context_set(VCTX_MESS, 'ok', 'yes')"
)
LONG_HEADER = "x" * 3000
SPIN = "local n = 0\nfor i = 1, 1500000 do n = n + i end\nmsg:context_set(VCTX_MESS, 'n', n)"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def wait_until(condition: object, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def python_stuck(msg: PythonHookMsg) -> None:
    if msg.header("X-Stuck"):
        time.sleep(1.5)


def python_naps(msg: PythonHookMsg) -> None:
    time.sleep(0.08)
    msg.context_set(VCTX_MESS, "napped", "yes")


class TestStuckLuaHooks:
    async def test_many_c_stalls_in_a_row_then_normal_messages_run(self, tmp_path: Path) -> None:
        hooks = chain(tmp_path, lua_module(STALL))
        for _ in range(5):  # the thread-based chain this replaced gave up for good after two
            bad = hook_message()
            bad.headers["X-Long"] = LONG_HEADER
            started = time.monotonic()
            with pytest.raises(HookError) as caught:
                await hooks.run(bad)
            assert caught.value.kind == "timeout"
            assert time.monotonic() - started < 5
            assert bad.context == {}
        for _ in range(3):
            good = hook_message()
            await hooks.run(good)
            assert good.context == {"ok": "yes"}
        assert hooks.health() is None
        hooks.close()

    async def test_waiting_messages_are_not_failed_by_a_stall_ahead_of_them(self, tmp_path: Path) -> None:
        hooks = chain(tmp_path, lua_module(STALL))
        await hooks.run(hook_message())  # the worker is up
        bad = hook_message()
        bad.headers["X-Long"] = LONG_HEADER
        goods = [hook_message() for _ in range(5)]
        results = await asyncio.gather(hooks.run(bad), *(hooks.run(g) for g in goods), return_exceptions=True)
        assert isinstance(results[0], HookError) and results[0].kind == "timeout"
        assert results[1:] == [None] * 5
        assert all(g.context == {"ok": "yes"} for g in goods)
        hooks.close()

    async def test_no_process_or_thread_is_left_behind_after_repeated_kills(self, tmp_path: Path) -> None:
        gc.collect()  # chains of earlier tests, and their workers
        assert lua_workers() == []
        hooks = chain(tmp_path, lua_module(STALL))

        async def stall(times: int) -> None:
            for _ in range(times):
                bad = hook_message()
                bad.headers["X-Long"] = LONG_HEADER
                with pytest.raises(HookError):
                    await hooks.run(bad)
            await hooks.run(hook_message())

        await stall(1)
        (first,) = lua_workers()
        first_rss = rss_kib(first)
        threads = threading.active_count()  # the event loop's executor threads included by now
        await stall(6)
        (current,) = lua_workers()  # one worker, the dead ones reaped
        assert current != first
        # A fresh process each time: its memory is that of the first, not growing with each kill.
        assert rss_kib(current) < first_rss * 1.5 + 4096
        await wait_until(lambda: threading.active_count() <= threads)  # a start's thread ends with it
        hooks.close()
        assert lua_workers() == []

    async def test_a_worker_killed_from_outside_is_replaced(self, tmp_path: Path) -> None:
        gc.collect()  # chains of earlier tests, and their workers
        hooks = chain(tmp_path, lua_module(STALL))
        await hooks.run(hook_message())
        (first,) = lua_workers()
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: lua_workers() and lua_workers() != [first])
        good = hook_message()
        await hooks.run(good)
        assert good.context == {"ok": "yes"}
        hooks.close()


class TestReload:
    async def test_each_reload_replaces_the_worker(self, tls: TLSFiles, config_path: Path) -> None:
        gc.collect()  # chains of earlier tests, and their workers
        hook = config_path.parent / "auth.lua"
        hook.write_text(lua_module("msg:context_set(VCTX_MESS, 'g', '0')"))
        async with AuthUpstream(tls, users={"u": "p"}) as up:
            write_config(
                config_path, {"policies": [catch_all_policy(up.port, tls)], "hooks": {"lua": ["auth.lua"]}}
            )
            async with running_relay(config_path) as relay:
                for generation in range(1, 4):
                    assert (await submit(relay.port, ["a@x.org"], message())).code == 250
                    (before,) = lua_workers()
                    old = weakref.ref(relay.generation)
                    hook.write_text(lua_module(f"msg:context_set(VCTX_MESS, 'g', '{generation}')"))
                    # Once the old generation is gone (no transaction holds it), so is its worker.
                    await wait_until(lambda: old() is None)  # noqa: B023 (awaited here)
                    await wait_until(lambda: len(lua_workers()) == 1 and lua_workers() != [before])  # noqa: B023
                assert (await submit(relay.port, ["a@x.org"], message())).code == 250
            del relay
        gc.collect()
        assert lua_workers() == []


class TestDeadlineCountsExecution:
    async def test_lua_calls_queued_behind_slow_ones_are_not_timed_out(self, tmp_path: Path) -> None:
        timeout_ms = 250
        hooks = chain(tmp_path, lua_module(SPIN), timeout_ms=timeout_ms)
        started = time.monotonic()
        await hooks.run(hook_message())
        one = time.monotonic() - started
        # Enough calls that the last waits several deadlines (hooks x timeout + timeout) in the queue.
        count = min(150, int(3 * 2 * timeout_ms / 1000 / one) + 2)
        msgs = [hook_message() for _ in range(count)]
        results = await asyncio.gather(*(hooks.run(m) for m in msgs), return_exceptions=True)
        assert results == [None] * count
        assert all(m.context == {"n": str(sum(range(1500001)))} for m in msgs)
        hooks.close()

    async def test_python_calls_queued_behind_slow_ones_are_not_timed_out(self, tmp_path: Path) -> None:
        hooks = chain(tmp_path, python=(f"{__name__}:python_naps",), timeout_ms=250)
        msgs = [hook_message() for _ in range(24)]  # 6 rounds of 4 threads x 80 ms: 480 ms for the last
        results = await asyncio.gather(*(hooks.run(m) for m in msgs), return_exceptions=True)
        assert results == [None] * len(msgs)
        hooks.close()


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


class TestLiveness:
    async def test_healthz_fails_while_the_worker_cannot_be_restarted(
        self, tls: TLSFiles, config_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        (config_path.parent / "auth.lua").write_text(lua_module(STALL))
        async with AuthUpstream(tls, users={"u": "p"}) as up:
            write_config(
                config_path, {"policies": [catch_all_policy(up.port, tls)], "hooks": {"lua": ["auth.lua"]}}
            )
            async with running_relay(config_path) as relay:
                port = relay.metrics_port
                assert port is not None
                assert await asyncio.to_thread(get, port, "/healthz") == (200, "ok\n")
                assert (await submit(relay.port, ["a@x.org"], message())).code == 250

                # The worker dies and every restart fails at once.
                from outbound_relay import lua_worker

                monkeypatch.setattr(lua_worker, "WORKER_ARGV", (sys.executable, "-c", "raise SystemExit(3)"))
                (pid,) = lua_workers()
                os.kill(pid, signal.SIGKILL)

                async def unhealthy() -> tuple[int, str]:
                    while (answer := await asyncio.to_thread(get, port, "/healthz"))[0] == 200:
                        await asyncio.sleep(0.05)
                    return answer

                status, body = await asyncio.wait_for(unhealthy(), 20)
                assert status == 503
                assert "lua hooks" in body and "exit code 3" in body
                outcome = await submit(relay.port, ["a@x.org"], message())
                assert outcome.code == 451

                monkeypatch.undo()  # the next restart succeeds: mail flows, and a delivery proves it healthy
                await asyncio.wait_for(self._until_delivered(relay.port), 30)
                assert await asyncio.to_thread(get, port, "/healthz") == (200, "ok\n")
                metrics = (await asyncio.to_thread(get, port, "/metrics"))[1]
                assert "outbound_relay_messages_total" in metrics

    async def test_health_reports_a_worker_that_keeps_dying(self, tmp_path: Path) -> None:
        gc.collect()  # chains of earlier tests, and their workers
        hooks = chain(tmp_path, lua_module(STALL))
        await hooks.run(hook_message())
        assert hooks.health() is None
        for _ in range(3):
            (pid,) = lua_workers()
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: lua_workers() not in ([], [pid]))  # noqa: B023 (awaited here)
        await wait_until(lambda: hooks.health() is not None)
        assert (hooks.health() or "").startswith(
            "lua hooks: the Lua worker process died or failed to start 3 "
        )
        good = hook_message()
        deadline = time.monotonic() + 20
        while True:  # the worker being started may be one that was killed: it is retried with backoff
            try:
                await hooks.run(good)
                break
            except HookError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert good.context == {"ok": "yes"}
        assert hooks.health() is None
        hooks.close()

    async def test_health_reports_python_threads_all_stuck(self, tmp_path: Path) -> None:
        hooks = chain(tmp_path, python=(f"{__name__}:python_stuck",), timeout_ms=50)
        stuck = [hook_message() for _ in range(4)]
        for msg in stuck:
            msg.headers["X-Stuck"] = "1"
        results = await asyncio.gather(*(hooks.run(m) for m in stuck), return_exceptions=True)
        assert all(isinstance(r, HookError) and r.kind == "timeout" for r in results)
        assert hooks.health() == "python hooks: all 4 threads are stuck in calls past their deadline"
        with pytest.raises(HookError, match="all 4 worker threads are stuck"):
            await hooks.run(hook_message())
        await wait_until(lambda: hooks.health() is None)  # the calls returned: the threads are free
        await hooks.run(hook_message())
        hooks.close()

    @staticmethod
    async def _until_delivered(port: int) -> None:
        while (await submit(port, ["a@x.org"], message())).code != 250:
            await asyncio.sleep(0.1)

    async def test_healthz_is_ok_without_hooks(self, tls: TLSFiles, config_path: Path) -> None:
        write_config(config_path, {"policies": [catch_all_policy(1, tls)]})
        async with running_relay(config_path) as relay:
            assert relay.metrics_port is not None
            assert await asyncio.to_thread(get, relay.metrics_port, "/healthz") == (200, "ok\n")
