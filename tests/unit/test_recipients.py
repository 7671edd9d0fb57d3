"""Per-recipient outcomes (docs/delivery.md, "Recipients the upstream refuses"): in pass-through mode each
RCPT gets the upstream's own reply; when the route waits for the content, the accepted recipients get
the message and the envelope sender a DSN (RFC 3464) naming the refused ones. No recipient is lost and
none gets the message twice."""

from __future__ import annotations

import asyncio
import email
import email.message
import logging
import time
from pathlib import Path

import aiosmtplib
import pytest

from outbound_relay.config import RelayConfig
from outbound_relay.scopes import ScopeIndex
from tests.support.faulty import Faults, FaultyUpstream, Message, content_dependent_policies, plain_policy
from tests.support.relay import message, running_relay, submit, write_config

OK, PERM, TEMP = "ok@example.net", "gone@example.net", "busy@example.net"
REFUSALS = {PERM: b"550 5.1.1 No such user", TEMP: b"451 4.2.2 Mailbox busy, try later"}


def _verbs(up: FaultyUpstream) -> list[bytes]:
    return [command.split(b" ")[0].split(b":")[0].rstrip(b"\r\n").upper() for command in up.commands]


def _dsns(up: FaultyUpstream) -> list[Message]:
    return [m for m in up.messages if m.mail_from.startswith(b"<>")]


def test_the_route_is_fixed_only_when_no_binding_changes_it() -> None:
    policies = [plain_policy(2525)]
    fixed = ScopeIndex(RelayConfig.model_validate({"policies": policies}))
    assert fixed.fixed_route("a.example") is not None
    bound = ScopeIndex(
        RelayConfig.model_validate(
            {"policies": [*policies, {"name": "b", "scope": {"binding": "bulk"}, "user": "x"}]}
        )
    )
    assert bound.fixed_route("a.example") is None
    # A binding's policy for one domain leaves the other domains' routes fixed.
    per_domain = ScopeIndex(
        RelayConfig.model_validate(
            {
                "policies": [
                    *policies,
                    {"name": "b", "scope": {"binding": "bulk", "domain": "b.example"}, "user": "x"},
                ]
            }
        )
    )
    assert per_domain.fixed_route("a.example") is not None
    assert per_domain.fixed_route("b.example") is None


async def test_pass_through_each_recipient_hears_the_upstreams_own_reply(config_path: Path) -> None:
    async with FaultyUpstream(Faults(refuse_rcpts=REFUSALS)) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, [OK, PERM, TEMP], message())
            metrics = relay.metrics.render().decode()
    assert outcome.rcpt_replies[OK][0] == 250
    assert outcome.rcpt_replies[PERM] == (550, "5.1.1 No such user")
    assert outcome.rcpt_replies[TEMP] == (451, "4.2.2 Mailbox busy, try later")
    assert outcome.code == 250, outcome
    assert [m.rcpt_tos for m in up.messages] == [(OK.encode(),)]
    assert 'outbound_relay_messages_total{result="delivered"} 1.0' in metrics


async def test_pass_through_rset_and_a_dropped_app_release_the_upstream(config_path: Path) -> None:
    async with FaultyUpstream() as up:
        policy = plain_policy(up.port, maxConnections=1)
        write_config(config_path, {"policies": [policy], "upstream": {"timeoutSeconds": 3}})
        async with running_relay(config_path) as relay:
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.port, start_tls=False) as app:
                await app.mail("a@example.org")
                await app.rcpt("first@example.net")
                await app.rset()
                await app.mail("a@example.org")
                await app.rcpt("second@example.net")
                await app.data(message())
            reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
            writer.write(b"EHLO app\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<dropped@example.net>\r\n")
            await writer.drain()
            finals = 0
            while finals < 3:  # EHLO, MAIL and RCPT answered: the upstream has the RCPT
                finals += (await reader.readline()).startswith(b"250 ")
            writer.close()
            # With one connection allowed, this waits for the dropped app's upstream transaction.
            outcome = await submit(relay.port, ["third@example.net"], message())
    assert outcome.code == 250, outcome
    assert [m.rcpt_tos for m in up.messages] == [(b"second@example.net",), (b"third@example.net",)]
    assert up.connections == 1
    assert _verbs(up).count(b"RSET") == 2, up.commands


async def test_pass_through_an_upstream_refusing_the_sender_answers_each_rcpt(config_path: Path) -> None:
    faults = Faults(replies={"MAIL": [b"553 5.7.1 Sender not allowed"]})
    async with FaultyUpstream(faults) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, [OK], message())
    assert outcome.rcpt_replies[OK] == (553, "5.7.1 Sender not allowed")
    assert outcome.data_reply is None
    assert up.messages == []


