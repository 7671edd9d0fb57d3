"""No smuggling: nothing the app sends makes the relay write a bare CR or LF, an extra command or an early
end of DATA to the upstream (RFC 5321 2.3.8, 4.1.1.4, 4.5.2). Line ends are normalised to CRLF
(docs/delivery.md, "Line ends"); envelope addresses with control characters are refused."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from hypothesis import given
from hypothesis import strategies as st

from outbound_relay.session import _path, encode_data, normalise_line_ends
from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, raw_session, running_relay, write_config
from tests.support.upstream import AuthUpstream

# Bytes rich in what smuggling is made of: CR, LF, dots and command words.
_PIECES = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b".", b"\r.\r", b"\n.\n", b"MAIL FROM:<x@y>", b"a", b"\x00"]
)
hostile_bytes = st.one_of(st.binary(max_size=300), st.lists(_PIECES, max_size=40).map(b"".join))

_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")


@given(hostile_bytes)
def test_encoded_data_has_crlf_only_and_one_end_mark(content: bytes) -> None:
    """A receiver that takes CR or LF alone as a line end (the lenient ones smuggling relies on) still
    sees one line `.`, the last, and only CRLF in what it reads."""
    wire = encode_data(content)
    assert wire.endswith(b".\r\n")
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n"), wire
    lines = _ANY_LINE_END.split(wire[: -len(b".\r\n")])
    assert b"." not in lines, wire


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, bytes]] = []

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.events.append(("MAIL", address.encode()))
        envelope.mail_from = address
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        self.events.append(("RCPT", address.encode()))
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.events.append(("DATA", envelope.content))
        return "250 Queued"


class _LongLines(SMTP):
    line_length_limit = 1 << 20  # this receiver checks un-stuffing, not line length


async def _through_aiosmtpd(wire: bytes) -> tuple[list[tuple[str, bytes]], list[bytes]]:
    recorder = _Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _LongLines(recorder, decode_data=False), "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        writer.write(b"HELO app\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        writer.write(wire + b"QUIT\r\n")
        replies = (await asyncio.wait_for(reader.read(), 30)).split(b"\r\n")
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    return recorder.events, [line[:3] for line in replies if line]


@given(hostile_bytes)
def test_aiosmtpd_unstuffs_the_normalised_message_and_sees_no_extra_command(content: bytes) -> None:
    events, codes = asyncio.run(_through_aiosmtpd(encode_data(content)))
    assert events == [
        ("MAIL", b"a@example.org"),
        ("RCPT", b"b@example.net"),
        ("DATA", normalise_line_ends(content)),
    ]
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"221"]


def test_normalisation_is_idempotent_and_keeps_crlf_text() -> None:
    assert normalise_line_ends(b"a\r\nb\r\n") == b"a\r\nb\r\n"
    assert normalise_line_ends(b"hello\r.\rMAIL FROM:<x@y>") == b"hello\r\n.\r\nMAIL FROM:<x@y>\r\n"
    assert normalise_line_ends(b"a\n\rb") == b"a\r\n\r\nb\r\n"
    assert normalise_line_ends(b"From: a@b\r\r\nTo: c@d\r\n") == b"From: a@b\r\nTo: c@d\r\n"
    assert normalise_line_ends(b"") == b""


@pytest.mark.parametrize("address", ["a\rb@example.org", "a\nb@example.org", "a\x00b@example.org"])
def test_an_address_with_a_control_character_is_never_written(address: str) -> None:
    with pytest.raises(ValueError, match="control character"):
        _path(address, smtp_utf8=True)


async def test_lone_cr_smuggling_reaches_the_upstream_as_one_message(
    tls: TLSFiles, config_path: Path
) -> None:
    async with AuthUpstream(tls, users={"u": "p"}) as up:
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            body = (
                b"Subject: x\r\n\r\nhello\r.\rMAIL FROM:<evil@example.org>\rRCPT TO:<v@example.net>\rDATA\r"
            )
            replies = await raw_session(
                relay.port,
                b"EHLO app\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                + body
                + b"\r\n.\r\n",
            )
    assert [line[:3] for line in replies if line[3:4] == b" "][-2:] == [b"250", b"221"], replies
    assert len(up.received) == 1
    assert up.received[0].content == normalise_line_ends(body + b"\r\n")
    assert up.received[0].rcpt_tos == ("b@example.net",)


@pytest.mark.parametrize(
    "address", [b"a\rb@example.org", b"a\nb@example.org", b"a\x00b@example.org", b"a\x7fb@x.org"]
)
@pytest.mark.parametrize("params", [b"", b" SMTPUTF8"])
async def test_the_relay_refuses_control_characters_in_addresses(
    tls: TLSFiles, config_path: Path, address: bytes, params: bytes
) -> None:
    write_config(config_path, {"policies": [catch_all_policy(2525, tls)]})
    async with running_relay(config_path) as relay:
        mail = await raw_session(relay.port, b"EHLO app\r\nMAIL FROM:<" + address + b">" + params + b"\r\n")
        rcpt = await raw_session(
            relay.port,
            b"EHLO app\r\nMAIL FROM:<a@example.org>" + params + b"\r\nRCPT TO:<" + address + b">\r\n",
        )
    # The reply before QUIT's: a refusal, never the 250 that would let the address reach the upstream.
    assert [line for line in mail if line[3:4] == b" "][-2][:1] == b"5", mail
    assert [line for line in rcpt if line[3:4] == b" "][-2][:1] == b"5", rcpt
