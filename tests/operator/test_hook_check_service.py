"""The hook checker as a process of its own (hook_check_service.py): the operator's check of Lua hooks gives
the same verdicts through its socket as in a child process, says so when the checker cannot be asked,
and the checker refuses to start where a ServiceAccount token is in reach."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from outbound_operator.hook_check import HookChecker
from outbound_operator.hook_check_service import HookCheckServer, check_remote
from outbound_operator.resources import SETTINGS_PLURAL
from outbound_relay.hook_state import LuaScript
from outbound_relay.lua_worker import WorkerStartError
from tests.operator.cluster import Objects
from tests.operator.conftest import StartOperator
from tests.operator.test_hook_check import BROKEN, hook
from tests.operator.test_operator_settings import HOOKS_SPEC
from tests.support.seed import SEED_LUA


@pytest.fixture
async def checker_socket(tmp_path: Path) -> AsyncIterator[Path]:
    server = HookCheckServer(tmp_path / "check.sock")
    await server.start()
    try:
        yield server.socket
    finally:
        await server.close()


async def test_verdicts_through_the_socket_are_those_of_a_local_check(checker_socket: Path) -> None:
    remote, local = HookChecker(checker_socket), HookChecker()
    assert await remote.check("team-a", (hook(SEED_LUA),), 100) is None
    broken = await remote.check("team-a", (hook(BROKEN),), 100)
    assert broken is not None and broken.reason == "HookInvalid", broken
    assert broken == await local.check("team-a", (hook(BROKEN),), 100)
    assert "team-a/hooks" in broken.message


async def test_a_checker_that_cannot_be_asked_is_the_operators_trouble_and_not_remembered(
    tmp_path: Path,
) -> None:
    checker = HookChecker(tmp_path / "check.sock")
    problem = await checker.check("team-a", (hook(SEED_LUA),), 100)
    assert problem is not None and problem.reason == "HookCheckFailed", problem
    assert "cannot be reached" in problem.message
    server = HookCheckServer(checker.socket or tmp_path)
    await server.start()
    try:
        assert await checker.check("team-a", (hook(SEED_LUA),), 100) is None  # asked again, now it answers
    finally:
        await server.close()


async def test_the_socket_is_for_its_owner_only(checker_socket: Path) -> None:
    assert stat.S_IMODE(checker_socket.stat().st_mode) & 0o077 == 0  # nobody but its owner


@pytest.mark.parametrize(
    ("request_line", "named"),
    [
        (b"not json\n", "bad request"),
        (b'{"scripts": [], "timeoutMs": 100}\n', "scripts must be a non-empty list"),
        (b'{"scripts": [{"name": "a"}], "timeoutMs": 100}\n', "string name and source"),
        (b'{"scripts": [{"name": "a", "source": ""}], "timeoutMs": true}\n', "timeoutMs must be an integer"),
        (
            json.dumps({"scripts": [{"name": "a", "source": "x" * (600 * 1024)}], "timeoutMs": 100}).encode()
            + b"\n",
            "more than 524288 bytes",
        ),
    ],
)
async def test_a_bad_request_is_answered_by_name(
    checker_socket: Path, request_line: bytes, named: str
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(checker_socket))
    writer.write(request_line)
    await writer.drain()
    reply = json.loads(await reader.readline())
    writer.close()
    assert reply["ok"] is False and reply["inFiles"] is False, reply
    assert named in reply["error"], reply


async def test_a_hook_that_registers_nothing_is_named(checker_socket: Path) -> None:
    with pytest.raises(WorkerStartError, match="registers no outbound_smtp_auth_config") as refused:
        await check_remote(checker_socket, [LuaScript(name="empty.lua", source="local x = 1\n")], 100)
    assert refused.value.in_files


def test_the_checker_refuses_to_start_with_a_token_in_reach(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("eyJhbGciOi...")
    started = subprocess.run(
        [sys.executable, "-m", "outbound_operator.hook_check_service", "--socket", str(tmp_path / "s"),
         "--service-account-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert started.returncode == 2, started
    assert "a ServiceAccount token is mounted" in started.stderr
    assert "eyJ" not in started.stderr + started.stdout  # never its content
    assert not (tmp_path / "s").exists()


async def test_the_checker_process_serves_when_no_token_is_there(tmp_path: Path) -> None:
    socket = tmp_path / "check.sock"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "outbound_operator.hook_check_service", "--socket", str(socket),
        "--service-account-dir", str(tmp_path / "none"),
    )  # fmt: skip
    try:
        for _ in range(300):
            if socket.exists():
                break
            await asyncio.sleep(0.1)
        await check_remote(socket, [LuaScript(name="seed.lua", source=SEED_LUA)], 100)
    finally:
        process.terminate()
        await process.wait()


async def test_the_operator_asks_again_until_its_checker_answers(
    objects: Objects, start_operator: StartOperator, tmp_path: Path
) -> None:
    """An operator that starts before its hook checker (or outlives a crash of it) says HookCheckFailed,
    then asks again on its own, with backoff, and renders the hooks once the checker answers."""
    socket = tmp_path / "checker" / "check.sock"
    socket.parent.mkdir()
    objects.put_secret("smtp", {"password": "pw"})
    objects.apply_policy(
        "global", {"type": "PLAIN", "user": "u", "passwordSecretRef": {"name": "smtp", "key": "password"}}
    )
    objects.put_config_map("relay-hooks", {"auth.lua": SEED_LUA})
    objects.apply_settings(HOOKS_SPEC)
    start_operator("--hook-checker-socket", str(socket))
    failed = await asyncio.to_thread(
        objects.wait_condition, "default", "Invalid", "True", plural=SETTINGS_PLURAL
    )
    assert failed["reason"] == "HookCheckFailed" and "cannot be reached" in failed["message"], failed
    checker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "outbound_operator.hook_check_service", "--socket", str(socket),
        "--service-account-dir", str(tmp_path / "none"),
    )  # fmt: skip
    try:
        # Nothing changes meanwhile: only the operator's own retry can bring this about.
        await asyncio.to_thread(objects.wait_condition, "default", "Ready", "True", plural=SETTINGS_PLURAL)
    finally:
        checker.terminate()
        await checker.wait()
    assert objects.relay_yaml()["hooks"] == {"lua": ["hook-relay-hooks-auth.lua"]}
