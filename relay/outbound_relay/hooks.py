"""Per-message auth hooks: Momentum's `outbound_smtp_auth_config(msg)` in Lua, and the same in Python.

Hooks run once per message before `AUTH` (docs/hooks.md). They read the message and set message-context
keys; `outbound_smtp_auth_type|user|pass` then override whatever scope gave (`Route.with_overrides`),
other keys are kept for later hooks. Each hook call has `hooks.timeoutMs` (default 50 ms); a hook that
raises, loops or runs past it fails the delivery temporarily (`HookError`, counted by `kind`).

Neither kind runs on the event loop. Lua hooks run in one worker thread that owns the sandbox
(lua_sandbox.py); the sandbox stops a looping hook itself, and a call stuck inside one C function is
abandoned at the wall-clock deadline together with its thread and runtime, and a fresh one takes over.
Python hooks are trusted code and run in a small pool of worker threads: a runaway one cannot be killed,
so the delivery tempfails at the deadline and the thread stays busy until the function returns.
`async def` hooks run on the loop and are cancelled at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import importlib
import inspect
import queue
import threading
import traceback
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from outbound_relay.config import ConfigError, Hooks
from outbound_relay.lua_sandbox import (
    MAX_BINDING_BYTES,
    MAX_CONTEXT_KEY_BYTES,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_BYTES,
    VCTX_MESS,
    LuaHookError,
    LuaLoadError,
    LuaSandbox,
    LuaScript,
    MessageState,
)

__all__ = ["VCTX_MESS", "HookChain", "HookError", "HookMessage", "PythonHookMsg"]

T = TypeVar("T")

PYTHON_HOOK_THREADS: Final = 4  # a fixed pool: runaway hooks can block it, never grow it
MAX_STALLED_LUA_THREADS: Final = 2  # abandoned Lua threads still inside a C call; past it, fail fast
LUA_GRACE_S: Final = 0.010  # the wall clock backstop: hooks x timeout + max(this, timeout), so the
# sandbox (CPU time) normally stops a looping hook first, even on a loaded machine


@dataclass(kw_only=True)
class HookMessage:
    """What a hook's `msg` sees of one message; the chain writes `binding` and `context` back."""

    mailfrom: str
    rcptto: tuple[str, ...]
    headers: email.message.Message
    binding: str
    context: dict[str, str] = field(default_factory=dict)  # VCTX_MESS


