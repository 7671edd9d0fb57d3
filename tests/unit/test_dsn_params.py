"""DSN parameters (RFC 3461; docs/delivery.md, "DSN parameters"): the relay offers DSN, checks RET,
ENVID, NOTIFY and ORCPT as the app gives them, passes them on unchanged to an upstream that offers DSN,
and otherwise honours them itself: a `relayed` DSN for NOTIFY=SUCCESS, none for a failure the sender
asked not to hear of, the whole message back for RET=FULL."""

from __future__ import annotations

import asyncio
import email
import re
import time
from pathlib import Path

import aiosmtplib
import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbound_relay.dsn_params import (
    MAX_ENVID,
    DsnSyntaxError,
    MailDsn,
    RcptDsn,
    xtext_decode,
)
from tests.support.faulty import Faults, FaultyUpstream, Message, content_dependent_policies, plain_policy
from tests.support.relay import message, raw_session, running_relay, write_config

_XTEXT_CHARS = st.characters(min_codepoint=33, max_codepoint=126).filter(lambda c: c not in "+=")
# Escapes of printable octets only: a value decoding to anything else is refused (RFC 3461 4.2, 4.4).
_xtext = st.lists(
    st.one_of(_XTEXT_CHARS, st.integers(0x20, 0x7E).map(lambda octet: f"+{octet:02X}")),
    min_size=1,
    max_size=40,
).map("".join)
_any_xtext = st.lists(
    st.one_of(_XTEXT_CHARS, st.integers(0, 255).map(lambda octet: f"+{octet:02X}")), min_size=1, max_size=40
).map("".join)


@given(
    ret=st.one_of(st.none(), st.sampled_from(["FULL", "HDRS", "full", "Hdrs"])),
    envid=st.one_of(st.none(), _xtext),
)
def test_mail_parameters_survive_the_trip_to_the_upstream_line(ret: str | None, envid: str | None) -> None:
    options = [f"RET={ret}"] if ret else []
    options += [f"eNvId={envid}"] if envid else []
    parsed = MailDsn.from_options(["BODY=8BITMIME", *options, "SMTPUTF8"])
    assert parsed.ret == (ret.upper() if ret else None)
    assert parsed.envid == envid  # case kept: an ENVID is the sender's own token
    assert MailDsn.from_options(parsed.params().decode().split()) == parsed


@given(
    notify=st.one_of(
        st.none(),
        st.just(("NEVER",)),
        st.lists(st.sampled_from(["SUCCESS", "FAILURE", "DELAY"]), min_size=1, max_size=3, unique=True).map(
            tuple
        ),
    ),
    orcpt=st.one_of(st.none(), st.tuples(st.sampled_from(["rfc822", "utf-8", "X-Local"]), _xtext)),
)
def test_rcpt_parameters_survive_the_trip_to_the_upstream_line(
    notify: tuple[str, ...] | None, orcpt: tuple[str, str] | None
) -> None:
    options = [f"notify={','.join(notify).lower()}"] if notify else []
    options += [f"ORCPT={orcpt[0]};{orcpt[1]}"] if orcpt else []
    parsed = RcptDsn.from_options(options)
    assert parsed.notify == notify
    assert RcptDsn.from_options(parsed.params().decode().split()) == parsed


@given(st.text(max_size=60), st.sampled_from(["RET", "ENVID", "NOTIFY", "ORCPT"]))
def test_any_value_is_taken_or_refused_by_name_and_never_reaches_a_line_unchecked(
    value: str, keyword: str
) -> None:
    """Whatever the app writes, the parser gives a value or a DsnSyntaxError naming the keyword; what it
    takes is printable US-ASCII without white space, so it cannot end or extend the upstream's line."""
    parse = MailDsn.from_options if keyword in ("RET", "ENVID") else RcptDsn.from_options
    refusal = ""
    try:
        params = parse([f"{keyword}={value}"]).params()
    except DsnSyntaxError as error:
        refusal = str(error)
    if refusal:
        assert keyword in refusal
        return
    assert re.fullmatch(rb"( [A-Z]+=[!-~]+)+", params), params


