"""Per-message auth hooks: Momentum's `outbound_smtp_auth_config(msg)` in Lua, and the same in Python.

Hooks run once per message before `AUTH` (docs/hooks.md). They read the message and set message-context
keys; `outbound_smtp_auth_type|user|pass` then override whatever scope gave (`Route.with_overrides`),
other keys are kept for later hooks. Each hook call has `hooks.timeoutMs` (default 50 ms); a hook that
raises, loops or runs past it fails the delivery temporarily (`HookError`, counted by `kind`).

Neither kind runs on the event loop. Lua hooks run in a worker process (lua_worker.py) that is killed at
its own CPU-time deadline, even inside one C call, and replaced in the background; messages wait for it in
a queue and their deadline starts when the worker takes them. Python hooks are trusted code and run in a
small pool of worker threads, with the deadline from when a thread takes the call: a runaway one cannot
be killed, so the delivery tempfails at the deadline and the thread stays busy until the function
returns. `async def` hooks run on the loop and are cancelled at the deadline. `health()` says when the
chain can no longer run hooks (/healthz).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.message
import email.policy
import importlib
import inspect
import logging
import queue
import threading
import time
import traceback
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Generic, TypeVar

from outbound_relay.config import ConfigError, Hooks
from outbound_relay.hook_state import (
    MAX_BINDING_BYTES,
    MAX_CONTEXT_KEY_BYTES,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_BYTES,
    VCTX_MESS,
    LuaScript,
    MessageState,
)
from outbound_relay.lua_worker import LuaWorkers, WorkerError, WorkerProcess, WorkerStartError

__all__ = ["VCTX_MESS", "HookChain", "HookError", "HookMessage", "PythonHookMsg"]

T = TypeVar("T")

PYTHON_HOOK_THREADS: Final = 4  # a fixed pool: runaway hooks can block it, never grow it
MAX_PYTHON_WAITING: Final = 1024  # calls queued for the pool; past it, fail at once rather than pile up

logger = logging.getLogger("outbound_relay.hooks")


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
    __slots__ = ("abandoned", "finished_at", "function", "future", "loop", "started_at")

    def __init__(self, function: Callable[[], T], loop: asyncio.AbstractEventLoop) -> None:
        self.function = function
        self.loop = loop
        self.future: asyncio.Future[T] = loop.create_future()
        self.abandoned = False
        self.started_at: float | None = None  # monotonic, set by the thread that takes it
        self.finished_at: float | None = None  # monotonic, set by that thread when the function returns


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
        self._running: dict[int, _Job[Any]] = {}  # by thread ident
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

    def waiting(self) -> int:
        return self._queue.qsize()

    def stuck(self) -> int:
        """Threads still running a call whose caller gave up at the deadline."""
        return sum(1 for job in list(self._running.values()) if job.abandoned)

    def all_stuck(self) -> bool:
        return self.stuck() >= self._size

    def _serve(self) -> None:
        me = threading.get_ident()
        while (job := self._queue.get()) is not None:
            if job.abandoned:
                continue
            job.started_at = time.monotonic()
            self._running[me] = job
            value: Any = None
            error: BaseException | None = None
            try:
                value = job.function()
            except BaseException as caught:  # handed to the awaiting task, which owns the error
                error = caught
            job.finished_at = time.monotonic()
            del self._running[me]
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for this any more
                job.loop.call_soon_threadsafe(_settle, job, value, error)
            del job, value, error

    def stop(self) -> None:
        for _ in range(self._size):
            self._queue.put(None)

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)


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
        lua: LuaWorkers | None = None,
        python_hooks: tuple[_PythonHook, ...] = (),
        timeout_ms: int = 50,
    ) -> None:
        self.timeout_s = timeout_ms / 1000
        self._timeout_ms = timeout_ms
        self._lua = lua
        self._lua_hooks = lua.hooks if lua is not None else ()
        self._python = python_hooks
        self._python_workers = _Workers("python-hooks", PYTHON_HOOK_THREADS)
        self._finalizer = weakref.finalize(self, HookChain._stop_all, self._python_workers, lua)

    @classmethod
    def load(cls, hooks: Hooks, base_dir: Path) -> HookChain:
        """Read every Lua file and start the Lua worker process, which compiles them and runs their top
        level; import every Python hook. Raises ConfigError naming the hook and the reason."""
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
        python = tuple(_load_python_hook(i, ref) for i, ref in enumerate(hooks.python))
        lua = None
        if scripts:
            try:
                first = WorkerProcess.start(scripts, hooks.timeout_ms, validate=True)
            except WorkerStartError as error:
                raise ConfigError(str(error) if error.in_files else f"hooks.lua: {error}") from None
            lua = LuaWorkers(tuple(scripts), hooks.timeout_ms, first)
        return cls(lua=lua, python_hooks=python, timeout_ms=hooks.timeout_ms)

    def __bool__(self) -> bool:
        return self._lua is not None or bool(self._python)

    @property
    def names(self) -> tuple[str, ...]:
        """Every hook, in call order: "lua auth.lua (module my_auth)", "python pkg.mod:fn"."""
        return (
            *(f"lua {name}" for name in self._lua_hooks),
            *(f"python {hook.ref}" for hook in self._python),
        )

    def health(self) -> str | None:
        """None while the hooks can run; else why they cannot, for /healthz (safe to show: no message
        data). Lua: the worker process cannot be started, or keeps dying on its own. Python: every
        thread of the pool is stuck in a call past its deadline."""
        if self._lua is not None and (reason := self._lua.health()) is not None:
            return f"lua hooks: {reason}"
        if self._python and self._python_workers.all_stuck():
            return f"python hooks: all {PYTHON_HOOK_THREADS} threads are stuck in calls past their deadline"
        return None

    async def run(self, msg: HookMessage) -> None:
        """Run every hook on `msg`; its `context` and `binding` change only if all of them succeed."""
        state = _snapshot(msg)
        if self._lua is not None:
            state = await self._run_lua(self._lua, state)
        for hook in self._python:
            state = await self._run_python(hook, state)
        _apply(state, msg)

    async def _run_lua(self, lua: LuaWorkers, state: MessageState) -> MessageState:
        headers = state.headers
        request = {
            "mailfrom": state.mailfrom,
            "rcptto": state.rcptto,
            "binding": state.binding,
            "context": state.context,
            "headers": list(headers.raw_items()),
            "policy": "email" if isinstance(headers.policy, email.policy.EmailPolicy) else "compat32",
        }
        try:
            reply = await lua.call(request)
        except WorkerError as error:
            raise HookError(str(error), kind=error.kind, hook=error.hook) from None
        for script, line in reply.prints:
            logger.info("lua hook %s: print: %s", script, line)
        return MessageState(
            mailfrom=state.mailfrom,
            rcptto=state.rcptto,
            headers=headers,
            binding=reply.binding,
            context=reply.context,
        )

    async def _run_python(self, hook: _PythonHook, state: MessageState) -> MessageState:
        state = _copy_state(state)
        view = PythonHookMsg(state)
        try:
            if hook.is_async:
                await asyncio.wait_for(_as_awaitable(hook.function(view)), self.timeout_s)
            else:
                if self._python_workers.all_stuck():
                    raise HookError(
                        f"python hook {hook.ref}: all {PYTHON_HOOK_THREADS} worker threads are stuck in "
                        "calls past their deadline",
                        kind="timeout",
                        hook=hook.ref,
                    )
                if self._python_workers.waiting() >= MAX_PYTHON_WAITING:
                    raise HookError(
                        f"python hook {hook.ref}: {MAX_PYTHON_WAITING} calls already wait for a thread",
                        kind="timeout",
                        hook=hook.ref,
                    )
                await self._await(self._python_workers.submit(lambda: hook.function(view)), self.timeout_s)
        except TimeoutError:
            raise HookError(
                f"python hook {hook.ref}: ran past its {self._timeout_ms} ms limit",
                kind="timeout",
                hook=hook.ref,
            ) from None
        except HookError:
            raise
        except Exception as error:
            raise _python_failure(hook, error) from None
        return state

    async def _await(self, job: _Job[T], seconds: float) -> T:
        """The job's result, with `seconds` counted from when a thread takes it: time in the queue is not
        the hook's. A queued job gives up only when every thread is stuck past its own deadline."""
        try:
            remaining = seconds
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(job.future), remaining)
                except TimeoutError:
                    if job.finished_at is not None and job.started_at is not None:
                        if job.finished_at - job.started_at <= seconds:
                            return await job.future  # done in time; only its hand-over to the loop is late
                        raise
                    if job.started_at is not None:
                        remaining = job.started_at + seconds - time.monotonic()
                    elif self._python_workers.all_stuck():
                        raise
                    else:
                        remaining = seconds
                    if remaining <= 0:
                        raise
        except BaseException:
            job.abandoned = True
            raise

    def close(self) -> None:
        """Stop the Lua worker process and the Python threads once idle (also done when the chain is
        garbage-collected)."""
        self._finalizer()

    @staticmethod
    def _stop_all(python: _Workers, lua: LuaWorkers | None) -> None:
        python.stop()
        if lua is not None:
            lua.close()


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
