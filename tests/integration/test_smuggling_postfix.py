"""No smuggling, against Postfix's smtpd: for arbitrary bytes an app sends, what Postfix relays on (to a
recording sink) is the normalised message, and no byte sequence makes Postfix see an extra command or
an early end of DATA (docs/delivery.md, "Line ends")."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbound_relay.session import normalise_line_ends
from tests.peers import PostfixSubmission, TLSFiles
from tests.support.relay import as_data, raw_session, running_relay, write_config

pytestmark = pytest.mark.integration

_PIECES = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b".", b"\r.\r", b"\n.\n", b"\r\n.\r\n", b"a", b"\t", b"\xe9", b"MAIL FROM:<x@y>"]
)
# Short lines: Postfix folds lines past smtp_line_length_limit (998), which is another matter.
_bodies = st.lists(_PIECES, max_size=30).map(b"".join)


async def _send_all(port: int, bodies: list[bytes], rcpts: list[str]) -> list[bytes]:
    commands = b"EHLO app\r\n"
    for body, rcpt in zip(bodies, rcpts, strict=True):
        content = f"Subject: probe {rcpt}\r\n\r\n".encode() + body
        commands += b"MAIL FROM:<app@example.org>\r\nRCPT TO:<" + rcpt.encode() + b">\r\nDATA\r\n"
        commands += as_data(content)
    return await raw_session(port, commands)


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(_bodies, min_size=6, max_size=6))
def test_postfix_relays_the_normalised_message_and_nothing_else(
    postfix: PostfixSubmission, ca: TLSFiles, tmp_path_factory: pytest.TempPathFactory, bodies: list[bytes]
) -> None:
    policy = {
        "name": "it/postfix",
        "gateway": {"host": postfix.host, "port": postfix.port},
        "tls": {"caFile": str(ca.ca_file)},
        "type": "PLAIN",
        "user": "alice",
        "password": postfix.users["alice"],
    }
    config = write_config(tmp_path_factory.mktemp("relay") / "relay.yaml", {"policies": [policy]})
    rcpts = [f"r-{uuid.uuid4().hex[:12]}@postfix.test" for _ in bodies]

    async def run() -> list[bytes]:
        async with running_relay(config) as relay:
            return await _send_all(relay.port, bodies, rcpts)

    replies = asyncio.run(run())
    finals = [line[:3] for line in replies if line[3:4] != b"-"]
    assert finals.count(b"250") == 1 + 3 * len(bodies), replies  # EHLO, then MAIL, RCPT, DATA each
    for body, rcpt in zip(bodies, rcpts, strict=True):
        [arrived] = postfix.sink.wait_for(1, rcpt=rcpt, timeout=30)
        assert arrived.rcpt_tos == (rcpt,)
        sent = f"Subject: probe {rcpt}\r\n\r\n".encode() + body
        received = sent if sent.endswith(b"\r\n") else sent + b"\r\n"  # what the relay's client said
        expected = normalise_line_ends(received).partition(b"\r\n\r\n")[2]
        assert arrived.content.partition(b"\r\n\r\n")[2] == expected
    assert not [m for m in postfix.messages if m.rcpt_tos == ("y",) or "x@y" in m.rcpt_tos]