class HookError(Exception):
    """A hook failed for this message: the delivery is a temporary failure. `kind` is "error" or
    "timeout"; `str()` names the hook and the reason, never message content or secrets."""

    def __init__(self, message: str, *, kind: str, hook: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.hook = hook


class HookUsageError(ValueError):
    """A Python hook called a `msg` method wrongly; the message is safe to log."""


class PythonHookMsg:
    """The `msg` of a Python hook: the methods Lua hooks have, with the same checks."""

    def __init__(self, state: MessageState) -> None:
        self._state = state

    def context_set(self, scope: int, key: str, value: str | int | float | None) -> None:
        if scope != VCTX_MESS:
            raise HookUsageError("context_set: the first argument must be VCTX_MESS")
        if not isinstance(key, str) or not 0 < len(key.encode()) <= MAX_CONTEXT_KEY_BYTES:
            raise HookUsageError(
                f"context_set: the key must be a string of 1 to {MAX_CONTEXT_KEY_BYTES} bytes"
            )
        context = self._state.context
        if value is None:
            context.pop(key, None)
            return
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise HookUsageError("context_set: the value must be a string, a number or None")
        if len(value.encode()) > MAX_CONTEXT_VALUE_BYTES:
            raise HookUsageError(f"context_set: the value is longer than {MAX_CONTEXT_VALUE_BYTES} bytes")
        if key not in context and len(context) >= MAX_CONTEXT_KEYS:
            raise HookUsageError(f"context_set: more than {MAX_CONTEXT_KEYS} context keys")
        context[key] = value

    def context_get(self, scope: int, key: str) -> str | None:
        if scope != VCTX_MESS:
            raise HookUsageError("context_get: the first argument must be VCTX_MESS")
        return self._state.context.get(key)

    def header(self, name: str) -> str | None:
        """The first value of header `name` (any case), or None."""
        value = self._state.headers.get(name)
        return None if value is None else str(value)

    def mailfrom(self) -> str:
        return self._state.mailfrom

    def rcptto(self) -> str | None:
        """The first recipient, as Momentum's per-recipient `msg:rcptto()`; see `recipients()`."""
        return self._state.rcptto[0] if self._state.rcptto else None

    def recipients(self) -> tuple[str, ...]:
        return self._state.rcptto

    def binding(self, name: str | None = None) -> str:
        if name is not None:
            if not isinstance(name, str) or not 0 < len(name.encode()) <= MAX_BINDING_BYTES:
                raise HookUsageError(f"binding: the name must be a string of 1 to {MAX_BINDING_BYTES} bytes")
            self._state.binding = name
        return self._state.binding


def _snapshot(msg: HookMessage) -> MessageState:
    return MessageState(
        mailfrom=msg.mailfrom,
        rcptto=tuple(msg.rcptto),
        headers=msg.headers,
        binding=msg.binding,
        context=dict(msg.context),
    )


def _apply(state: MessageState, msg: HookMessage) -> None:
    msg.context = state.context
    msg.binding = state.binding


class _Job(Generic[T]):
    __slots__ = ("abandoned", "function", "future", "loop", "running")

    def __init__(self, function: Callable[[], T], loop: asyncio.AbstractEventLoop) -> None:
        self.function = function
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()
        self.abandoned = False
        self.running = False


def _settle(job: _Job[Any], value: Any, error: BaseException | None) -> None:
    if job.abandoned or job.future.done():  # nobody will read it; an unread exception would be logged
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(value)


class _Workers:
    """Daemon threads serving one queue. Not a ThreadPoolExecutor: its threads are joined at interpreter
    exit, and a runaway hook would then keep the process from stopping."""

    def __init__(self, name: str, threads: int) -> None:
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._name = name
        self._size = threads
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def submit(self, function: Callable[[], T]) -> _Job[T]:
        with self._lock:
            if not self._threads:
                for i in range(self._size):
                    thread = threading.Thread(target=self._serve, name=f"{self._name}-{i}", daemon=True)
                    thread.start()
                    self._threads.append(thread)
        job = _Job(function, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            if job.abandoned:
                continue
            job.running = True
            value: Any = None
            error: BaseException | None = None
            try:
                value = job.function()
            except BaseException as caught:  # handed to the awaiting task, which owns the error
                error = caught
            job.running = False
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for this any more
                job.loop.call_soon_threadsafe(_settle, job, value, error)
            del job, value, error

    def stop(self) -> None:
        for _ in range(self._size):
            self._queue.put(None)

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)


class _LuaWorker:
    """One thread and the sandbox it alone uses; the sandbox is rebuilt when it asks to be."""

    def __init__(self, scripts: tuple[LuaScript, ...], timeout_ms: int, sandbox: LuaSandbox | None) -> None:
        self.workers = _Workers("lua-hooks", 1)
        self._scripts = scripts
        self._timeout_ms = timeout_ms
        self._sandbox = sandbox

    def call(self, state: MessageState) -> MessageState:
        if self._sandbox is None or self._sandbox.needs_rebuild:
            self._sandbox = None
            try:
                self._sandbox = LuaSandbox(self._scripts, timeout_ms=self._timeout_ms)
            except LuaLoadError as error:  # loaded fine once; a file whose top level is not deterministic
                raise LuaHookError(
                    f"lua hooks: reloading failed: {error}", kind="error", hook="lua"
                ) from None
        return self._sandbox.run(state)


@dataclass(frozen=True, kw_only=True)
class _PythonHook:
    ref: str
    function: Callable[[PythonHookMsg], object]
    is_async: bool


def _load_python_hook(index: int, ref: str) -> _PythonHook:
    where = f"hooks.python[{index}] {ref!r}"
    module_name, _, attribute = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # any import failure is a config error naming the hook
        raise ConfigError(
            f"{where}: cannot import {module_name!r}: {type(error).__name__}: {error}"
        ) from None
    function = getattr(module, attribute, None)
    if function is None:
        raise ConfigError(f"{where}: module {module_name!r} has no attribute {attribute!r}")
    if not callable(function):
        raise ConfigError(f"{where}: {attribute!r} is a {type(function).__name__}, not a function")
    return _PythonHook(ref=ref, function=function, is_async=inspect.iscoroutinefunction(function))


def _python_failure(hook: _PythonHook, error: BaseException) -> HookError:
    """Exception texts often carry values (a KeyError's key, a token); log the type and position only."""
    if isinstance(error, HookUsageError):
        reason = str(error)
    else:
        frames = traceback.extract_tb(error.__traceback__)
        where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        reason = f"raised {type(error).__name__}{where}"
    return HookError(f"python hook {hook.ref}: {reason}", kind="error", hook=hook.ref)


class HookChain:
    """The hooks of one config generation, run in order (Lua files first, then Python functions)."""

    def __init__(
        self,
        *,
        lua_scripts: tuple[LuaScript, ...] = (),
        lua_sandbox: LuaSandbox | None = None,
        python_hooks: tuple[_PythonHook, ...] = (),
        timeout_ms: int = 50,
    ) -> None:
        self.timeout_s = timeout_ms / 1000
        self._timeout_ms = timeout_ms
        self._lua_scripts = lua_scripts
        self._lua_hooks = tuple(hook.name for hook in lua_sandbox.hooks) if lua_sandbox is not None else ()
        self._lua: _LuaWorker | None = (
            _LuaWorker(lua_scripts, timeout_ms, lua_sandbox) if lua_sandbox is not None else None
        )
        self._stalled: list[_Workers] = []
        self._python = python_hooks
        self._python_workers = _Workers("python-hooks", PYTHON_HOOK_THREADS)
        self._owned = [self._python_workers] + ([self._lua.workers] if self._lua is not None else [])
        self._finalizer = weakref.finalize(self, HookChain._stop_all, self._owned)

    @classmethod
    def load(cls, hooks: Hooks, base_dir: Path) -> HookChain:
        """Read, compile and run the top level of every Lua file, import every Python hook.
        Raises ConfigError naming the hook and the reason."""
        scripts: list[LuaScript] = []
        for i, path in enumerate(hooks.lua):
            where = f"hooks.lua[{i}] {str(path)!r}"
            try:
                source = (base_dir / path).read_text(encoding="utf-8")
            except OSError as error:
                raise ConfigError(f"{where}: cannot be read: {error.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"{where}: is not UTF-8 text") from None
            scripts.append(LuaScript(name=str(path), source=source))
        sandbox = None
        if scripts:
            # Compile one file at a time first, so a failure names its file, then all of them together.
            for i, script in enumerate(scripts):
                try:
                    LuaSandbox((script,), timeout_ms=hooks.timeout_ms)
                except LuaLoadError as error:
                    raise ConfigError(f"hooks.lua[{i}] {script.name!r}: {error}") from None
            try:
                sandbox = LuaSandbox(tuple(scripts), timeout_ms=hooks.timeout_ms)
            except LuaLoadError as error:
                raise ConfigError(f"hooks.lua: the files fail when loaded together: {error}") from None
        python = tuple(_load_python_hook(i, ref) for i, ref in enumerate(hooks.python))
        return cls(
            lua_scripts=tuple(scripts), lua_sandbox=sandbox, python_hooks=python, timeout_ms=hooks.timeout_ms
        )

    def __bool__(self) -> bool:
        return self._lua is not None or bool(self._python)

    @property
    def names(self) -> tuple[str, ...]:
        """Every hook, in call order: "lua auth.lua (module my_auth)", "python pkg.mod:fn"."""
        return (
            *(f"lua {name}" for name in self._lua_hooks),
            *(f"python {hook.ref}" for hook in self._python),
        )

    async def run(self, msg: HookMessage) -> None:
        """Run every hook on `msg`; its `context` and `binding` change only if all of them succeed."""
        state = _snapshot(msg)
        if self._lua is not None:
            state = await self._run_lua(self._lua, state)
        for hook in self._python:
            state = await self._run_python(hook, state)
        _apply(state, msg)

    async def _run_lua(self, worker: _LuaWorker, state: MessageState) -> MessageState:
        self._stalled = [w for w in self._stalled if w.alive()]
        if len(self._stalled) >= MAX_STALLED_LUA_THREADS:
            raise HookError(
                f"lua hooks: {len(self._stalled)} earlier calls are still stuck past their deadline",
                kind="timeout",
                hook="lua",
            )
        job = worker.workers.submit(lambda: worker.call(state))
        deadline = len(self._lua_hooks) * self.timeout_s + max(LUA_GRACE_S, self.timeout_s)
        try:
            return await self._await(job, deadline)
        except TimeoutError:
            if job.running and self._lua is worker:
                # Stuck inside one C call, where the sandbox cannot stop it: leave thread and runtime behind.
                worker.workers.stop()
                self._stalled.append(worker.workers)
                self._lua = _LuaWorker(self._lua_scripts, self._timeout_ms, None)
                self._owned.append(self._lua.workers)
            raise HookError(
                f"lua hooks: no answer within {deadline * 1000:g} ms", kind="timeout", hook="lua"
            ) from None
        except LuaHookError as error:
            raise HookError(str(error), kind=error.kind, hook=error.hook) from None

    async def _run_python(self, hook: _PythonHook, state: MessageState) -> MessageState:
        state = _copy_state(state)
        view = PythonHookMsg(state)
        try:
            if hook.is_async:
                await asyncio.wait_for(_as_awaitable(hook.function(view)), self.timeout_s)
            else:
                await self._await(self._python_workers.submit(lambda: hook.function(view)), self.timeout_s)
        except TimeoutError:
            raise HookError(
                f"python hook {hook.ref}: ran past its {self._timeout_ms} ms limit",
                kind="timeout",
                hook=hook.ref,
            ) from None
        except Exception as error:
            raise _python_failure(hook, error) from None
        return state

    @staticmethod
    async def _await(job: _Job[T], seconds: float) -> T:
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), seconds)
        except BaseException:
            job.abandoned = True
            raise

    def close(self) -> None:
        """Stop the worker threads once they are idle (also done when the chain is garbage-collected)."""
        self._finalizer()

    @staticmethod
    def _stop_all(owned: list[_Workers]) -> None:
        for workers in owned:
            workers.stop()


def _copy_state(state: MessageState) -> MessageState:
    return MessageState(
        mailfrom=state.mailfrom,
        rcptto=state.rcptto,
        headers=state.headers,
        binding=state.binding,
        context=dict(state.context),
    )


async def _as_awaitable(result: object) -> None:
    if isinstance(result, Awaitable):
        await result
