"""Size, sessions, recipients and time: the relay's own limits (docs/relay-config.md, `limits`), and the
RFC 5321 4.5.3.2 timeouts for the body and the final reply to DATA."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from outbound_relay.cli import _setup_logging
from outbound_relay.session import normalise_line_ends
from tests.support.faulty import Faults, FaultyUpstream, content_dependent_policies, plain_policy
from tests.support.relay import as_data, message, raw_session, running_relay, submit, write_config

_LIMITS = {"messageSizeBytes": 100_000, "recipientsPerTransaction": 2, "sessions": 2}


def _finals(replies: list[bytes]) -> list[bytes]:
    return [line for line in replies if line[3:4] != b"-"]


async def test_size_is_advertised_and_a_larger_declared_size_refused_at_mail(config_path: Path) -> None:
    write_config(config_path, {"policies": [plain_policy(2525)], "limits": _LIMITS})
    async with running_relay(config_path) as relay:
        replies = await raw_session(relay.port, b"EHLO app\r\nMAIL FROM:<a@example.org> SIZE=100001\r\n")
    assert b"250-SIZE 100000" in replies
    assert _finals(replies)[-2].startswith(b"552 5.3.4 "), replies


async def test_an_oversize_message_is_refused_with_552_and_not_sent(config_path: Path) -> None:
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port)], "limits": _LIMITS})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message(body="x" * 70 + "\r\n") * 1500)
    assert outcome.data_reply is not None and outcome.data_reply[0] == 552, outcome
    assert outcome.data_reply[1].startswith("5.3.4 ")
    assert up.messages == []


async def test_the_upstreams_smaller_size_refuses_before_sending(config_path: Path) -> None:
    async with FaultyUpstream(Faults(size=10_000)) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message(body="y" * 70 + "\r\n") * 200)
    assert outcome.data_reply is not None and outcome.data_reply[0] == 552, outcome
    assert "10000" in outcome.data_reply[1]
    assert up.messages == []


async def test_size_reaches_the_upstream_and_its_smaller_size_refuses_a_declared_one_at_rcpt(
    config_path: Path,
) -> None:
    """RFC 1870 on the way out: the app's SIZE= goes on the upstream's MAIL FROM (pass-through opens it at
    the first RCPT, the earliest the route is known), and one over the upstream's SIZE is refused there,
    before MAIL is sent; when the route waits for the content, SIZE= is the content's."""
    async with FaultyUpstream(Faults(size=1000)) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            over = await raw_session(
                relay.port, b"EHLO app\r\nMAIL FROM:<a@example.org> SIZE=5000\r\nRCPT TO:<b@example.net>\r\n"
            )
            under = await raw_session(
                relay.port,
                b"EHLO app\r\nMAIL FROM:<a@example.org> SIZE=500\r\nRCPT TO:<b@example.net>\r\n"
                + b"DATA\r\n"
                + as_data(message()),
            )
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            content = await submit(relay.port, ["c@example.net"], message())
    rcpt = _finals(over)[-2]
    assert rcpt.startswith(b"552 5.3.4 message of 5000 octets is over the 1000 that upstream"), over
    assert _finals(under)[-2].startswith(b"250 "), under
    mails = [c.rstrip(b"\r\n") for c in up.commands if c.startswith(b"MAIL")]
    assert mails[0] == b"MAIL FROM:<a@example.org> BODY=8BITMIME SIZE=500", mails  # the refused one sent none
    assert content.code == 250 and mails[1] == b"MAIL FROM:<app@example.org> BODY=8BITMIME SIZE=%d" % len(
        message()
    ), mails


async def test_size_counts_the_message_as_it_goes_out(config_path: Path) -> None:
    """Bare LFs become CRLF on the way out: SIZE= and the upstream's limit count the message so."""
    content = b"Subject: s\n\n" + b"x\n" * 100 + b"end\r\n"
    async with FaultyUpstream(Faults(size=250)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            replies = await raw_session(
                relay.port,
                b"EHLO app\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                + content
                + b".\r\n",
            )
    assert len(content) < 250 < len(normalise_line_ends(content))
    assert _finals(replies)[-2].startswith(
        b"552 5.3.4 message of %d octets" % len(normalise_line_ends(content))
    )
    assert up.messages == []


async def test_a_line_over_1000_octets_gets_a_clear_5xx_not_an_opaque_500(config_path: Path) -> None:
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            replies = await raw_session(
                relay.port,
                b"EHLO app\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
                + as_data(b"Subject: long\r\n\r\n" + b"z" * 1200 + b"\r\n"),
            )
    assert _finals(replies)[-2].startswith(b"552 5.6.0 "), replies
    assert up.messages == []


async def test_recipients_past_the_cap_get_452(config_path: Path) -> None:
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port)], "limits": _LIMITS})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["a@example.net", "b@example.net", "c@example.net"], message())
    assert outcome.rcpt_replies["c@example.net"][0] == 452
    assert outcome.code == 250
    assert [m.rcpt_tos for m in up.messages] == [(b"a@example.net", b"b@example.net")]


async def test_sessions_past_the_bound_get_421(config_path: Path) -> None:
    write_config(config_path, {"policies": [plain_policy(2525)], "limits": _LIMITS})
    async with running_relay(config_path) as relay:
        held = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(2)]
        for reader, _ in held:
            assert (await reader.readline()).startswith(b"220")
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        greeting = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        for _, held_writer in held:
            held_writer.close()
    assert greeting.startswith(b"421 4.3.2 "), greeting


async def test_the_final_reply_to_data_has_its_own_longer_timeout(config_path: Path) -> None:
    async with FaultyUpstream(Faults(delays={".": 1.5})) as up:
        upstream = {"timeoutSeconds": 0.5, "dataTimeoutSeconds": 30}
        write_config(config_path, {"policies": [plain_policy(up.port)], "upstream": upstream})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.net"], message())
    assert outcome.code == 250, outcome


async def test_debug_logging_never_shows_the_body(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("mail.log").level
    _setup_logging("debug")
    try:
        async with FaultyUpstream() as up:
            write_config(config_path, {"policies": [plain_policy(up.port)]})
            async with running_relay(config_path) as relay:
                outcome = await submit(relay.port, ["b@example.net"], message(body="SECRET-BODY-LINE\r\n"))
    finally:
        root.handlers[:], level, mail_level = saved
        root.setLevel(level)
        logging.getLogger("mail.log").setLevel(mail_level)
    assert outcome.code == 250
    logged = capsys.readouterr().err
    assert "b@example.net" in logged  # debug logging was on
    assert "SECRET-BODY-LINE" not in logged