async def test_content_dependent_mixed_refusals_deliver_to_the_accepted_and_bounce_the_rest(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FaultyUpstream(Faults(refuse_rcpts=REFUSALS)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, [OK, PERM], message(subject="mixed"))
            metrics = relay.metrics.render().decode()
    assert [code for code, _ in outcome.rcpt_replies.values()] == [250, 250]
    assert outcome.code == 250, outcome
    assert "refused 1 of 2 recipients" in outcome.reply[1], outcome
    delivered = [m for m in up.messages if not m.mail_from.startswith(b"<>")]
    assert [m.rcpt_tos for m in delivered] == [(OK.encode(),)]
    [dsn] = _dsns(up)
    assert dsn.rcpt_tos == (b"app@example.org",)
    report = email.message_from_bytes(dsn.data)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = report.get_payload()
    assert isinstance(parts, list)
    status = parts[1]
    assert isinstance(status, email.message.Message)
    assert status.get_content_type() == "message/delivery-status"
    text = dsn.data.decode()
    assert f"Final-Recipient: rfc822;{PERM}" in text and "Status: 5.1.1" in text
    assert "Action: failed" in text
    assert OK not in text.split("Content-Type: message/delivery-status")[1].split("\r\n--")[0]
    assert "Subject: mixed" in text  # the refused message's header, to tell the sender which one
    assert "the body" not in text  # no RET=FULL: the header only
    assert 'outbound_relay_dsn_total{result="sent"} 1.0' in metrics


async def test_content_dependent_a_recipient_refused_for_now_defers_the_whole_message(
    config_path: Path,
) -> None:
    """A 4xx stays a 4xx: nobody gets the message, and the app's retry of it gives nobody a second copy.
    DATA went out pipelined with the RCPTs, so the relay ends it by closing that connection."""
    async with FaultyUpstream(Faults(refuse_rcpts=REFUSALS)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            deferred = await submit(relay.port, [OK, PERM, TEMP], message(subject="deferred"))
            again = await submit(relay.port, [OK, PERM], message(subject="again"))
            metrics = relay.metrics.render().decode()
    assert deferred.reply is not None and deferred.reply[0] == 451, deferred
    assert deferred.reply[1].startswith("4.2.2 Mailbox busy"), deferred
    assert "deferred 1 of 3 recipients" in deferred.reply[1] and "nothing was sent" in deferred.reply[1]
    assert b"DATA" in _verbs(up)  # it was pipelined, and taken with a 354 ...
    assert all(b"deferred" not in m.data for m in up.messages)  # ... and never completed
    assert [m.rcpt_tos for m in up.messages if not m.mail_from.startswith(b"<>")] == [(OK.encode(),)]
    assert again.code == 250 and up.connections == 2, (again, up.connections)
    assert 'outbound_relay_messages_total{result="deferred"} 1.0' in metrics


async def test_content_dependent_recipients_over_the_upstreams_cap_go_in_further_transactions(
    config_path: Path,
) -> None:
    rcpts = [f"r{n}@example.net" for n in range(5)]
    async with FaultyUpstream(Faults(max_rcpts=2)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, rcpts, message(subject="capped"))
    assert outcome.code == 250 and "refused" not in outcome.reply[1], outcome
    assert [len(m.rcpt_tos) for m in up.messages] == [2, 2, 1]
    assert sorted(r for m in up.messages for r in m.rcpt_tos) == [r.encode() for r in rcpts]
    assert _dsns(up) == []


async def test_content_dependent_a_recipient_refused_for_now_in_a_follow_up_is_told_to_the_sender(
    config_path: Path,
) -> None:
    """Once the first transaction delivered, a follow-up is never deferred as a whole (the app would send
    the message to everyone again): its accepted recipients get the message, and the one refused for now
    is in the sender's DSN."""
    rcpts = [f"r{n}@example.net" for n in range(5)]
    faults = Faults(max_rcpts=2, refuse_rcpts={rcpts[3]: b"451 4.7.1 Greylisted, try again later"})
    async with FaultyUpstream(faults) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, rcpts, message(subject="greylisted"))
    assert outcome.code == 250 and "refused 1 of 5 recipients" in outcome.reply[1], outcome
    delivered = [m.rcpt_tos for m in up.messages if not m.mail_from.startswith(b"<>")]
    assert delivered == [(b"r0@example.net", b"r1@example.net"), (b"r2@example.net", b"r4@example.net")]
    [dsn] = _dsns(up)
    text = dsn.data.decode()
    assert f"Final-Recipient: rfc822;{rcpts[3]}" in text and "Status: 4.7.1" in text, text


async def test_content_dependent_a_recipient_given_twice_gets_the_message_once(config_path: Path) -> None:
    async with FaultyUpstream(Faults(max_rcpts=2)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, [OK, PERM, OK, "third@example.net"], message())
    assert outcome.code == 250, outcome
    delivered = sorted(rcpt for m in up.messages for rcpt in m.rcpt_tos)
    assert delivered == sorted([OK.encode(), PERM.encode(), b"third@example.net"])


async def test_content_dependent_a_follow_up_refused_at_mail_goes_on_a_new_connection(
    config_path: Path,
) -> None:
    """An upstream that takes one message per connection answers the follow-up's MAIL with 421: nothing of
    it was delivered, so it goes again on a new connection, and every recipient gets the message once."""
    rcpts = [f"r{n}@example.net" for n in range(4)]
    async with FaultyUpstream(Faults(max_rcpts=2, close_at_mail=2)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, rcpts, message())
    assert outcome.code == 250 and "refused" not in outcome.reply[1], outcome
    assert [m.rcpt_tos for m in up.messages] == [
        tuple(r.encode() for r in rcpts[:2]),
        tuple(r.encode() for r in rcpts[2:]),
    ]
    assert up.connections == 2 and _dsns(up) == []


async def test_content_dependent_a_follow_up_without_a_new_connection_keeps_the_apps_250(
    config_path: Path,
) -> None:
    """The first recipients have the message; the rest find no new session (the upstream refuses it): the
    app still hears 250, not a 4xx that would send the message again to those who have it."""
    rcpts = [f"r{n}@example.net" for n in range(4)]
    async with FaultyUpstream(Faults(max_rcpts=2, close_at_mail=2, connections=1)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, rcpts, message())
    assert outcome.code == 250 and "refused 2 of 4 recipients" in outcome.reply[1], outcome
    assert [m.rcpt_tos for m in up.messages] == [(b"r0@example.net", b"r1@example.net")]


async def test_an_upstream_that_closes_each_new_session_at_once_is_a_451_not_a_loop(
    config_path: Path,
) -> None:
    async with FaultyUpstream(Faults(close_after_ehlo=True)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await asyncio.wait_for(submit(relay.port, [OK], message()), 10)
    assert outcome.code == 451 and "closed the session at once" in outcome.reply[1], outcome
    assert up.connections == 2, up.connections


async def test_content_dependent_a_follow_up_whose_upstream_closes_at_rcpt_goes_once_more_anew(
    config_path: Path,
) -> None:
    """A 421 at a further transaction's RCPT: the upstream took nothing of it, so it goes once more on a
    new connection; refused so again, its recipients are told to the sender."""
    rcpts = [f"r{n}@example.net" for n in range(4)]
    faults = Faults(max_rcpts=2, refuse_rcpts={rcpts[2]: b"421 4.7.0 Closing, try later"})
    async with FaultyUpstream(faults) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, rcpts, message())
    assert outcome.code == 250 and "refused 2 of 4 recipients" in outcome.reply[1], outcome
    tried = [c for c in up.commands if c.startswith(f"RCPT TO:<{rcpts[2]}>".encode())]
    assert len(tried) == 3, up.commands  # over the cap in the first, then the follow-up and its retry
    [dsn] = _dsns(up)
    assert "Status: 4.7.0" in dsn.data.decode()


async def test_content_dependent_a_slow_first_transaction_still_gets_its_follow_ups(
    config_path: Path,
) -> None:
    """The time for further transactions counts from the first one's end, not from its start."""
    async with FaultyUpstream(Faults(max_rcpts=1, final_delays={1: 1.5})) as up:
        write_config(
            config_path, {"policies": content_dependent_policies(up.port), "upstream": {"timeoutSeconds": 1}}
        )
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, ["r0@example.net", "r1@example.net"], message())
    assert outcome.code == 250 and "refused" not in outcome.reply[1], outcome
    assert [m.rcpt_tos for m in up.messages] == [(b"r0@example.net",), (b"r1@example.net",)]


