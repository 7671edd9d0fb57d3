"""Pooled sessions read their replies with `ReplyReader`, and pipeline MAIL, RCPT and (for one recipient)
DATA when the upstream offers PIPELINING (RFC 2920); replies and refusals must come out as without it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AnyStr

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from outbound_relay.reply import Reply
from outbound_relay.server import RelayServer
from outbound_relay.session import ReplyReader, SessionDropped, UpstreamSession
from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream, _Handler

# -- the reader -------------------------------------------------------------------------------------


async def test_reader_splits_replies_however_they_arrive() -> None:
    reader = ReplyReader()
    reader.data_received(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n35")
    reader.data_received(b"4 End data with <CR><LF>.<CR><LF>\r\n250-first\r\n250-sec")
    reader.data_received(b"ond\r\n250 last\r\n")
    replies = [await reader.read(1) for _ in range(4)]
    assert replies == [
        Reply(250, "2.1.0", ("Ok",)),
        Reply(250, "2.1.5", ("Ok",)),
        Reply(354, None, ("End data with <CR><LF>.<CR><LF>",)),
        Reply(250, None, ("first", "second", "last")),
    ]


async def test_reader_hands_out_replies_before_the_failure_that_followed() -> None:
    reader = ReplyReader()
    reader.data_received(b"250 Ok\r\n")
    reader.connection_lost(None)
    assert await reader.read(1) == Reply(250, None, ("Ok",))
    with pytest.raises(SessionDropped, match="connection closed"):
        await reader.read(1)


async def test_reader_waits_for_a_reply_and_times_out() -> None:
    reader = ReplyReader()
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, reader.data_received, b"221 Bye\r\n")
    assert await reader.read(1) == Reply(221, None, ("Bye",))
    with pytest.raises(SessionDropped, match=r"no reply within 0\.05s"):
        await reader.read(0.05)


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"2" * 70_000])
async def test_reader_refuses_what_is_not_smtp(garbage: bytes) -> None:
    reader = ReplyReader()
    reader.data_received(garbage)
    with pytest.raises(SessionDropped):
        await reader.read(1)


# -- pipelining through the relay -------------------------------------------------------------------


class _PipeliningHandler(_Handler):
    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


class _ClosingSMTP(SMTP):
    """Closes the session right after a 421, as RFC 5321 3.8 has a server do (aiosmtpd itself does not),
    so that nothing answers the commands pipelined behind it."""

    async def push(self, status: AnyStr) -> None:
        await super().push(status)
        code = status[:3]
        if (code == "421" or code == b"421") and self.transport is not None:
            self.transport.close()


class PipeliningUpstream(AuthUpstream):
    """AuthUpstream that offers PIPELINING: aiosmtpd reads commands line by line, so it takes them."""

    protocol: type[SMTP] = SMTP

    def _smtp(self) -> SMTP:
        return self.protocol(
            _PipeliningHandler(self.state),
            hostname="upstream.test",
            authenticator=self._authenticate,
            auth_required=True,
            auth_require_tls=True,
            require_starttls=True,
            tls_context=self._context(),
        )


def pooled(relay: RelayServer) -> list[UpstreamSession]:
    return [conn for slot in relay.pool._slots.values() for conn in slot.idle]


async def test_pipelined_messages_arrive_intact_on_one_session(tls: TLSFiles, config_path: Path) -> None:
    body = "line one\r\n.starts with a dot\r\n..two dots\r\nlone LF\nend\r\n"
    async with PipeliningUpstream(tls, users={"u": "p"}) as up:
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            for i in range(3):
                outcome = await submit(relay.port, [f"r{i}@example.com"], message(body=body))
                assert outcome.data_reply == (250, f"2.0.0 Ok: queued as {i + 1}")
            [conn] = pooled(relay)
            assert conn.pipelining
    assert up.state.connections == 1
    assert [r.rcpt_tos for r in up.received] == [(f"r{i}@example.com",) for i in range(3)]
    assert up.received[0].content.endswith(
        b"line one\r\n.starts with a dot\r\n..two dots\r\nlone LF\r\nend\r\n"
    )


async def test_pipelined_refusals_are_passed_back_and_the_session_stays_usable(
    tls: TLSFiles, config_path: Path
) -> None:
    async with PipeliningUpstream(tls, users={"u": "p"}) as up:
        up.state.rcpt_replies["nobody@example.com"] = "550 5.1.1 No such user"
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            single = await submit(relay.port, ["nobody@example.com"], message())
            mixed = await submit(relay.port, ["ok@example.com", "nobody@example.com"], message())
            both = await submit(relay.port, ["a@example.com", "b@example.com"], message())
            after = await submit(relay.port, ["ok@example.com"], message())
    assert single.rcpt_replies == {"nobody@example.com": (550, "5.1.1 No such user")}
    assert mixed.rcpt_replies["nobody@example.com"] == (550, "5.1.1 No such user")
    assert (mixed.code, both.code, after.code) == (250, 250, 250)
    assert [r.rcpt_tos for r in up.received] == [
        ("ok@example.com",),
        ("a@example.com", "b@example.com"),
        ("ok@example.com",),
    ]
    assert up.state.connections == 1


async def test_pipelined_data_refusal_is_passed_back(tls: TLSFiles, config_path: Path) -> None:
    async with PipeliningUpstream(tls, users={"u": "p"}) as up:
        up.state.data_reply = "554 5.6.0 Content rejected"
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["b@example.com"], message())
    assert outcome.data_reply == (554, "5.6.0 Content rejected")


async def test_421_to_a_pipelined_rcpt_is_passed_on_and_the_session_replaced(
    tls: TLSFiles, config_path: Path
) -> None:
    up = PipeliningUpstream(tls, users={"u": "p"})
    up.protocol = _ClosingSMTP
    async with up:
        up.state.rcpt_replies["busy@example.com"] = "421 4.3.2 Shutting down"
        write_config(config_path, {"policies": [catch_all_policy(up.port, tls)]})
        async with running_relay(config_path) as relay:
            refused = await submit(relay.port, ["busy@example.com"], message())
            after = await submit(relay.port, ["ok@example.com"], message())
            metrics = relay.metrics.render().decode()
    # The upstream closing its session is no reason for the app to think the relay closes its own.
    assert refused.reply == (451, "4.3.2 upstream closed the session: Shutting down")
    assert after.code == 250
    assert [r.rcpt_tos for r in up.received] == [("ok@example.com",)]
    assert up.state.connections == 2
    assert 'outbound_relay_messages_total{result="deferred"} 1.0' in metrics
