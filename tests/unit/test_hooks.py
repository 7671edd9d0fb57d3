"""Per-message hooks: the seed's Lua example, the `msg` API, the sandbox, Python hooks, load errors."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import gc
import os
import threading
import time
from pathlib import Path

import pytest

from outbound_relay.config import ConfigError, Hooks
from outbound_relay.hook_state import LuaScript
from outbound_relay.hooks import VCTX_MESS, HookChain, HookError, HookMessage, PythonHookMsg
from outbound_relay.lua_worker import WorkerStartError, check_scripts
from tests.support.seed import SEED_LUA, SEED_TOKEN, SEED_USER

HEADERS = (
    b"From: App <app@example.com>\r\nTo: a@bird.com\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"X-Tenant: blue\r\nX-Tenant: green\r\n\r\n"
)


def lua_module(body: str) -> str:
    head = "local mod = {}\nfunction mod:outbound_smtp_auth_config(msg)\n"
    return f"{head}{body}\nend\nmsys.registerModule('t', mod)\n"


def message(**overrides: object) -> HookMessage:
    fields: dict[str, object] = {
        "mailfrom": "app@example.com",
        "rcptto": ("a@bird.com", "b@bird.com"),
        "headers": email.parser.BytesHeaderParser(policy=email.policy.SMTP).parsebytes(HEADERS),
        "binding": "default",
        "context": {},
    }
    fields.update(overrides)
    return HookMessage(**fields)  # type: ignore[arg-type]


def chain(tmp_path: Path, *lua: str, python: tuple[str, ...] = (), timeout_ms: int = 50) -> HookChain:
    names = []
    for i, source in enumerate(lua):
        (tmp_path / f"hook{i}.lua").write_text(source)
        names.append(f"hook{i}.lua")
    return HookChain.load(
        Hooks(lua=tuple(Path(n) for n in names), python=python, timeout_ms=timeout_ms), tmp_path
    )


# Python hooks, referenced as f"{__name__}:name".
def python_seed(msg: PythonHookMsg) -> None:
    msg.context_set(VCTX_MESS, "outbound_smtp_auth_type", "PLAIN")
    msg.context_set(VCTX_MESS, "seen_by_python", msg.context_get(VCTX_MESS, "from_lua") or "nothing")


def python_reader(msg: PythonHookMsg) -> None:
    msg.context_set(VCTX_MESS, "read", f"{msg.mailfrom()}|{msg.rcptto()}|{msg.header('x-tenant')}")
    msg.binding(f"{msg.binding()}-py")


def python_raises(msg: PythonHookMsg) -> None:
    raise KeyError(SEED_TOKEN)


def python_misuse(msg: PythonHookMsg) -> None:
    msg.context_set(2, "key", "value")


def python_sleeps(msg: PythonHookMsg) -> None:
    if msg.header("X-Sleep"):
        time.sleep(0.3)
    msg.context_set(VCTX_MESS, "done", "yes")


async def python_async(msg: PythonHookMsg) -> None:
    if msg.header("X-Sleep"):
        await asyncio.sleep(10)
    msg.context_set(VCTX_MESS, "async", "yes")


NOT_A_FUNCTION = 42


def lua_workers() -> list[int]:
    """Pids of this process's Lua worker children that are not reaped yet (zombies included)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            int(stat.rpartition(")")[2].split()[1]) == os.getpid()
            and b"outbound_relay.lua_process" in cmdline
        ):
            found.append(int(entry))
    return found


class TestSeedExample:
    async def test_sets_the_three_context_keys(self, tmp_path: Path) -> None:
        msg = message()
        await chain(tmp_path, SEED_LUA).run(msg)
        assert msg.context == {
            "outbound_smtp_auth_type": "XOAUTH2",
            "outbound_smtp_auth_user": SEED_USER,
            "outbound_smtp_auth_pass": SEED_TOKEN,
        }

    async def test_keeps_context_keys_it_does_not_set(self, tmp_path: Path) -> None:
        msg = message(context={"tenant": "blue", "outbound_smtp_auth_user": "before"})
        await chain(tmp_path, SEED_LUA).run(msg)
        assert msg.context["tenant"] == "blue"
        assert msg.context["outbound_smtp_auth_user"] == SEED_USER

    async def test_runs_for_many_messages(self, tmp_path: Path) -> None:
        hooks = chain(tmp_path, SEED_LUA)
        for _ in range(200):
            msg = message()
            await hooks.run(msg)
            assert msg.context["outbound_smtp_auth_pass"] == SEED_TOKEN

    def test_empty_hooks_are_false(self, tmp_path: Path) -> None:
        assert not HookChain.load(Hooks(), tmp_path)
        assert chain(tmp_path, SEED_LUA)
        assert chain(tmp_path, SEED_LUA).names == ("lua hook0.lua (module my_auth)",)


