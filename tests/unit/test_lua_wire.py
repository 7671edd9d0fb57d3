"""The Lua worker's wire format: replies are parsed strictly (anything malformed is a ValueError), valid
ones survive the trip, and a hook in the worker process sees a message exactly as the sandbox run in the
relay's own process sees it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from outbound_relay.config import Hooks
from outbound_relay.hook_state import LuaScript, MessageState
from outbound_relay.hooks import HookChain, HookError, HookMessage
from outbound_relay.lua_process import FRAME, encode
from outbound_relay.lua_sandbox import LuaHookError, LuaSandbox
from outbound_relay.lua_worker import Reply, WorkerError, parse_reply
from outbound_relay.message import parse_headers

keys = st.text(min_size=1, max_size=40)
values = st.text(max_size=200)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def body(frame: bytes) -> bytes:
    (length,) = FRAME.unpack_from(frame)
    assert len(frame) == FRAME.size + length
    return frame[FRAME.size :]


@given(
    context=st.dictionaries(keys, values, max_size=20),
    binding=st.text(max_size=50),
    prints=st.lists(st.tuples(st.text(max_size=30), st.text(max_size=100)), max_size=5),
)
@example(context={"k\udcff": "lone surrogate \udc80"}, binding="b", prints=[])
def test_a_valid_reply_survives_the_trip(
    context: dict[str, str], binding: str, prints: list[tuple[str, str]]
) -> None:
    reply = parse_reply(body(encode({"context": context, "binding": binding, "print": prints})))
    assert reply == Reply(context=context, binding=binding, prints=tuple(prints))


@given(st.binary(max_size=300))
@example(b'{"context": {}, "binding": "b", "print": [3]}')
@example(b'{"context": {}, "binding": "b", "print": [{"a": 1}]}')
@example(b'{"error": "x", "kind": "error", "hook": 1}')
def test_any_bytes_parse_or_are_a_value_error(frame: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_reply(frame)


@given(
    json_values,
    st.dictionaries(st.sampled_from(["context", "binding", "print", "error", "kind", "hook"]), json_values),
)
def test_any_json_parses_or_is_a_value_error(value: Any, fields: dict[str, Any]) -> None:
    for candidate in (value, fields):
        try:
            outcome = parse_reply(json.dumps(candidate).encode())
        except ValueError:
            continue
        assert isinstance(outcome, Reply | WorkerError)
        if isinstance(outcome, Reply):
            assert all(isinstance(k, str) and isinstance(v, str) for k, v in outcome.context.items())


ECHO = """\
local mod = {}
function mod:outbound_smtp_auth_config(msg)
  msg:context_set(VCTX_MESS, 'header', msg:header('X-Test') or '<none>')
  msg:context_set(VCTX_MESS, 'upper', msg:header('x-TEST') or '<none>')
  msg:context_set(VCTX_MESS, 'from', msg:mailfrom())
  msg:context_set(VCTX_MESS, 'rcpt', msg:rcptto() or '<none>')
  msg:context_set(VCTX_MESS, 'n', #msg:recipients())
  msg:context_set(VCTX_MESS, 'kept', msg:context_get(VCTX_MESS, 'kept') or '<none>')
  msg:binding(msg:binding() .. '-seen')
end
msys.registerModule("echo", mod)
"""


@pytest.fixture(scope="module")
def echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HookChain, asyncio.AbstractEventLoop]]:
    directory = tmp_path_factory.mktemp("echo")
    (directory / "echo.lua").write_text(ECHO)
    loop = asyncio.new_event_loop()
    chain = HookChain.load(Hooks(lua=(Path("echo.lua"),)), directory)
    yield chain, loop
    chain.close()
    loop.close()


header_bytes = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
# What the server can hand a hook: any text but surrogates. An address that is not valid UTF-8 (which
# aiosmtpd decodes with surrogateescape) is refused at MAIL or RCPT (delivery._unsendable), so no hook
# ever sees one.
addresses = st.text(st.characters(exclude_characters="\r\n", codec="utf-8"), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(
    value=header_bytes,
    mailfrom=addresses,
    rcptto=st.lists(addresses, max_size=3),
    kept=st.none() | values,
)
@example(value=b"=?utf-8?q?caf=C3=A9?=", mailfrom="a@b", rcptto=["c@d"], kept=None)
@example(value=b"\xff\xfe raw 8-bit", mailfrom="a@b", rcptto=[], kept="x")
def test_the_worker_sees_what_the_in_process_sandbox_sees(
    echo: tuple[HookChain, asyncio.AbstractEventLoop],
    value: bytes,
    mailfrom: str,
    rcptto: list[str],
    kept: str | None,
) -> None:
    chain, loop = echo
    headers = parse_headers(b"Subject: x\r\nX-Test: " + value + b"\r\n\r\n")
    context = {} if kept is None else {"kept": kept}
    msg = HookMessage(mailfrom=mailfrom, rcptto=tuple(rcptto), headers=headers, binding="b", context=context)
    sandbox = LuaSandbox((LuaScript(name="echo.lua", source=ECHO),), timeout_ms=1000)
    state = MessageState(
        mailfrom=mailfrom, rcptto=tuple(rcptto), headers=headers, binding="b", context=dict(context)
    )
    try:
        sandbox.run(state)
        expected: tuple[object, ...] = (state.context, state.binding)
    except LuaHookError as error:
        expected = ("error", str(error))
    try:
        loop.run_until_complete(chain.run(msg))
        got: tuple[object, ...] = (msg.context, msg.binding)
    except HookError as error:
        got = ("error", str(error))
    assert got == expected
