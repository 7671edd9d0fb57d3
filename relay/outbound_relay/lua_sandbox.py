"""Momentum-compatible Lua hooks in a sandboxed Lua 5.4 runtime (lupa), called synchronously.

Lua 5.4 rather than LuaJIT: lupa's `max_memory` does not work on 64-bit LuaJIT, and LuaJIT does not run
count hooks inside compiled traces, so neither the memory nor the time limit would hold there.

The sandbox, from the trusted side (the prelude below runs before any hook code, with the full library):
- each hook file gets its own environment with copies of `string` (no `dump`), `table`, `math`, `utf8` and
  the safe base functions; no `os`, `io`, `debug`, `package`, `dofile`, `loadfile`, `coroutine`; `load` takes
  source text only; `require` accepts only Momentum's `msys.*` names, as no-ops; `collectgarbage("count")`;
- the string metatable is locked, `setmetatable` refuses `__gc` (a finalizer would run outside the limits),
  and the trusted code never calls a hook's metamethods (`rawequal`, `rawget`, no `tostring` on its values);
- a count hook, installed before each call, compares the process's CPU time (the worker process's, see
  lua_process.py) with the call's deadline every `CHECK_EVERY` instructions; past it, the hook fires on
  every instruction, so a `pcall` cannot swallow it;
- `max_memory` makes allocations past the limit fail with "not enough memory" (`string.rep` bombs);
- `msg` is a Lua table whose methods are trusted Lua closures: no Python object is reachable from hooks.
Time spent inside one C function (a pathological pattern match) is not seen by the count hook; the relay
runs the sandbox in a worker process (lua_process.py) with a CPU-time timer that kills it there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import lupa.lua54 as lupa

from outbound_relay.hook_state import (
    MAX_BINDING_BYTES,
    MAX_CONTEXT_KEY_BYTES,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_BYTES,
    VCTX_MESS,
    LuaScript,
    MessageState,
)

__all__ = ["VCTX_MESS", "LuaHookError", "LuaLoadError", "LuaSandbox", "LuaScript", "MessageState"]

logger = logging.getLogger("outbound_relay.hooks")

MEMORY_LIMIT_BYTES: Final = 32 << 20
CHECK_EVERY: Final = 1000  # instructions between deadline checks: ~2-10 us of Lua, one clock() call
MAX_PRINT_CHARS: Final = 2000

HOOK_FUNCTION: Final = "outbound_smtp_auth_config"


class LuaLoadError(Exception):
    """A hook file that cannot be used; the message is safe to log and names no secret."""


class LuaHookError(Exception):
    """One hook call that failed: `kind` is "error" or "timeout"; the message is safe to log."""

    def __init__(self, message: str, *, kind: str, hook: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.hook = hook


_PRELUDE = r"""
local header_cb, recipients_cb, print_cb, CHECK_EVERY, MAX_KEY, MAX_VALUE, MAX_KEYS, MAX_BINDING, VCTX = ...
local clock, sethook = os.clock, debug.sethook
local error, type, tostring, select, rawequal, rawget, pairs, ipairs =
      error, type, tostring, select, rawequal, rawget, pairs, ipairs
local setmetatable, getmetatable, pcall, xpcall, load, collectgarbage =
      setmetatable, getmetatable, pcall, xpcall, load, collectgarbage
local concat = table.concat
local sub, match = string.sub, string.match
local assert = assert

local TIMEOUT = {}  -- a unique error object: only the count hook raises it
-- ("").x must reach neither the real string table nor string.dump
local string_mt = getmetatable("")
string_mt.__metatable = false
do
  local methods = {}
  for k, v in pairs(string) do methods[k] = v end
  methods.dump = nil
  string_mt.__index = methods
end

local deadline = 0
local function tripped() error(TIMEOUT, 0) end
local function check()
  if clock() > deadline then
    sethook(tripped, "", 1)
    error(TIMEOUT, 0)
  end
end
local raised = {}  -- strings the hook passed to error()/assert() in this call: never logged
local function arm(seconds)
  raised = {}
  deadline = clock() + seconds
  return sethook(check, "", CHECK_EVERY)  -- a tail call: no trusted instruction runs once it is armed
end