class TestLuaMsg:
    async def test_context_get_sees_earlier_sets_and_later_files_see_them(self, tmp_path: Path) -> None:
        first = lua_module(
            "msg:context_set(VCTX_MESS, 'a', 'one')\n"
            "msg:context_set(VCTX_MESS, 'b', msg:context_get(VCTX_MESS, 'a') .. '+')\n"
            "msg:context_set(VCTX_MESS, 'n', 42)"
        )
        second = lua_module("msg:context_set(VCTX_MESS, 'c', msg:context_get(VCTX_MESS, 'b') .. 'two')")
        msg = message(context={"given": "x"})
        await chain(tmp_path, first, second).run(msg)
        assert msg.context == {"given": "x", "a": "one", "b": "one+", "n": "42", "c": "one+two"}

    async def test_nil_deletes_a_key(self, tmp_path: Path) -> None:
        msg = message(context={"gone": "x"})
        await chain(tmp_path, lua_module("msg:context_set(VCTX_MESS, 'gone', nil)")).run(msg)
        assert msg.context == {}

    async def test_reads_the_message(self, tmp_path: Path) -> None:
        body = (
            "local r = msg:recipients()\n"
            "msg:context_set(VCTX_MESS, 'from', msg:mailfrom())\n"
            "msg:context_set(VCTX_MESS, 'rcpt', msg:rcptto())\n"
            "msg:context_set(VCTX_MESS, 'all', table.concat(r, ','))\n"
            "msg:context_set(VCTX_MESS, 'tenant', msg:header('x-TENANT'))\n"
            "msg:context_set(VCTX_MESS, 'subject', msg:header('Subject'))\n"
            "msg:context_set(VCTX_MESS, 'missing', tostring(msg:header('X-None')))\n"
            "msg:context_set(VCTX_MESS, 'binding', msg:binding())"
        )
        msg = message()
        await chain(tmp_path, lua_module(body)).run(msg)
        assert msg.context == {
            "from": "app@example.com",
            "rcpt": "a@bird.com",
            "all": "a@bird.com,b@bird.com",
            "tenant": "blue",
            "subject": "café",
            "missing": "nil",
            "binding": "default",
        }

    async def test_sets_the_binding(self, tmp_path: Path) -> None:
        body = "if msg:header('X-Tenant') == 'blue' then msg:binding('bulk-' .. msg:header('X-Tenant')) end"
        msg = message()
        await chain(tmp_path, lua_module(body)).run(msg)
        assert msg.binding == "bulk-blue"

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            ("msg:context_set(VCTX_CONN, 'k', 'v')", "context_set: the first argument must be VCTX_MESS"),
            ("msg:context_set(VCTX_MESS, {}, 'v')", "context_set: the key must be a string"),
            ("msg:context_set(VCTX_MESS, 'k', {})", "context_set: the value must be a string"),
            ("msg:context_set(VCTX_MESS, 'k', string.rep('x', 70000))", "longer than 65536 bytes"),
            ("msg:binding('')", "binding: the name must be a string"),
            ("msg:header(nil)", "header: the name must be a non-empty string"),
        ],
    )
    async def test_misuse_is_an_error_with_position(self, tmp_path: Path, body: str, reason: str) -> None:
        with pytest.raises(HookError) as caught:
            await chain(tmp_path, lua_module(body)).run(message())
        assert caught.value.kind == "error"
        assert "hook0.lua:3: " in str(caught.value)
        assert reason in str(caught.value)

    async def test_failed_call_changes_nothing(self, tmp_path: Path) -> None:
        body = "msg:context_set(VCTX_MESS, 'outbound_smtp_auth_user', 'half')\nmsg:binding('x')\nerror('x')"
        msg = message(context={"k": "v"})
        with pytest.raises(HookError):
            await chain(tmp_path, lua_module(body)).run(msg)
        assert msg.context == {"k": "v"}
        assert msg.binding == "default"

    async def test_momentum_idioms_still_work(self, tmp_path: Path) -> None:
        source = (
            'require("msys.core")\nrequire("msys.extended.message")\n'
            "local mod = {}\n"
            "function mod:outbound_smtp_auth_config(msg)\n"
            "  local user, domain = unpack({msg:rcptto():match('^(.-)@(.*)$')})\n"
            "  local ok = pcall(error, 'caught')\n"
            "  msg:context_set(VCTX_MESS, 'domain', domain .. tostring(ok))\n"
            "  print('hook saw', domain)\n"
            "end\n"
            'msys.registerModule("idioms", mod)\n'
        )
        msg = message()
        await chain(tmp_path, source).run(msg)
        assert msg.context == {"domain": "bird.comfalse"}


