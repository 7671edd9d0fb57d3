"""Lua hooks in a worker process that is killed at its deadline and replaced.

Why a process: a pattern match that backtracks (`s:find('(.-)x(.-)x(.-)y')` on a long header) runs inside
one C call, where Lua's count hook never fires; no thread can be stopped there, but a process can. The
worker (`python -m outbound_relay.lua_process`) holds the sandbox (lua_sandbox.py) and answers one
message at a time over its stdin/stdout: frames of a 4-byte big-endian length and a JSON object. This
module is the relay's side.

Deadlines are the worker's own CPU time, from the moment it takes the message: the sandbox's count hook
stops a looping hook after `timeoutMs` of CPU (`os.clock()`, now the worker's clock, not the relay's),
and an `ITIMER_PROF` timer of hooks x timeout + max(timeout, 10 ms) of CPU kills the worker with SIGPROF
when one C call overruns. Time a message spends waiting for the worker is not counted. A wall-clock
backstop in the relay (ten times that, at least 1 s) kills a worker that stops answering for any other
reason. After a kill a new worker starts in the background; messages waiting meanwhile wait for it, they
do not fail.

The relay sends requests (its own data, trusted); the worker's replies come from code that ran hook
scripts, so they are JSON, size-capped and checked field by field, never pickled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from outbound_relay.hook_state import (
    MAX_BINDING_BYTES,
    MAX_CONTEXT_KEY_BYTES,
    MAX_CONTEXT_KEYS,
    MAX_CONTEXT_VALUE_BYTES,
    LuaScript,
)
from outbound_relay.lua_process import FRAME, LOAD_CPU_S, MAX_PRINTS, cpu_budget_s, encode

T = TypeVar("T")
logger = logging.getLogger("outbound_relay.hooks")

WORKER_ARGV: tuple[str, ...] = (sys.executable, "-I", "-m", "outbound_relay.lua_process")
MAX_REPLY_BYTES: Final = 4 * MAX_CONTEXT_KEYS * (MAX_CONTEXT_KEY_BYTES + 2 * MAX_CONTEXT_VALUE_BYTES) + (
    1 << 20
)
START_WALL_S: Final = 30.0  # interpreter start, imports and loading the files, on a loaded machine
MIN_BACKSTOP_S: Final = 1.0
MAX_WAITING: Final = 1024  # messages queued for the worker; past it, fail at once rather than pile up
MAX_START_FAILURES: Final = 3  # consecutive failed starts: the relay can no longer run Lua hooks
MAX_TROUBLES: Final = 3  # deaths that were no deadline kill (crash, OOM kill) or failed starts...
TROUBLE_WINDOW_S: Final = 60.0  # ...within this, with no reply in between: unhealthy
RESTART_BACKOFF_S: Final = (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)


class WorkerError(Exception):
    """The worker could not run a call: `kind` "timeout" (the deadline) or "error"; safe to log."""

    def __init__(self, message: str, *, kind: str, hook: str = "lua") -> None:
        super().__init__(message)
        self.kind = kind
        self.hook = hook


class WorkerStartError(Exception):
    """A worker did not come up; the message names why, never a secret. `in_files` when a hook file
    failed to load (the message then names it)."""

    def __init__(self, message: str, *, in_files: bool = False) -> None:
        super().__init__(message)
        self.in_files = in_files


@dataclass(frozen=True, kw_only=True)
class Reply:
    context: dict[str, str]
    binding: str
    prints: tuple[tuple[str, str], ...]


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
        return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def _check_str(value: object, what: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{what} is not a string of at most {limit} characters")
    return value


def parse_reply(frame: bytes) -> Reply | WorkerError:
    """A reply frame from the worker, checked; ValueError for anything malformed."""
    obj = json.loads(frame)
    if not isinstance(obj, dict):
        raise ValueError("the reply is not an object")
    if "error" in obj:
        kind = obj.get("kind")
        if kind not in ("error", "timeout"):
            raise ValueError("the reply's kind is not error or timeout")
        message = _check_str(obj["error"], "the error", 2000)
        return WorkerError(message, kind=kind, hook=_check_str(obj.get("hook"), "the hook", 600))
    context = obj.get("context")
    if not isinstance(context, dict) or len(context) > MAX_CONTEXT_KEYS:
        raise ValueError("the context is not an object of at most MAX_CONTEXT_KEYS keys")
    for key, value in context.items():
        _check_str(key, "a context key", MAX_CONTEXT_KEY_BYTES)
        _check_str(value, "a context value", MAX_CONTEXT_VALUE_BYTES)
    prints = obj.get("print", [])
    if not isinstance(prints, list) or len(prints) > MAX_PRINTS:
        raise ValueError("print is not a short list")
    if not all(isinstance(p, list) and len(p) == 2 for p in prints):
        raise ValueError("a print entry is not a [script, line] pair")
    lines = tuple((_check_str(p[0], "a script name", 600), _check_str(p[1], "a line", 4000)) for p in prints)
    return Reply(
        context=context,
        binding=_check_str(obj.get("binding"), "the binding", MAX_BINDING_BYTES),
        prints=lines,
    )


# -- The relay's side ---------------------------------------------------------------------------------


def _read_frame_blocking(fd: int, deadline: float) -> bytes:
    """One frame from `fd` before the monotonic `deadline`; WorkerStartError on EOF or time-out."""
    patience = deadline - time.monotonic()
    buffer = b""
    need = FRAME.size
    header_done = False
    while True:
        while len(buffer) < need:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise WorkerStartError(f"did not answer within {patience:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise WorkerStartError("exited before it was ready")
            buffer += chunk
        if header_done:
            return buffer[FRAME.size : need]
        (length,) = FRAME.unpack_from(buffer)
        if length > MAX_REPLY_BYTES:
            raise WorkerStartError("sent an oversized frame")
        need = FRAME.size + length
        header_done = True


class WorkerProcess:
    """One started worker with its files loaded; `hooks` names each hook in call order."""

    def __init__(self, proc: subprocess.Popen[bytes], hooks: tuple[str, ...]) -> None:
        self.proc = proc
        self.hooks = hooks
        assert proc.stdin is not None
        assert proc.stdout is not None
        self.write_fd = proc.stdin.fileno()
        self.read_fd = proc.stdout.fileno()

    @classmethod
    def start(
        cls, scripts: Sequence[LuaScript], timeout_ms: int, *, validate: bool, log_prints: bool = True
    ) -> WorkerProcess:
        """Start a worker and load the files (blocking: call it from a thread, or at load time).
        Raises WorkerStartError; with `validate`, a message naming the file that failed to load.
        `log_prints`: log what the files' top level printed (the relay does; a check does not)."""
        try:
            proc = subprocess.Popen(
                WORKER_ARGV,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},  # none of the relay's own
                close_fds=True,
                bufsize=0,
            )
        except OSError as error:
            raise WorkerStartError(f"cannot be started: {error.strerror}") from None
        try:
            assert proc.stdin is not None
            assert proc.stdout is not None
            setup = {
                "scripts": [[s.name, s.source] for s in scripts],
                "timeout_ms": timeout_ms,
                "validate": validate,
            }
            with contextlib.suppress(BrokenPipeError):  # it died at once; reading says how
                os.write(proc.stdin.fileno(), encode(setup))
            try:
                # The start, and the files' top levels within their CPU limit (each alone, then together,
                # when validating), which many files can take past START_WALL_S on their own.
                patience = START_WALL_S + (LOAD_CPU_S * (2 * len(scripts) + 1) if validate else 0)
                frame = _read_frame_blocking(proc.stdout.fileno(), time.monotonic() + patience)
            except WorkerStartError as error:
                proc.kill()
                returncode = proc.wait()
                if returncode == -signal.SIGPROF:
                    raise WorkerStartError(
                        "the top-level code of the files ran past its CPU limit inside one C call",
                        in_files=True,
                    ) from None
                raise WorkerStartError(
                    f"the Lua worker process {error} ({describe_exit(returncode)})"
                ) from None
            answer = json.loads(frame)
            if not isinstance(answer, dict):
                raise WorkerStartError("the Lua worker process sent a malformed greeting")
            if "load_error" in answer:
                raise WorkerStartError(
                    _check_str(answer["load_error"], "the load error", 4000), in_files=True
                )
            hooks = answer.get("hooks")
            if not isinstance(hooks, list) or not all(isinstance(h, str) for h in hooks):
                raise WorkerStartError("the Lua worker process sent a malformed greeting")
            for script, line in answer.get("print", [])[:MAX_PRINTS] if log_prints else ():
                _log_print(str(script), str(line))
            return cls(proc, tuple(hooks))
        except BaseException:
            _reap(proc)
            raise

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