local cur  -- the message being processed
local methods = {}
function methods.context_set(_, scope, key, value)
  if scope ~= VCTX then error("context_set: the first argument must be VCTX_MESS", 2) end
  if type(key) ~= "string" or #key == 0 or #key > MAX_KEY then
    error("context_set: the key must be a string of 1 to " .. MAX_KEY .. " bytes", 2)
  end
  local kind = type(value)
  if kind == "number" then
    value = tostring(value)
  elseif kind ~= "string" and kind ~= "nil" then
    error("context_set: the value must be a string, a number or nil, not a " .. kind, 2)
  end
  if value ~= nil and #value > MAX_VALUE then
    error("context_set: the value is longer than " .. MAX_VALUE .. " bytes", 2)
  end
  local ctx = cur.ctx
  if ctx[key] == nil then
    if value == nil then return end
    if cur.nkeys >= MAX_KEYS then error("context_set: more than " .. MAX_KEYS .. " context keys", 2) end
    cur.nkeys = cur.nkeys + 1
  elseif value == nil then
    cur.nkeys = cur.nkeys - 1
  end
  ctx[key] = value
end
function methods.context_get(_, scope, key)
  if scope ~= VCTX then error("context_get: the first argument must be VCTX_MESS", 2) end
  if type(key) ~= "string" then error("context_get: the key must be a string", 2) end
  return cur.ctx[key]
end
function methods.header(_, name)
  if type(name) ~= "string" or #name == 0 then error("header: the name must be a non-empty string", 2) end
  return header_cb(name)
end
function methods.mailfrom() return cur.mailfrom end
function methods.rcptto() return cur.rcpt end
function methods.recipients() return {recipients_cb()} end
function methods.binding(_, name)
  if name ~= nil then
    if type(name) ~= "string" or #name == 0 or #name > MAX_BINDING then
      error("binding: the name must be a string of 1 to " .. MAX_BINDING .. " bytes", 2)
    end
    cur.binding = name
  end
  return cur.binding
end
local MSG_MT = {__index = methods, __metatable = false}

local function prepare(ctx, nkeys, binding, mailfrom, rcpt)
  cur = {ctx = ctx, nkeys = nkeys, binding = binding, mailfrom = mailfrom, rcpt = rcpt}
  return setmetatable({}, MSG_MT)
end
local function result()
  return cur.ctx, cur.binding
end
local function describe(err)  -- never calls a hook's metamethods
  if rawequal(err, TIMEOUT) then return "timeout", "", false end
  if type(err) == "string" then
    local body = match(err, "^[^\n:]+:%d+: (.*)$")
    return "error", err, raised[err] or (body ~= nil and raised[body]) or false
  end
  return "error", "error object is a " .. type(err) .. " value", false
end
local function user_error(message, level)
  if type(message) == "string" then raised[message] = true end
  return error(message, level)  -- a tail call: `level` still counts from the hook's own frame
end
local function user_assert(v, message, ...)
  if not v and type(message) == "string" then raised[message] = true end
  return assert(v, message, ...)
end

local function rethrow_timeout(ok, ...)
  if not ok and rawequal((...), TIMEOUT) then error(TIMEOUT, 0) end
  return ok, ...
end
local function safe_pcall(f, ...) return rethrow_timeout(pcall(f, ...)) end
local function safe_xpcall(f, handler, ...)
  return rethrow_timeout(xpcall(f, function(e)
    if rawequal(e, TIMEOUT) then return e end
    return handler(e)
  end, ...))
end
local function safe_setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc metamethods are not available in hooks", 2)
  end
  return setmetatable(t, mt)
end
local function safe_collectgarbage(opt)
  if opt == "count" then return collectgarbage("count") end
  error("collectgarbage: only collectgarbage('count') is available in hooks", 2)
end

local BASE = {"assert", "error", "ipairs", "next", "pairs", "rawequal", "rawget", "rawlen", "rawset",
              "select", "tonumber", "tostring", "type", "getmetatable", "_VERSION"}
local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end
local G = _G
local LIBS = {string = copy(string), table = copy(table), math = copy(math), utf8 = copy(utf8)}
LIBS.string.dump = nil