async def test_content_dependent_a_follow_up_lost_after_its_message_went_out_is_not_reported_failed(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The session fails after the follow-up's message was sent, before the verdict: its recipients may
    have it, so no DSN calls them failed (the sender would send it again); a warning says so."""
    faults = Faults(max_rcpts=1, final_delays={2: 3.0})
    async with FaultyUpstream(faults) as up:
        write_config(
            config_path,
            {"policies": content_dependent_policies(up.port), "upstream": {"dataTimeoutSeconds": 1}},
        )
        async with running_relay(config_path) as relay:
            with caplog.at_level(logging.WARNING):
                outcome = await submit(relay.port, ["r0@example.net", "r1@example.net"], message())
    assert outcome.code == 250 and "refused" not in outcome.reply[1], outcome
    assert [m.rcpt_tos for m in up.messages] == [(b"r0@example.net",), (b"r1@example.net",)]  # both arrived
    assert _dsns(up) == []
    assert any("they may have it, and no DSN names them" in r.getMessage() for r in caplog.records), (
        caplog.text
    )


async def test_content_dependent_follow_ups_stop_in_time_and_the_rest_are_told_to_the_sender(
    config_path: Path,
) -> None:
    """Follow-ups take at most upstream.timeoutSeconds in all: an app waiting for its reply to DATA must
    not time out and send the message again to those who have it."""
    rcpts = [f"r{n}@example.net" for n in range(8)]
    async with FaultyUpstream(Faults(max_rcpts=1, delays={".": 0.4})) as up:
        write_config(
            config_path, {"policies": content_dependent_policies(up.port), "upstream": {"timeoutSeconds": 1}}
        )
        async with running_relay(config_path) as relay:
            started = time.monotonic()
            outcome = await submit(relay.port, rcpts, message())
            took = time.monotonic() - started
    delivered = [m.rcpt_tos for m in up.messages if not m.mail_from.startswith(b"<>")]
    assert outcome.code == 250 and f"of {len(rcpts)} recipients" in outcome.reply[1], outcome
    assert 2 <= len(delivered) < len(rcpts), delivered
    [dsn] = _dsns(up)
    text = dsn.data.decode()
    assert text.count("Action: failed") == len(rcpts) - len(delivered) and "Status: 4.4.7" in text, text
    assert took < 4, took


async def test_content_dependent_all_refused_is_one_reply_and_no_dsn(config_path: Path) -> None:
    async with FaultyUpstream(Faults(refuse_rcpts=REFUSALS)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            both = await submit(relay.port, [PERM, TEMP], message())
            permanent = await submit(relay.port, [PERM], message())
    assert both.code == 451, both  # one of them may yet be accepted: the app retries both
    assert PERM in both.reply[1] and TEMP in both.reply[1]
    assert permanent.reply == (550, "5.1.1 No such user")
    assert permanent.relay_id is not None
    assert up.messages == []


async def test_content_dependent_null_sender_gets_no_dsn_and_the_loss_is_logged_and_counted(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FaultyUpstream(Faults(refuse_rcpts=REFUSALS)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            with caplog.at_level(logging.INFO):
                outcome = await submit(relay.port, [OK, PERM], message(), mail_from="")
            metrics = relay.metrics.render().decode()
    assert outcome.code == 250, outcome
    assert [m.rcpt_tos for m in up.messages] == [(OK.encode(),)]
    assert 'outbound_relay_dsn_total{result="no_sender"} 1.0' in metrics
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(PERM in r.getMessage() for r in errors), caplog.text


async def test_content_dependent_dsn_refused_by_the_upstream_is_logged_and_counted(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    refusals = {**REFUSALS, "app@example.org": b"550 5.1.1 Sender unknown"}
    async with FaultyUpstream(Faults(refuse_rcpts=refusals)) as up:
        write_config(config_path, {"policies": content_dependent_policies(up.port)})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, [OK, PERM], message())
            metrics = relay.metrics.render().decode()
    assert outcome.code == 250, outcome
    assert [m.rcpt_tos for m in up.messages] == [(OK.encode(),)]
    assert 'outbound_relay_dsn_total{result="refused"} 1.0' in metrics
    assert any(r.levelno >= logging.ERROR and PERM in r.getMessage() for r in caplog.records)


async def test_pass_through_sends_the_message_with_bdat_when_the_upstream_offers_chunking(
    config_path: Path,
) -> None:
    content = b"Subject: chunked\r\n\r\nbare\nline feed, then\r\n.a leading dot\r\n"
    async with FaultyUpstream(Faults(chunking=True, refuse_rcpts=REFUSALS)) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, [OK, PERM], content)
    assert outcome.code == 250, outcome
    assert b"DATA" not in _verbs(up) and b"BDAT" in _verbs(up), up.commands
    [sent] = up.messages
    assert sent.rcpt_tos == (OK.encode(),)
    # Line ends normalised as for DATA; no dot-stuffing, since BDAT has no end mark.
    assert sent.data == b"Subject: chunked\r\n\r\nbare\r\nline feed, then\r\n.a leading dot\r\n"


async def test_pass_through_an_upstream_closing_at_the_end_of_data_is_a_451_for_the_app(
    config_path: Path,
) -> None:
    """A 421 tells a client that the server closes the connection; the relay does not: the app hears 451."""
    async with FaultyUpstream(Faults(replies={".": [b"421 4.3.2 Shutting down"]})) as up:
        write_config(config_path, {"policies": [plain_policy(up.port)]})
        async with running_relay(config_path) as relay:
            outcome = await submit(relay.port, [OK], message())
    assert outcome.rcpt_replies[OK][0] == 250
    assert outcome.code == 451, outcome
    assert "4.3.2" in str(outcome.reply), outcome