@given(_any_xtext)
def test_an_id_a_report_shows_is_printable_or_refused(envid: str) -> None:
    """A report shows ENVID and ORCPT decoded: whatever decodes to a CR, LF or other non-printable is
    refused at MAIL or RCPT, so no report header can be split or garbled by one."""
    try:
        shown = MailDsn.from_options([f"ENVID={envid}"]).envelope_id
    except DsnSyntaxError:
        assert not all(0x20 <= ord(char) <= 0x7E for char in xtext_decode(envid))
        return
    assert shown == xtext_decode(envid) and all(0x20 <= ord(char) <= 0x7E for char in shown)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["RET=ALL"], "RET must be FULL or HDRS"),
        (["RET=FULL", "ret=HDRS"], "RET is given twice"),
        (["ENVID=a+2x"], "ENVID is not xtext"),
        (["ENVID=" + "x" * (MAX_ENVID + 1)], "ENVID is longer than 100"),
        (["ENVID="], "ENVID needs a value"),
        (["ENVID=id+0D+0AX-Injected:+20yes"], "ENVID decodes to characters other than printable US-ASCII"),
        (["NOTIFY=SUCCESS"], "NOTIFY is a parameter of RCPT TO, not of MAIL FROM"),
    ],
)
def test_malformed_mail_parameters_are_named(options: list[str], named: str) -> None:
    with pytest.raises(DsnSyntaxError, match=re.escape(named)):
        MailDsn.from_options(options)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["NOTIFY=NEVER,SUCCESS"], "NOTIFY must be NEVER, or"),
        (["NOTIFY=SOMETIMES"], "NOTIFY must be NEVER, or"),
        (["NOTIFY=FAILURE,failure"], "NOTIFY names an event twice"),
        (["ORCPT=user@example.com"], "ORCPT must be an address type"),
        (["ORCPT=rfc822;a=b@example.com"], "ORCPT is not xtext"),
        (["ENVID=x"], "ENVID is a parameter of MAIL FROM, not of RCPT TO"),
    ],
)
def test_malformed_rcpt_parameters_are_named(options: list[str], named: str) -> None:
    with pytest.raises(DsnSyntaxError, match=re.escape(named)):
        RcptDsn.from_options(options)


def test_without_notify_only_a_failure_is_reported() -> None:
    assert RcptDsn().wants("FAILURE") and not RcptDsn().wants("SUCCESS") and not RcptDsn().wants("DELAY")
    assert not RcptDsn(notify=("NEVER",)).wants("FAILURE")
    assert RcptDsn(notify=("SUCCESS",)).wants("SUCCESS") and not RcptDsn(notify=("SUCCESS",)).wants("FAILURE")


# -- through the relay ----------------------------------------------------------------------------------

ENVID = "QuoteId+2B42"  # "QuoteId+42": case and xtext as the app gave them
ORCPT = "rfc822;Orig+2BTag@example.net"


def _transaction(rcpt_params: str = f" NOTIFY=SUCCESS,FAILURE ORCPT={ORCPT}", mail_params: str = "") -> bytes:
    return (
        b"EHLO app\r\n"
        + f"MAIL FROM:<app@example.org> RET=HDRS ENVID={ENVID}{mail_params}\r\n".encode()
        + f"RCPT TO:<ok@example.net>{rcpt_params}\r\n".encode()
        + b"DATA\r\nSubject: dsn\r\n\r\nthe body\r\n.\r\n"
    )


def _sent(up: FaultyUpstream, verb: bytes) -> list[bytes]:
    return [command.rstrip(b"\r\n") for command in up.commands if command.upper().startswith(verb)]


def _reports(up: FaultyUpstream) -> list[Message]:
    return [m for m in up.messages if m.mail_from == b"<>"]


async def test_the_relay_offers_dsn_and_passes_the_parameters_to_an_upstream_that_offers_it(
    config_path: Path,
) -> None:
    async with FaultyUpstream(Faults(dsn=True)) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            replies = await raw_session(relay.port, _transaction())
    assert b"250-DSN" in replies, replies
    assert replies[-2].startswith(b"250 2.0.0 Ok: queued"), replies
    assert _sent(up, b"MAIL") == [
        f"MAIL FROM:<app@example.org> BODY=8BITMIME RET=HDRS ENVID={ENVID}".encode()
    ]
    assert _sent(up, b"RCPT") == [f"RCPT TO:<ok@example.net> NOTIFY=SUCCESS,FAILURE ORCPT={ORCPT}".encode()]
    assert _reports(up) == []  # the upstream reports, as asked


