"""The Lua worker process: `python -m outbound_relay.lua_process`, started and fed by lua_worker.py.

It reads a setup frame (the hook files, the timeout), loads the files into one sandbox and answers with
the hook names, then answers one request per message. Frames are a 4-byte big-endian length and a JSON
object, both ways. Each request runs under an `ITIMER_PROF` timer of this process's CPU time: a call
stuck inside one C function past hooks x timeout + max(timeout, 10 ms) of CPU is killed by SIGPROF's
default action, and the relay starts a new worker. This module imports little (no asyncio, no
subprocess): every worker's memory is mostly the interpreter, lupa and `email`.
"""

from __future__ import annotations

import json
import os
import signal
import struct
from typing import Any, Final

from outbound_relay.hook_state import LuaScript

FRAME: Final = struct.Struct(">I")
LUA_GRACE_S: Final = 0.010  # the CPU timer: hooks x timeout + max(this, timeout); the count hook comes first
LOAD_CPU_S: Final = 1.0  # per file: the sandbox's limit on top-level code
MAX_PRINTS: Final = 20  # print() lines a call may send back to the relay's log


def cpu_budget_s(hooks: int, timeout_ms: int) -> float:
    return hooks * timeout_ms / 1000 + max(LUA_GRACE_S, timeout_ms / 1000)


def encode(obj: object) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode("ascii")  # ASCII: lone surrogates survive
    return FRAME.pack(len(body)) + body


def main() -> int:
    from outbound_relay.hardening import disable_core_dumps

    disable_core_dumps()  # it holds tokens that hooks set
    signal.signal(signal.SIGPROF, signal.SIG_DFL)  # an inherited "ignore" would disarm the CPU deadline
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C to the relay's terminal is for the relay
    replies = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray write to stdout must not corrupt the protocol
    requests = os.fdopen(0, "rb")  # buffered: one read() per request, header and body
    return _Worker(requests, replies).serve()


class _Worker:
    def __init__(self, requests: Any, replies: Any) -> None:
        self._in = requests
        self._out = replies
        self._prints: list[tuple[str, str]] = []

    def _read_exactly(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            more = self._in.read(size - len(data))
            if not more:
                return None  # the relay closed the pipe or exited: so do we
            data += more
        return data

    def _read(self) -> Any:
        header = self._read_exactly(FRAME.size)
        if header is None:
            return None
        body = self._read_exactly(FRAME.unpack(header)[0])
        return None if body is None else json.loads(body)

    def _write(self, obj: object) -> None:
        self._out.write(encode(obj))

    def _print(self, script: str, text: str) -> None:
        if len(self._prints) < MAX_PRINTS:
            self._prints.append((script, text[:2000]))

    def serve(self) -> int:
        import email.message
        import email.policy

        from outbound_relay.lua_sandbox import LuaHookError, LuaLoadError, LuaSandbox, MessageState

        setup = self._read()
        if setup is None:
            return 0
        scripts = tuple(LuaScript(name=name, source=source) for name, source in setup["scripts"])
        timeout_ms = int(setup["timeout_ms"])
        signal.setitimer(signal.ITIMER_PROF, LOAD_CPU_S * (2 * len(scripts) + 1))
        try:
            if setup["validate"]:
                # One file at a time first, so a failure names its file, then all of them together.
                for i, script in enumerate(scripts):
                    try:
                        LuaSandbox((script,), timeout_ms=timeout_ms, printer=self._print)
                    except LuaLoadError as error:
                        self._write({"load_error": f"hooks.lua[{i}] {script.name!r}: {error}"})
                        return 0
            try:
                sandbox: LuaSandbox | None = LuaSandbox(scripts, timeout_ms=timeout_ms, printer=self._print)
            except LuaLoadError as error:
                self._write({"load_error": f"hooks.lua: the files fail when loaded together: {error}"})
                return 0
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
        assert sandbox is not None
        self._write({"hooks": [hook.name for hook in sandbox.hooks], "print": self._prints})
        budget = cpu_budget_s(len(sandbox.hooks), timeout_ms)
        policies = {"email": email.policy.SMTP, "compat32": email.policy.compat32}
        while (request := self._read()) is not None:
            self._prints = []
            headers = email.message.Message(policy=policies[request["policy"]])
            for name, value in request["headers"]:
                headers.set_raw(name, value)
            state = MessageState(
                mailfrom=request["mailfrom"],
                rcptto=tuple(request["rcptto"]),
                headers=headers,
                binding=request["binding"],
                context=request["context"],
            )
            signal.setitimer(signal.ITIMER_PROF, budget)
            try:
                if sandbox is None or sandbox.needs_rebuild:
                    sandbox = None
                    sandbox = LuaSandbox(scripts, timeout_ms=timeout_ms, printer=self._print)
                sandbox.run(state)
                reply: dict[str, object] = {"context": state.context, "binding": state.binding}
            except LuaLoadError as error:  # loaded fine once; a file whose top level is not deterministic
                reply = {"error": f"lua hooks: reloading failed: {error}", "kind": "error", "hook": "lua"}
            except LuaHookError as error:
                reply = {"error": str(error), "kind": error.kind, "hook": error.hook}
            finally:
                signal.setitimer(signal.ITIMER_PROF, 0)
            reply["print"] = self._prints
            self._write(reply)
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