local function new_env(script, registered)
  local env = {}
  for _, name in ipairs(BASE) do env[name] = G[name] end
  for name, lib in pairs(LIBS) do env[name] = copy(lib) end
  env.unpack = table.unpack  -- Lua 5.1 / LuaJIT spelling, as Momentum's scripts use it
  env.pcall, env.xpcall, env.setmetatable = safe_pcall, safe_xpcall, safe_setmetatable
  env.collectgarbage = safe_collectgarbage
  env.error, env.assert = user_error, user_assert
  env._G = env
  env.VCTX_MESS = VCTX
  local msys = {}
  function msys.registerModule(name, mod)
    if type(name) ~= "string" or #name == 0 then
      error("msys.registerModule: the name must be a non-empty string", 2)
    end
    if type(mod) ~= "table" then error("msys.registerModule: the module must be a table", 2) end
    local fn = rawget(mod, "outbound_smtp_auth_config")
    registered[#registered + 1] = {name, mod, type(fn) == "function" and fn or false}
  end
  env.msys = msys
  function env.require(name)
    if type(name) == "string" and sub(name, 1, 5) == "msys." then return msys end
    error("require: modules cannot be loaded in hooks (Momentum's 'msys.*' names are accepted as no-ops)", 2)
  end
  function env.load(chunk, chunkname, _, chunkenv)
    if type(chunk) ~= "string" then error("load: only source text can be loaded in hooks", 2) end
    if chunkname ~= nil and type(chunkname) ~= "string" then
      error("load: the chunk name must be a string", 2)
    end
    if chunkenv == nil then chunkenv = env end
    return load(chunk, chunkname or "=(load)", "t", chunkenv)
  end
  function env.print(...)
    local parts = {}
    for i = 1, select("#", ...) do parts[i] = tostring((select(i, ...))) end
    print_cb(script, concat(parts, "\t"))
  end
  return env
end

local function compile(source, script)
  local registered = {}
  local env = new_env(script, registered)
  local chunk, err = load(source, "@" .. script, "t", env)
  return chunk, err, registered
end

-- What is left in the real globals is not reachable from hooks; remove the dangerous parts anyway.
for _, name in ipairs({"os", "io", "debug", "package", "require", "dofile", "loadfile", "python"}) do
  G[name] = nil
end

return arm, prepare, result, describe, compile, pcall, sethook
"""

_WITHHELD = "error raised by the hook (its text is not logged: it may carry message data)"
_LOCATION = re.compile(r"^(?P<where>[^\n:]{1,300}:\d+): (?P<text>.*)$", re.DOTALL)
_NEAR_STRING = re.compile(r" near '?[\"'\[].*$", re.DOTALL)
# Lua's own messages name variables and types, never values; the hook's `error(...)` text may hold anything.
_SAFE_TEXT = (
    "attempt to ",
    "bad argument ",
    "stack overflow",
    "C stack overflow",
    "not enough memory",
    "error in error handling",
    "context_set: ",
    "context_get: ",
    "header: ",
    "binding: ",
    "require: ",
    "load: ",
    "collectgarbage: ",
    "setmetatable: ",
    "msys.registerModule: ",
)


def safe_lua_error(text: str, *, from_hook: bool) -> str:
    """A Lua error message fit for logs: its position, and its text only when Lua itself wrote it."""
    match = _LOCATION.match(text)
    where, body = (match["where"], match["text"]) if match else ("", text)
    body = body.split("\n", 1)[0][:300] if body.startswith(_SAFE_TEXT) and not from_hook else _WITHHELD
    return f"{where}: {body}" if where else body


def safe_syntax_error(text: str) -> str:
    """Lua's syntax errors quote the token they stopped at; drop it when it is a string literal."""
    return _NEAR_STRING.sub(" near a string literal", text.split("\n", 1)[0])[:300]


def _deny_attribute(obj: object, name: object, is_setting: bool) -> NoReturn:
    raise AttributeError("Python attributes are not available in hooks")


@dataclass(frozen=True, kw_only=True)
class _Hook:
    name: str  # "auth.lua (module my_auth)"
    function: Any  # Lua function
    module: Any  # Lua table, passed as `self`


class LuaSandbox:
    """One Lua runtime holding every Lua hook file of a config, in order. Not thread-safe: one caller at
    a time (the worker process's only thread)."""

    def __init__(
        self,
        scripts: Sequence[LuaScript],
        *,
        timeout_ms: int,
        load_timeout_ms: int = 1000,
        memory_limit: int = MEMORY_LIMIT_BYTES,
        printer: Callable[[str, str], None] | None = None,
    ) -> None:
        self.timeout_s = timeout_ms / 1000
        self._printer = printer
        self.needs_rebuild = False  # set after a memory error: the hooks' state may be what filled it
        self._state: MessageState | None = None
        self._lua = lupa.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny_attribute,
            max_memory=memory_limit,
        )
        (
            self._arm,
            self._prepare,
            self._result,
            self._describe,
            compile_script,
            self._pcall,
            self._sethook,
        ) = self._lua.execute(
            _PRELUDE,
            self._header,
            self._recipients,
            self._print,
            CHECK_EVERY,
            MAX_CONTEXT_KEY_BYTES,
            MAX_CONTEXT_VALUE_BYTES,
            MAX_CONTEXT_KEYS,
            MAX_BINDING_BYTES,
            VCTX_MESS,
        )
        hooks: list[_Hook] = []
        for script in scripts:
            chunk, error, registered = compile_script(script.source, script.name)
            if chunk is None:
                raise LuaLoadError(f"Lua syntax error: {safe_syntax_error(str(error))}")
            kind, text = self._call(chunk, (), load_timeout_ms / 1000)
            if kind == "timeout":
                raise LuaLoadError(f"its top-level code ran past the {load_timeout_ms} ms load limit")
            if kind == "error":
                raise LuaLoadError(f"its top-level code failed: {text}")
            found = [
                _Hook(name=f"{script.name} (module {entry[1]})", function=entry[3], module=entry[2])
                for entry in registered.values()
                if entry[3]
            ]
            if not found:
                raise LuaLoadError(
                    f"registers no {HOOK_FUNCTION} hook: expected `function mod:{HOOK_FUNCTION}(msg)` "
                    'and `msys.registerModule("name", mod)`'
                )
            hooks.extend(found)
        self.hooks = tuple(hooks)

    def _call(self, function: Any, args: tuple[Any, ...], seconds: float) -> tuple[str, str]:
        """Run one Lua function under the deadline: ("ok"|"error"|"timeout", error text)."""
        self._arm(seconds)
        try:
            outcome = self._pcall(function, *args)
        finally:
            self._sethook()
        if outcome is True or (isinstance(outcome, tuple) and outcome[0] is True):
            return "ok", ""
        kind, text, from_hook = self._describe(outcome[1])
        return str(kind), safe_lua_error(str(text), from_hook=bool(from_hook))

    def run(self, state: MessageState) -> MessageState:
        """Call every hook in order on `state` (changed in place and returned); raises LuaHookError."""
        self._state = state
        try:
            context = self._lua.table_from(state.context)
            msg = self._prepare(
                context,
                len(state.context),
                state.binding,
                state.mailfrom,
                state.rcptto[0] if state.rcptto else None,
            )
            for hook in self.hooks:
                kind, text = self._call(hook.function, (hook.module, msg), self.timeout_s)
                if kind == "timeout":
                    raise LuaHookError(
                        f"lua hook {hook.name}: ran past its {self.timeout_s * 1000:g} ms limit",
                        kind="timeout",
                        hook=hook.name,
                    )
                if kind == "error":
                    self.needs_rebuild = self.needs_rebuild or text.endswith("not enough memory")
                    raise LuaHookError(f"lua hook {hook.name}: {text}", kind="error", hook=hook.name)
            context, binding = self._result()
            state.context = {str(k): str(v) for k, v in context.items()}
            state.binding = str(binding)
            return state
        except lupa.LuaError as error:  # the trusted side failed (out of memory while copying, say)
            self.needs_rebuild = True
            raise LuaHookError(
                f"lua hooks: runtime failure ({type(error).__name__})", kind="error", hook="lua"
            ) from None
        finally:
            self._state = None

    # Callbacks from the trusted Lua methods; their arguments are already type-checked there.
    def _header(self, name: str) -> str | None:
        assert self._state is not None
        value = self._state.headers.get(name)
        return None if value is None else str(value)

    def _recipients(self) -> tuple[str, ...]:
        assert self._state is not None
        return self._state.rcptto

    def _print(self, script: str, text: str) -> None:
        if self._printer is not None:
            self._printer(script, text[:MAX_PRINT_CHARS])
        else:
            logger.info("lua hook %s: print: %s", script, text[:MAX_PRINT_CHARS])