async def test_an_upstream_without_dsn_gets_no_parameters_and_the_relay_reports_relayed(
    config_path: Path,
) -> None:
    """One connection allowed: the report waits for the message's session to be given back, and reuses it."""
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port, maxConnections=1)]})
        async with running_relay(config_path) as relay:
            replies = await raw_session(relay.port, _transaction())
            metrics = relay.metrics.render().decode()
    assert replies[-2].startswith(b"250 2.0.0 Ok: queued"), replies
    assert _sent(up, b"MAIL")[0] == b"MAIL FROM:<app@example.org> BODY=8BITMIME"
    assert _sent(up, b"RCPT")[0] == b"RCPT TO:<ok@example.net>"
    [report] = _reports(up)
    assert report.rcpt_tos == (b"app@example.org",)
    text = report.data.decode()
    assert email.message_from_bytes(report.data).get_content_type() == "multipart/report"
    assert "Original-Envelope-Id: QuoteId+42" in text
    assert "Original-Recipient: rfc822;Orig+Tag@example.net" in text
    assert "Final-Recipient: rfc822;ok@example.net" in text
    assert "Action: relayed" in text and "Status: 2.0.0" in text
    assert "Subject: dsn" in text and "the body" not in text
    assert 'outbound_relay_dsn_total{result="sent"} 1.0' in metrics
    assert up.connections == 1


async def test_a_recipient_given_twice_is_reported_once(config_path: Path) -> None:
    rcpt = b"RCPT TO:<ok@example.net> NOTIFY=SUCCESS\r\n"
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            await raw_session(
                relay.port,
                b"EHLO app\r\nMAIL FROM:<app@example.org>\r\n"
                + rcpt
                + rcpt
                + b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n",
            )
    [report] = _reports(up)
    assert report.data.decode().count("Final-Recipient: rfc822;ok@example.net") == 1


async def test_a_recipient_whose_transaction_was_lost_after_its_message_went_out_is_not_reported_relayed(
    config_path: Path,
) -> None:
    notify = b" NOTIFY=SUCCESS\r\n"
    commands = (
        b"EHLO app\r\nMAIL FROM:<app@example.org>\r\n"
        + b"RCPT TO:<r0@example.net>" + notify + b"RCPT TO:<r1@example.net>" + notify
        + b"DATA\r\nSubject: x\r\n\r\nx\r\n.\r\n"
    )  # fmt: skip
    async with FaultyUpstream(Faults(max_rcpts=1, final_delays={2: 3.0})) as up:
        write_config(
            config_path,
            {"policies": content_dependent_policies(up.port), "upstream": {"dataTimeoutSeconds": 1}},
        )
        async with running_relay(config_path) as relay:
            replies = await raw_session(relay.port, commands)
    assert replies[-2].startswith(b"250 "), replies
    [report] = _reports(up)
    text = report.data.decode()
    assert "Final-Recipient: rfc822;r0@example.net" in text and "r1@example.net" not in text, text


@pytest.mark.parametrize("content_dependent", [False, True])
async def test_no_relayed_report_for_a_message_the_upstream_refused(
    config_path: Path, content_dependent: bool
) -> None:
    async with FaultyUpstream(Faults(replies={".": [b"554 5.7.1 Rejected for policy reasons"]})) as up:
        policies = content_dependent_policies(up.port) if content_dependent else [plain_policy(up.port)]
        write_config(config_path, {"policies": policies})
        async with running_relay(config_path) as relay:
            replies = await raw_session(relay.port, _transaction())
    assert replies[-2].startswith(b"554 5.7.1"), replies
    assert _reports(up) == []


async def test_a_relayed_report_in_pass_through_goes_on_the_held_session(config_path: Path) -> None:
    """One connection allowed and another app waiting for it: the report goes on the session that carried
    the message before it is given back, not behind the other app's transaction."""
    async with FaultyUpstream() as up:
        write_config(
            config_path,
            {"policies": [plain_policy(up.port, maxConnections=1)], "upstream": {"timeoutSeconds": 1.5}},
        )
        async with (
            running_relay(config_path) as relay,
            aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False) as first,
            aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False) as second,
        ):
            await first.mail("app@example.org")
            await first.execute_command(b"RCPT", b"TO:<ok@example.net>", b"NOTIFY=SUCCESS")
            await second.mail("b@example.org")
            waiting = asyncio.create_task(second.execute_command(b"RCPT", b"TO:<y@example.net>"))
            await asyncio.sleep(0.2)  # the second app's RCPT waits for the one connection
            started = time.monotonic()
            reply = await first.data(message())
            took = time.monotonic() - started
            assert (await waiting).code == 250
    assert reply.code == 250 and took < 1, (reply, took)
    assert len(_reports(up)) == 1, up.messages


async def test_no_relayed_report_unless_notify_asks_for_success(config_path: Path) -> None:
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            await raw_session(relay.port, _transaction(" NOTIFY=FAILURE,DELAY"))
            await raw_session(relay.port, _transaction(""))
    assert len(up.messages) == 2 and _reports(up) == []