# Each escape runs only when the message asks for it, so the same chain then proves it still works.
ESCAPES = {
    "os.execute": "os.execute('touch /tmp/pwned')",
    "io.open": "io.open('/etc/passwd')",
    "require": "require('os')",
    "require a file": "require('hook0')",
    "loadfile": "loadfile('/etc/passwd')",
    "dofile": "dofile('/etc/passwd')",
    "load bytecode": "assert(load('\\27Lua\\84\\0'))",
    "string.dump": "string.dump(function() end)",
    "method string.dump": "('').dump(function() end)",
    "string metatable": "getmetatable('').__index.dump(function() end)",
    "debug.sethook": "debug.sethook()",
    "package.loadlib": "package.loadlib('libc.so.6', 'system')",
    "python": "python.eval('1')",
    "_G.os": "_G.os.exit()",
    "collectgarbage": "collectgarbage('stop')",
    "__gc finalizer": "setmetatable({}, {__gc = function() while true do end end})",
    "coroutine": "coroutine.wrap(function() end)()",
    "string.rep bomb": "local s = string.rep('x', 1e9)",
    "doubling bomb": "local s = 'x' for i = 1, 40 do s = s .. s end",
    "table bomb": "local t = {} for i = 1, 1e9 do t[i] = i end",
    "infinite loop": "while true do end",
    "loop swallowing errors": "while true do pcall(function() while true do end end) end",
    "loop in xpcall": "while true do xpcall(function() while true do end end, function() end) end",
    "deep recursion": "local function f(n) return 1 + f(n + 1) end f(1)",
    "recursion through gsub": "local function f(s) return (s:gsub('.', f)) end f('ab')",
}


class TestSandbox:
    @pytest.mark.parametrize("escape", ESCAPES.values(), ids=ESCAPES.keys())
    async def test_escape_fails_and_the_next_message_works(self, tmp_path: Path, escape: str) -> None:
        body = f"if msg:header('X-Escape') then\n{escape}\nend\nmsg:context_set(VCTX_MESS, 'ok', 'yes')"
        hooks = chain(tmp_path, lua_module(body))
        bad = message()
        bad.headers["X-Escape"] = "1"
        started = time.monotonic()
        with pytest.raises(HookError) as caught:
            await hooks.run(bad)
        assert time.monotonic() - started < 1.0
        assert caught.value.kind in ("error", "timeout")
        assert "ok" not in bad.context
        good = message()
        await hooks.run(good)
        assert good.context == {"ok": "yes"}
        assert not Path("/tmp/pwned").exists()

    async def test_a_loop_is_a_timeout(self, tmp_path: Path) -> None:
        with pytest.raises(HookError) as caught:
            await chain(tmp_path, lua_module("while true do end"), timeout_ms=20).run(message())
        assert caught.value.kind == "timeout"
        # The sandbox stops it at 20 ms of the worker's CPU time, before the worker's CPU timer (40 ms).
        assert str(caught.value) == "lua hook hook0.lua (module t): ran past its 20 ms limit"

    async def test_a_memory_bomb_is_an_error(self, tmp_path: Path) -> None:
        with pytest.raises(HookError) as caught:
            await chain(tmp_path, lua_module("local s = string.rep('x', 1e9)")).run(message())
        assert caught.value.kind == "error"
        assert "not enough memory" in str(caught.value)

    async def test_state_kept_in_globals_survives_between_messages(self, tmp_path: Path) -> None:
        body = "count = (count or 0) + 1\nmsg:context_set(VCTX_MESS, 'count', count)"
        hooks = chain(tmp_path, lua_module(body))
        for expected in ("1", "2"):
            msg = message()
            await hooks.run(msg)
            assert msg.context["count"] == expected

    async def test_files_do_not_share_globals_or_libraries(self, tmp_path: Path) -> None:
        first = lua_module("shared = 'first'\nstring.upper = function() return 'evil' end")
        second = lua_module("msg:context_set(VCTX_MESS, 'seen', tostring(shared) .. string.upper('x'))")
        msg = message()
        await chain(tmp_path, first, second).run(msg)
        assert msg.context == {"seen": "nilX"}

    async def test_a_stall_inside_one_c_call_is_stopped(self, tmp_path: Path) -> None:
        # A backtracking pattern runs in C for ~0.3 s, where no count hook fires: the worker process's CPU
        # timer stops it (tests/unit/test_hooks_isolation.py has the longer ones).
        body = (
            "if msg:header('X-Escape') then string.find(string.rep('a', 180), '.-.-.-b') end\n"
            "msg:context_set(VCTX_MESS, 'ok', 'yes')"
        )
        hooks = chain(tmp_path, lua_module(body))
        bad = message()
        bad.headers["X-Escape"] = "1"
        started = time.monotonic()
        with pytest.raises(HookError) as caught:
            await hooks.run(bad)
        assert time.monotonic() - started < 5  # 100 ms of the worker's CPU time, on a loaded machine
        assert caught.value.kind == "timeout"
        good = message()
        await hooks.run(good)  # a fresh runtime in a fresh process
        assert good.context == {"ok": "yes"}

    @pytest.mark.parametrize(
        "raise_it",
        [
            f"error('token {SEED_TOKEN}')",
            f"error({{'{SEED_TOKEN}'}})",
            f"error('attempt to ' .. '{SEED_TOKEN}', 0)",
            f"local t = setmetatable({{}}, {{__tostring = function() return '{SEED_TOKEN}' end}}) error(t)",
        ],
    )
    async def test_error_text_from_the_hook_is_not_in_the_message(
        self, tmp_path: Path, raise_it: str
    ) -> None:
        source = lua_module(
            f"msg:context_set(VCTX_MESS, 'outbound_smtp_auth_pass', '{SEED_TOKEN}')\n{raise_it}"
        )
        with pytest.raises(HookError) as caught:
            await chain(tmp_path, source).run(message())
        assert SEED_TOKEN not in str(caught.value)
        assert SEED_TOKEN not in repr(caught.value.args)

    async def test_lua_runtime_errors_keep_their_text(self, tmp_path: Path) -> None:
        with pytest.raises(HookError) as caught:
            await chain(tmp_path, lua_module("os.execute('x')")).run(message())
        assert str(caught.value) == (
            "lua hook hook0.lua (module t): hook0.lua:3: attempt to index a nil value (global 'os')"
        )


