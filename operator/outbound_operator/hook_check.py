"""Lua hooks are loaded, before they are rendered, by the relay's own loader: a hook that passes here
loads in the relay, and one that fails never reaches a sidecar.

The loader is the relay's Lua worker process (outbound_relay.lua_worker.check_scripts): the same Lua 5.4
runtime (lupa), sandbox and limits, each file compiled and its top level run (so a file that registers
no `outbound_smtp_auth_config` fails too), in a process of its own under a CPU-time limit, so a hook's top
level stuck in a C call cannot hold the operator. With `--hook-checker-socket` (the chart's default) that
process runs in the hook checker's container, which holds no credentials (hook_check_service.py). About
0.12 s of CPU (0.3 s of wall time on a loaded machine) per check of Momentum's example hook; outcomes are
kept by content, so a resync or an unrelated change checks nothing again.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import OrderedDict
from pathlib import Path

from outbound_operator.hook_check_service import MAX_HOOK_BYTES, check_remote
from outbound_operator.relay_settings import HookFile, describe_ref
from outbound_operator.render import ConditionType, Problem
from outbound_relay.hook_state import LuaScript
from outbound_relay.lua_worker import WorkerStartError, check_scripts

CACHE_SIZE = 64
HOOK_CHECK_FAILED = "HookCheckFailed"  # the reason when the hooks could not be checked (not their fault)
_FILE_ERROR = re.compile(r"^hooks\.lua\[(?P<index>\d+)\] '[^']*': (?P<text>.*)$", re.DOTALL)


class HookChecker:
    """Checks sets of Lua hook files, one check at a time, and remembers the last CACHE_SIZE outcomes."""

    def __init__(self, socket: Path | None = None) -> None:
        self.socket = socket  # the hook checker's (hook_check_service.py); None: check in a child process
        self._outcomes: OrderedDict[str, Problem | None] = OrderedDict()
        self._lock = asyncio.Lock()

    async def check(self, namespace: str, hooks: tuple[HookFile, ...], timeout_ms: int) -> Problem | None:
        """None when the files load together as the relay loads them; else a problem (reason
        HookInvalid) naming the ConfigMap, the key and Lua's position (`<ConfigMap>/<key>:<line>`)."""
        if not hooks:
            return None
        size = sum(len(hook.source.encode()) for hook in hooks)
        if size > MAX_HOOK_BYTES:
            return Problem(
                type=ConditionType.INVALID,
                reason="HookTooLarge",
                message=f"spec.hooks.lua: the hooks hold {size} bytes, more than the {MAX_HOOK_BYTES} "
                "allowed (they are rendered into a Secret the API server caps at 1 MiB); not checked or "
                "rendered",
            )
        # The namespace is part of the key: a problem names the namespace's ConfigMaps.
        digest = hashlib.sha256(namespace.encode() + b"\0" + str(timeout_ms).encode())
        for hook in hooks:
            digest.update(b"\0" + hook.script_name.encode() + b"\0" + hook.source.encode())
        key = digest.hexdigest()
        if key in self._outcomes:  # no wait behind another namespace's check for a known outcome
            return self._outcomes[key]
        async with self._lock:
            if key in self._outcomes:
                self._outcomes.move_to_end(key)
                return self._outcomes[key]
            scripts = tuple(LuaScript(name=hook.script_name, source=hook.source) for hook in hooks)
            try:
                if self.socket is None:
                    await asyncio.to_thread(check_scripts, scripts, timeout_ms)
                else:
                    await check_remote(self.socket, scripts, timeout_ms)
            except WorkerStartError as error:
                if not error.in_files:  # the operator's trouble, not the hook's: not remembered
                    return Problem(
                        type=ConditionType.INVALID,
                        reason=HOOK_CHECK_FAILED,
                        message=f"spec.hooks.lua: the hooks could not be checked ({error}); they are not "
                        "rendered until they are",
                    )
                outcome: Problem | None = _problem(namespace, hooks, str(error))
            else:
                outcome = None
            self._outcomes[key] = outcome
            while len(self._outcomes) > CACHE_SIZE:
                self._outcomes.popitem(last=False)
            return outcome


def _problem(namespace: str, hooks: tuple[HookFile, ...], text: str) -> Problem:
    """The loader's message ("hooks.lua[0] 'name': Lua syntax error: name:3: ...") with the file named
    as the ConfigMap key it comes from. The loader's messages carry no hook-raised text (lua_sandbox.py
    withholds it), so they are fit for a status and an Event."""
    found = _FILE_ERROR.match(text)
    if found is not None and int(found["index"]) < len(hooks):
        index = int(found["index"])
        where = f"spec.hooks.lua[{index}] ({describe_ref(namespace, hooks[index].ref)})"
        text = found["text"]
    else:
        where = "spec.hooks.lua"
        text = text.removeprefix("hooks.lua: ")
    return Problem(type=ConditionType.INVALID, reason="HookInvalid", message=f"{where}: {text}")
