"""Replies keep their meaning: whatever bytes the upstream puts in a reply, the app gets exactly one reply
line of the same class, printable ASCII, at most 512 octets; anything unexpected is a 451, never
aiosmtpd's `500 Error`."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbound_relay.delivery import RelayHandler
from outbound_relay.errors import HookFailed
from outbound_relay.reply import Reply, printable
from tests.support.faulty import Faults, FaultyUpstream, plain_policy
from tests.support.relay import message, running_relay, submit, write_config

_HOSTILE_REPLIES = [
    [b"250 2.0.0 Ok: queued as caf\xe9 (Latin-1)"],
    [b"250 2.0.0 queued \x00 with NUL"],
    [b"250 2.0.0 queued \rwith a CR\r"],
    [b"250 2.0.0 " + b"x" * 5000],
    [b"250-2.0.0 first \xff", b"250-\x1b[31m escape", b"250 2.0.0 last"],
    [b"451-4.3.0 temporary \xe9", b"451 4.3.0 try later \x00"],
    [b"550-5.7.1 refused \xe9", b"550 5.7.1 \xff\xfe"],
]


@pytest.mark.parametrize("final", _HOSTILE_REPLIES, ids=lambda lines: repr(lines[-1][:24]))
async def test_the_final_reply_keeps_its_class_whatever_its_bytes(
    config_path: Path, final: list[bytes]
) -> None:
    async with FaultyUpstream(Faults(replies={".": final})) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message())
    assert outcome.data_reply is not None
    code, text = outcome.data_reply
    assert code // 100 == int(final[-1][:1]), outcome
    assert text.isascii() and text.isprintable() and len(text) <= 510


@pytest.mark.parametrize("refusal", [b"451 4.2.0 busy \xe9\x00", b"550 5.1.1 unknown \xe9\r"])
async def test_a_refused_recipient_keeps_its_class_whatever_its_bytes(
    config_path: Path, refusal: bytes
) -> None:
    faults = Faults(refuse_rcpts={"b@example.net": refusal})
    async with FaultyUpstream(faults) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message())
    assert outcome.code // 100 == int(refusal[:1]), outcome


@settings(deadline=None)
@given(st.integers(200, 599), st.binary(max_size=2000))
def test_one_line_is_printable_bounded_and_keeps_the_code(code: int, text: bytes) -> None:
    line = Reply.parse([str(code).encode() + b" " + text.replace(b"\n", b"")]).one_line()
    assert line.isascii() and line.isprintable() and len(line) <= 510
    assert line[:3] == str(code) and line[3:4] in ("", " ")
    line.encode("ascii")  # what aiosmtpd does with it, without SMTPUTF8


def test_relay_errors_are_one_printable_line_in_logs_and_replies() -> None:
    error = HookFailed("hook said: bad\r\n250 OK\x00 caf\u00e9")
    assert str(error) == error.reply.one_line() == "451 4.3.0 hook said: bad 250 OK? caf?"
    assert printable("a" * 20, 10) == "aaaaaaa..."


async def test_an_unexpected_exception_is_a_451() -> None:
    handler = RelayHandler.__new__(RelayHandler)
    reply = await handler.handle_exception(UnicodeEncodeError("ascii", "\udce9", 0, 1, "surrogates"))
    assert reply.startswith("451 "), reply