class TestPythonHooks:
    async def test_same_msg_api(self, tmp_path: Path) -> None:
        lua = lua_module("msg:context_set(VCTX_MESS, 'from_lua', 'hello')")
        msg = message()
        await chain(tmp_path, lua, python=(f"{__name__}:python_seed", f"{__name__}:python_reader")).run(msg)
        assert msg.context == {
            "from_lua": "hello",
            "outbound_smtp_auth_type": "PLAIN",
            "seen_by_python": "hello",
            "read": "app@example.com|a@bird.com|blue",
        }
        assert msg.binding == "default-py"

    async def test_an_exception_is_an_error_without_its_text(self, tmp_path: Path) -> None:
        with pytest.raises(HookError) as caught:
            await chain(tmp_path, python=(f"{__name__}:python_raises",)).run(message())
        assert caught.value.kind == "error"
        assert SEED_TOKEN not in str(caught.value)
        assert str(caught.value).startswith(f"python hook {__name__}:python_raises: raised KeyError at ")
        assert "test_hooks.py:" in str(caught.value)

    async def test_misuse_is_explained(self, tmp_path: Path) -> None:
        with pytest.raises(HookError, match="context_set: the first argument must be VCTX_MESS"):
            await chain(tmp_path, python=(f"{__name__}:python_misuse",)).run(message())

    @pytest.mark.parametrize("name", ["python_sleeps", "python_async"])
    async def test_timeout_then_the_next_message_works(self, tmp_path: Path, name: str) -> None:
        hooks = chain(tmp_path, python=(f"{__name__}:{name}",))
        slow = message()
        slow.headers["X-Sleep"] = "1"
        started = time.monotonic()
        with pytest.raises(HookError) as caught:
            await hooks.run(slow)
        assert time.monotonic() - started < 0.25
        assert caught.value.kind == "timeout"
        assert slow.context == {}
        fast = message()
        await hooks.run(fast)
        assert fast.context in ({"done": "yes"}, {"async": "yes"})

    async def test_late_result_of_an_abandoned_call_is_dropped(self, tmp_path: Path) -> None:
        hooks = chain(tmp_path, python=(f"{__name__}:python_sleeps",))
        slow = message()
        slow.headers["X-Sleep"] = "1"
        with pytest.raises(HookError):
            await hooks.run(slow)
        await asyncio.sleep(0.35)  # the thread finishes and sets "done" on its private copy only
        assert slow.context == {}

    def test_workers_stop_with_the_chain(self, tmp_path: Path) -> None:
        before = set(threading.enumerate())
        ours: list[threading.Thread] = []

        processes: list[int] = []

        async def one() -> None:
            hooks = chain(tmp_path, SEED_LUA, python=(f"{__name__}:python_seed",))
            await hooks.run(message())
            ours.extend(t for t in set(threading.enumerate()) - before if t.name.endswith("-hooks-0"))
            processes.extend(lua_workers())

        gc.collect()  # chains of earlier tests, and their workers
        asyncio.run(one())
        assert len(ours) == 1  # the first of the Python pool (Lua runs in a worker process)
        assert len(processes) == 1
        deadline = time.monotonic() + 2
        while any(t.is_alive() for t in ours) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not any(t.is_alive() for t in ours)
        assert not lua_workers()  # the chain was garbage-collected: its worker process is gone


class TestLoadErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"hooks.lua\[0\] 'nope.lua': cannot be read: No such file"):
            HookChain.load(Hooks(lua=(Path("nope.lua"),)), tmp_path)

    def test_syntax_error_names_file_and_line_not_the_string(self, tmp_path: Path) -> None:
        source = f"local mod = {{}}\nlocal token = '{SEED_TOKEN}\nmsys.registerModule('x', mod)\n"
        with pytest.raises(ConfigError) as caught:
            chain(tmp_path, SEED_LUA, source)
        assert str(caught.value).startswith("hooks.lua[1] 'hook1.lua': Lua syntax error: hook1.lua:2: ")
        assert SEED_TOKEN not in str(caught.value)

    def test_module_without_the_hook(self, tmp_path: Path) -> None:
        source = "local mod = {}\nfunction mod:validate_data(msg) end\nmsys.registerModule('x', mod)\n"
        with pytest.raises(ConfigError, match=r"hooks.lua\[0\] 'hook0.lua': registers no outbound_smtp_auth"):
            chain(tmp_path, source)

    def test_top_level_error(self, tmp_path: Path) -> None:
        with pytest.raises(
            ConfigError, match=r"'hook0.lua': its top-level code failed: hook0.lua:1: attempt"
        ):
            chain(tmp_path, "io.write('x')")

    def test_top_level_loop(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigError, match=r"'hook0.lua': its top-level code ran past the 1000 ms"):
            chain(tmp_path, "while true do end")

    @pytest.mark.parametrize(
        "sources",
        [
            (SEED_LUA,),
            (
                SEED_LUA,
                "local mod = {}\nfunction mod:outbound_smtp_auth_config(msg)\n  msg:context_set(\nend\n",
            ),
            ("local mod = {}\nmsys.registerModule('x', mod)\n",),
            ("io.write('x')",),
            (SEED_LUA, SEED_LUA.replace("local mod = {}", "mod = {}")),
        ],
        ids=["seed", "syntax-error", "no-hook", "top-level-error", "two-files"],
    )
    def test_the_operators_check_is_the_relays_load(self, tmp_path: Path, sources: tuple[str, ...]) -> None:
        """check_scripts (what the operator runs before rendering) passes exactly what HookChain.load
        passes, and fails with the same message."""
        scripts = tuple(LuaScript(name=f"hook{i}.lua", source=text) for i, text in enumerate(sources))
        relay_error: str | None = None
        try:
            loaded = chain(tmp_path, *sources)
        except ConfigError as error:
            relay_error = str(error)
        if relay_error is None:
            assert check_scripts(scripts, 50) == tuple(name.removeprefix("lua ") for name in loaded.names)
            loaded.close()
            return
        with pytest.raises(WorkerStartError) as caught:
            check_scripts(scripts, 50)
        assert caught.value.in_files and str(caught.value) == relay_error

    @pytest.mark.parametrize(
        ("ref", "reason"),
        [
            ("no_such_package.mod:fn", "cannot import 'no_such_package.mod': ModuleNotFoundError"),
            (f"{__name__}:missing", "has no attribute 'missing'"),
            (f"{__name__}:NOT_A_FUNCTION", "'NOT_A_FUNCTION' is a int, not a function"),
        ],
    )
    def test_python_import_errors(self, tmp_path: Path, ref: str, reason: str) -> None:
        with pytest.raises(ConfigError) as caught:
            chain(tmp_path, python=(ref,))
        assert str(caught.value).startswith(f"hooks.python[0] {ref!r}: ")
        assert reason in str(caught.value)
