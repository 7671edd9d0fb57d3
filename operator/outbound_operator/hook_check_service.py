"""The Lua hook check as a service of its own, `outbound-hook-checker`, and the operator's call to it.

A hook's top level is code from whoever may write a ConfigMap in an opted-in namespace, and checking a
hook runs it (in the relay's sandbox, lua_sandbox.py). In the chart the checker is a second container of
the operator's Pod, with no ServiceAccount token (docs/security.md, "Lua hooks"): code that got out of the
sandbox there would find no credentials, and none of the operator's memory, files or Secrets. The two
containers share an emptyDir with one Unix socket in it, for its owner only.

The wire: one connection per check; the operator writes one JSON line, `{"scripts": [{"name", "source"}],
"timeoutMs"}`, and reads one back, `{"ok": true}` or `{"ok": false, "error", "inFiles"}`, whose error is
lua_worker's message (it names the file, never a hook's own text).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from outbound_relay.hardening import disable_core_dumps
from outbound_relay.hook_state import LuaScript
from outbound_relay.lua_process import LOAD_CPU_S
from outbound_relay.lua_worker import START_WALL_S, WorkerStartError, check_scripts

log = logging.getLogger("outbound_operator.hook_checker")

# Hook sources go into the rendered Secret, which the API server caps at 1 MiB: more is refused before any
# check, so a ConfigMap author cannot make the operator compile megabytes of Lua at each change.
MAX_HOOK_BYTES = 512 * 1024
# JSON escapes can make a source up to six times longer on the wire.
MAX_REQUEST_BYTES = 6 * MAX_HOOK_BYTES + 64 * 1024
MAX_TIMEOUT_MS = 60_000
TOKEN_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def patience(scripts: Sequence[LuaScript], timeout_ms: int) -> float:
    """How long a check may take: the worker's start, then each file's top level alone and all of them
    together, each within its CPU deadline (lua_worker), twice over for a loaded machine; and a check
    of another namespace that may be ahead of this one."""
    load = LOAD_CPU_S * (2 * len(scripts) + 1)  # what the worker gives the top levels (lua_worker)
    return 2 * (START_WALL_S + load + 2 * (len(scripts) + 1) * max(timeout_ms / 1000, 0.1)) + 30


async def check_remote(socket: Path, scripts: Sequence[LuaScript], timeout_ms: int) -> None:
    """check_scripts, in the checker listening on `socket`. Raises WorkerStartError as check_scripts
    does; `in_files` False when the checker could not be asked (not the hooks' fault)."""
    request = {"scripts": [{"name": s.name, "source": s.source} for s in scripts], "timeoutMs": timeout_ms}
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(socket)), 10)
    except (OSError, TimeoutError) as error:
        raise WorkerStartError(f"hook checker at {socket} cannot be reached: {error}") from None
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), patience(scripts, timeout_ms))
    except (OSError, TimeoutError, ValueError) as error:  # ValueError: a line over the reader's limit
        raise WorkerStartError(f"hook checker at {socket} did not answer: {error or 'timed out'}") from None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    try:
        reply = json.loads(line)
        if reply["ok"] is True:
            return
        message, in_files = reply["error"], reply["inFiles"]
        if not isinstance(message, str) or not isinstance(in_files, bool):
            raise TypeError("error and inFiles")
    except (ValueError, KeyError, TypeError) as problem:
        raise WorkerStartError(f"hook checker at {socket} answered garbage ({problem})") from None
    raise WorkerStartError(message, in_files=in_files)


def _scripts(request: Any) -> tuple[tuple[LuaScript, ...], int]:
    """The request's files and timeout; ValueError naming what is wrong."""
    if not isinstance(request, dict):
        raise ValueError("not a JSON object")
    timeout_ms, files = request.get("timeoutMs"), request.get("scripts")
    if type(timeout_ms) is not int or not 0 < timeout_ms <= MAX_TIMEOUT_MS:  # not a bool either
        raise ValueError(f"timeoutMs must be an integer from 1 to {MAX_TIMEOUT_MS}")
    if not isinstance(files, list) or not files:
        raise ValueError("scripts must be a non-empty list")
    scripts = []
    for file in files:
        name, source = (file.get("name"), file.get("source")) if isinstance(file, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(source, str):
            raise ValueError("each script must have a string name and source")
        scripts.append(LuaScript(name=name, source=source))
    if sum(len(script.source.encode()) for script in scripts) > MAX_HOOK_BYTES:
        raise ValueError(f"the scripts hold more than {MAX_HOOK_BYTES} bytes")
    return tuple(scripts), timeout_ms


class HookCheckServer:
    """Answers check requests on a Unix socket, one check at a time (each starts a Lua worker process)."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self._lock = asyncio.Lock()
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()  # left by a previous run of this container
        old = os.umask(0o077)  # the socket is the operator's alone (same user, same Pod)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, str(self.socket), limit=MAX_REQUEST_BYTES
            )
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._answer(reader)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the operator went away; nothing to tell
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, object]:
        try:
            line = await reader.readline()
            scripts, timeout_ms = _scripts(json.loads(line))
        except (ValueError, asyncio.LimitOverrunError) as error:
            log.warning("hook check request refused: %s", error)
            return {"ok": False, "error": f"bad request to the hook checker: {error}", "inFiles": False}
        async with self._lock:
            try:
                await asyncio.to_thread(check_scripts, scripts, timeout_ms)
            except WorkerStartError as error:
                log.info("hooks %s refused: %s", [s.name for s in scripts], error)
                return {"ok": False, "error": str(error), "inFiles": error.in_files}
        log.info("hooks %s load", [s.name for s in scripts])
        return {"ok": True}


def token_in_reach(token_dir: Path) -> bool:
    return (token_dir / "token").exists()


async def _serve_forever(server: HookCheckServer) -> None:
    await server.start()
    log.info("checking Lua hooks on %s", server.socket)
    try:
        await asyncio.Event().wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    disable_core_dumps()
    parser = argparse.ArgumentParser(
        prog="outbound-hook-checker",
        description="Check Lua hooks for the outbound-relay operator, in a container without credentials.",
    )
    parser.add_argument("--socket", type=Path, required=True, help="the Unix socket to listen on")
    parser.add_argument(
        "--service-account-dir",
        type=Path,
        default=TOKEN_DIR,
        help=f"where Kubernetes mounts a ServiceAccount token ({TOKEN_DIR}); the checker refuses to start "
        "when one is there",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if token_in_reach(args.service_account_dir):
        print(
            f"outbound-hook-checker: a ServiceAccount token is mounted at {args.service_account_dir}: "
            "the hook checker runs Lua from ConfigMaps and must hold no credentials; give its Pod "
            "automountServiceAccountToken: false and the token to the operator container alone",
            file=sys.stderr,
        )
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(HookCheckServer(args.socket)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