async def test_a_refused_recipient_is_reported_as_its_notify_and_ret_ask(config_path: Path) -> None:
    refusals = {"gone@example.net": b"550 5.1.1 No such user", "never@example.net": b"550 5.1.1 No such user"}
    commands = (
        b"EHLO app\r\n"
        + f"MAIL FROM:<app@example.org> RET=FULL ENVID={ENVID}\r\n".encode()
        + b"RCPT TO:<ok@example.net>\r\n"
        + f"RCPT TO:<gone@example.net> ORCPT={ORCPT}\r\n".encode()
        + b"RCPT TO:<never@example.net> NOTIFY=NEVER\r\n"
        + b"DATA\r\nSubject: full\r\n\r\nthe body\r\n.\r\n"
    )
    async with FaultyUpstream(Faults(refuse_rcpts=refusals)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            replies = await raw_session(relay.port, commands)
            only_never = await raw_session(
                relay.port,
                b"EHLO app\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<ok@example.net>\r\n"
                b"RCPT TO:<never@example.net> NOTIFY=NEVER\r\nDATA\r\nSubject: x\r\n\r\nx\r\n.\r\n",
            )
            metrics = relay.metrics.render().decode()
    assert b"refused 2 of 3 recipients; a DSN names them to the sender" in replies[-2], replies
    assert b"refused 1 of 2 recipients; the sender asked for no DSN" in only_never[-2], only_never
    [report] = _reports(up)
    text = report.data.decode()
    assert "Final-Recipient: rfc822;gone@example.net" in text and "never@example.net" not in text
    assert "Original-Recipient: rfc822;Orig+Tag@example.net" in text
    assert "Content-Type: message/rfc822" in text and "the body" in text  # RET=FULL
    assert 'outbound_relay_dsn_total{result="not_requested"} 1.0' in metrics


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"MAIL FROM:<a@example.org> RET=EVERYTHING", b"501 5.5.4 RET must be FULL or HDRS"),
        (b"MAIL FROM:<a@example.org> NOTIFY=SUCCESS", b"501 5.5.4 NOTIFY is a parameter of RCPT TO"),
        (b"MAIL FROM:<a@example.org> ENVID=a+zz", b"501 5.5.4 ENVID is not xtext"),
    ],
)
async def test_a_malformed_parameter_is_refused_by_name_and_opens_no_transaction(
    config_path: Path, command: bytes, expected: bytes
) -> None:
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            replies = await raw_session(
                relay.port, b"EHLO app\r\n" + command + b"\r\nRCPT TO:<b@example.net>\r\n"
            )
            rcpt = await raw_session(
                relay.port,
                b"EHLO app\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net> NOTIFY=NEVER,DELAY\r\n",
            )
    assert any(line.startswith(expected) for line in replies), replies
    assert any(line.startswith(b"503") for line in replies), replies  # no MAIL was taken
    assert any(line.startswith(b"501 5.5.4 NOTIFY must be NEVER") for line in rcpt), rcpt
    assert up.commands.count(b"RCPT TO:<b@example.net>\r\n") == 0


async def test_after_helo_there_are_no_parameters_to_take(config_path: Path) -> None:
    async with FaultyUpstream() as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            replies = await raw_session(relay.port, b"HELO app\r\nMAIL FROM:<a@example.org> RET=FULL\r\n")
    assert any(line.startswith(b"501 Syntax: MAIL FROM") for line in replies), replies


async def test_a_long_orcpt_fits_and_other_sessions_do_not_shrink_the_line_limit(config_path: Path) -> None:
    """RFC 3461 5 lets a RCPT line grow by ORCPT's 500 characters. aiosmtpd keeps its line limits in one
    dict for all sessions, cleared by each new one; the relay gives each session its own."""
    orcpt = "rfc822;" + "x" * 480 + "@example.net"  # 499 characters: a RCPT line of 530
    async with FaultyUpstream(Faults(dsn=True)) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"EHLO app\r\nMAIL FROM:<a@example.org>\r\n")
            await writer.drain()
            seen = b""
            while seen.count(b"\r\n250 ") < 2:
                seen += await reader.read(4096)
            other = await raw_session(relay.port, b"")  # a new session, which says no EHLO
            writer.write(f"RCPT TO:<b@example.net> ORCPT={orcpt}\r\nQUIT\r\n".encode())
            rest = (await asyncio.wait_for(reader.read(), 30)).split(b"\r\n")
            writer.close()
    assert other[-1].startswith(b"221"), other
    assert rest[0].startswith(b"250"), rest
    assert any(orcpt.encode() in command for command in up.commands), up.commands