def check_scripts(scripts: Sequence[LuaScript], timeout_ms: int) -> tuple[str, ...]:
    """Load the files exactly as the relay does when a config loads (a worker process: compiled in the
    sandbox, top level run under its CPU and memory limits, one file at a time and then together), then
    stop the worker; the hook names. Blocking. Raises WorkerStartError, naming the file that failed when
    `in_files`. The operator checks hooks with it before rendering them; what their top level prints is
    not logged (a hook may print a token; the relay's log is where the hook's author looks)."""
    worker = WorkerProcess.start(scripts, timeout_ms, validate=True, log_prints=False)
    _reap(worker.proc)
    return worker.hooks


def _reap(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def _log_print(script: str, line: str) -> None:
    logger.info("lua hook %s: print: %s", script, line)


class _Call:
    __slots__ = ("abandoned", "future", "request", "sent_at")

    def __init__(self, request: bytes, future: asyncio.Future[Reply]) -> None:
        self.request = request
        self.future = future
        self.abandoned = False
        self.sent_at = 0.0  # loop time when written to the worker


class LuaWorkers:
    """The relay's side: one warm worker, a FIFO of calls waiting for it, restarts in the background.
    Lives on one event loop (bound at the first call); `health()` and `close()` may come from any thread."""

    def __init__(self, scripts: tuple[LuaScript, ...], timeout_ms: int, first: WorkerProcess) -> None:
        self._scripts = scripts
        self._timeout_ms = timeout_ms
        self.hooks = first.hooks
        self._budget = cpu_budget_s(len(first.hooks), timeout_ms)
        self._backstop_s = max(MIN_BACKSTOP_S, 10 * self._budget)
        self._worker: WorkerProcess | None = first
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer = bytearray()
        self._waiting: collections.deque[_Call] = collections.deque()
        self._in_flight: _Call | None = None
        self._backstop: asyncio.TimerHandle | None = None
        self._killed_at_deadline = False
        self._restarting: asyncio.Task[None] | None = None
        self._starting: WorkerProcess | None = None  # started in a thread, not yet attached
        self._start_failures = 0
        # When the worker died on its own (not at a deadline) or failed to start; a reply clears it.
        self._troubles: collections.deque[float] = collections.deque(maxlen=MAX_TROUBLES)
        self._last_failure = ""
        self._closed = False
        self._lock = threading.Lock()  # close() from another thread against the loop's own bookkeeping

    # -- calls

    async def call(self, request: object) -> Reply:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._bind(loop)
        if self._closed:
            raise WorkerError("lua hooks: the chain is closed", kind="error")
        if self.broken:
            raise WorkerError(f"lua hooks: {self.health()}", kind="error")
        if len(self._waiting) >= MAX_WAITING:
            raise WorkerError(
                f"lua hooks: {MAX_WAITING} messages already wait for the worker", kind="timeout"
            )
        call = _Call(encode(request), loop.create_future())
        self._waiting.append(call)
        self._pump()
        try:
            return await call.future  # cancelling it is harmless: a late reply finds it done
        except BaseException:
            call.abandoned = True
            raise

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def broken(self) -> bool:
        """No worker can be started: calls fail at once. (A worker that keeps dying still gets calls:
        the one that succeeds proves it healthy again.)"""
        return self._start_failures >= MAX_START_FAILURES

    def health(self) -> str | None:
        """None while Lua hooks can run; else why not (for /healthz)."""
        if self._start_failures >= MAX_START_FAILURES:
            return (
                f"the Lua worker process failed to start {self._start_failures} times in a row "
                f"(last: {self._last_failure})"
            )
        troubles = list(self._troubles)
        if len(troubles) >= MAX_TROUBLES and troubles[0] > time.monotonic() - TROUBLE_WINDOW_S:
            return (
                f"the Lua worker process died or failed to start {len(troubles)} times within "
                f"{TROUBLE_WINDOW_S:g} s without answering a message (last: {self._last_failure})"
            )
        return None

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve calls from `loop`; a chain moved to another loop (tests) starts its worker afresh."""
        if self._loop is not None:
            worker = self._worker
            self._detach(kill=True)
            if worker is not None:
                _reap(worker.proc)
            self._fail_all(WorkerError("lua hooks: moved to another event loop", kind="error"))
            self._worker = None
        self._loop = loop
        if self._worker is not None:
            self._attach(self._worker)
        else:
            self._restart()

    def _attach(self, worker: WorkerProcess) -> None:
        assert self._loop is not None
        os.set_blocking(worker.read_fd, False)
        self._buffer.clear()
        self._loop.add_reader(worker.read_fd, self._on_readable, worker)

    def _pump(self) -> None:
        if self._in_flight is not None or self._worker is None or self._restarting is not None:
            return
        while self._waiting and self._waiting[0].abandoned:
            self._waiting.popleft()
        if not self._waiting:
            return
        call = self._waiting.popleft()
        worker = self._worker
        try:
            view = memoryview(call.request)
            while view:
                view = view[os.write(worker.write_fd, view) :]
        except OSError:  # it died: its stdout's end of file follows and restarts it
            self._waiting.appendleft(call)
            return
        self._in_flight = call
        assert self._loop is not None
        call.sent_at = self._loop.time()
        if self._backstop is None:  # one timer re-armed as needed, not one per message
            self._backstop = self._loop.call_at(call.sent_at + self._backstop_s, self._on_backstop)

    def _on_backstop(self) -> None:
        assert self._loop is not None
        self._backstop = None
        call, worker = self._in_flight, self._worker
        if call is None or worker is None:
            return
        due = call.sent_at + self._backstop_s
        if self._loop.time() < due:
            self._backstop = self._loop.call_at(due, self._on_backstop)
            return
        self._killed_at_deadline = True
        worker.kill()

    def _on_readable(self, worker: WorkerProcess) -> None:
        try:
            chunk = os.read(worker.read_fd, 65536)  # under malloc's mmap threshold: no mmap per read
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._on_death(worker)
            return
        self._buffer += chunk
        while len(self._buffer) >= FRAME.size:
            (length,) = FRAME.unpack_from(self._buffer)
            if length > MAX_REPLY_BYTES:
                self._protocol_error(worker, "an oversized reply")
                return
            if len(self._buffer) < FRAME.size + length:
                return
            frame = bytes(self._buffer[FRAME.size : FRAME.size + length])
            del self._buffer[: FRAME.size + length]
            call, self._in_flight = self._in_flight, None
            if call is None:
                self._protocol_error(worker, "a reply nobody asked for")
                return
            try:
                outcome = parse_reply(frame)
            except ValueError as error:
                self._in_flight = call
                self._protocol_error(worker, f"a malformed reply ({error})")
                return
            self._troubles.clear()
            if not call.future.done():
                if isinstance(outcome, WorkerError):
                    call.future.set_exception(outcome)
                else:
                    call.future.set_result(outcome)
            self._pump()

    def _protocol_error(self, worker: WorkerProcess, what: str) -> None:
        self._last_failure = f"it sent {what}"
        worker.kill()  # its end of file follows, and the restart

    def _on_death(self, worker: WorkerProcess) -> None:
        assert self._loop is not None
        self._detach(kill=True)
        call, self._in_flight = self._in_flight, None
        deadline_kill = self._killed_at_deadline
        self._killed_at_deadline = False
        if self._backstop is not None:
            self._backstop.cancel()
            self._backstop = None
        self._restart(failed=call, deadline_kill=deadline_kill, dead=worker)

    def _detach(self, *, kill: bool) -> None:
        worker = self._worker
        if worker is None:
            return
        self._worker = None
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(worker.read_fd)
        if kill:
            worker.kill()

    def _restart(
        self,
        *,
        failed: _Call | None = None,
        deadline_kill: bool = False,
        dead: WorkerProcess | None = None,
    ) -> None:
        if self._closed or self._restarting is not None:
            return
        assert self._loop is not None
        self._restarting = self._loop.create_task(
            self._restart_task(failed, deadline_kill, dead), name="lua-worker-restart"
        )

    async def _restart_task(
        self, failed: _Call | None, deadline_kill: bool, dead: WorkerProcess | None
    ) -> None:
        try:
            if dead is not None:
                returncode = _reap_code(dead.proc)  # it closed its stdout, so it is exiting: no wait
                at_deadline = deadline_kill or returncode == -signal.SIGPROF
                if failed is not None and not failed.future.done():
                    if at_deadline:
                        failed.future.set_exception(
                            WorkerError(
                                f"lua hooks: stopped at the deadline ({self._budget * 1000:g} ms of CPU; "
                                "the worker process was killed and is replaced)",
                                kind="timeout",
                            )
                        )
                    else:
                        failed.future.set_exception(
                            WorkerError(
                                f"lua hooks: the worker process died ({describe_exit(returncode)})",
                                kind="error",
                            )
                        )
                if not at_deadline:
                    self._troubles.append(time.monotonic())
                    self._last_failure = describe_exit(returncode)
            attempt = 0
            while not self._closed:
                await asyncio.sleep(RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)])
                attempt += 1
                try:
                    worker = await self._in_thread(self._start_worker)
                except WorkerStartError as error:
                    self._start_failures += 1
                    self._troubles.append(time.monotonic())
                    self._last_failure = str(error)
                    if self.broken:
                        self._fail_all(WorkerError(f"lua hooks: {self.health()}", kind="error"))
                    continue
                with self._lock:
                    if self.closed:  # close() reaped it
                        return
                    self._starting = None
                    self._start_failures = 0
                    self._worker = worker
                self._attach(worker)
                return
        finally:
            self._restarting = None
            self._pump()

    @staticmethod
    async def _in_thread(function: Callable[[], T]) -> T:
        """Run `function` in a thread of its own that ends with it: not the loop's executor, whose idle
        threads stay, nor a thread that an exiting interpreter would wait for."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(value: T | None, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(value)  # type: ignore[arg-type]

        def run() -> None:
            try:
                value, error = function(), None
            except BaseException as caught:  # handed to the awaiting task
                value, error = None, caught
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(settle, value, error)

        threading.Thread(target=run, name="lua-worker-start", daemon=True).start()
        return await future

    def _start_worker(self) -> WorkerProcess:
        """In a thread: start a worker; one that comes up after close() is reaped here, one that comes up
        before the restart task resumes is reaped by close()."""
        worker = WorkerProcess.start(self._scripts, self._timeout_ms, validate=False)
        with self._lock:
            if self._closed:
                _reap(worker.proc)
                raise WorkerStartError("the chain was closed")
            self._starting = worker
        return worker

    def _fail_all(self, error: WorkerError) -> None:
        while self._waiting:
            call = self._waiting.popleft()
            if not call.future.done():
                call.future.set_exception(error)

    def close(self) -> None:
        """Kill the worker (it holds nothing to flush); callable from any thread, more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            starting, self._starting = self._starting, None
            worker, self._worker = self._worker, None
        if starting is not None:
            _reap(starting.proc)
        if worker is None:
            return
        worker.kill()
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            if loop is not None and not loop.is_closed():
                loop.remove_reader(worker.read_fd)
            _reap(worker.proc)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.remove_reader(worker.read_fd)
            _reap(worker.proc)
            return
        worker.proc.wait()
        try:  # the loop's thread unregisters the pipe before it is closed: fd numbers are reused
            loop.call_soon_threadsafe(_unregister_and_reap, loop, worker)
        except RuntimeError:  # the loop closed meanwhile
            _reap(worker.proc)


def _unregister_and_reap(loop: asyncio.AbstractEventLoop, worker: WorkerProcess) -> None:
    loop.remove_reader(worker.read_fd)
    _reap(worker.proc)


def _reap_code(proc: subprocess.Popen[bytes]) -> int:
    _reap(proc)
    return proc.returncode
