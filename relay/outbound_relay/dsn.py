"""Delivery status notifications (RFC 3464) the relay writes itself, sent from the null reverse-path
(RFC 5321 4.5.5) to the envelope sender (docs/delivery.md, "Recipients the upstream refuses" and "DSN
parameters"):
- `failed`: recipients the upstream refused while it took the message for others, in a transaction whose
  route waited for the content (the app heard 250 for the message);
- `relayed`: recipients whose RCPT asked NOTIFY=SUCCESS, when the upstream that took the message does not
  offer DSN and so cannot honour it (RFC 3461 4.1).

Which recipients are reported follows their NOTIFY; the original message's header is returned, or the
whole message for a failure when MAIL said RET=FULL."""

from __future__ import annotations

import email.utils
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from outbound_relay.dsn_params import MailDsn, RcptDsn
from outbound_relay.reply import Reply, printable


class Action(StrEnum):
    FAILED = "failed"
    RELAYED = "relayed"

    @property
    def event(self) -> str:
        """The NOTIFY event that asks for this action's DSN (RFC 3461 4.1)."""
        return "FAILURE" if self is Action.FAILED else "SUCCESS"


@dataclass(frozen=True, slots=True)
class Entry:
    """One recipient in a report: what happened to it and the upstream's reply that says so."""

    rcpt: str
    action: Action
    reply: Reply
    dsn: RcptDsn


def status_of(reply: Reply) -> str:
    """The reply's enhanced status code, or its class's generic one (RFC 3463: 2.0.0, 4.0.0, 5.0.0)."""
    return reply.status or f"{reply.code // 100}.0.0"


def requested(entries: Sequence[Entry]) -> list[Entry]:
    """The entries whose recipient's NOTIFY asks for a DSN (without NOTIFY: failures only)."""
    return [entry for entry in entries if entry.dsn.wants(entry.action.event)]


_EXPLAIN = {
    Action.FAILED: (
        "The mail server {mta} refused your message for the recipients below; every other recipient "
        "of the message received it. The relay keeps no queue: it will not try again."
    ),
    Action.RELAYED: (
        "Your message was relayed to the mail server {mta} for the recipients below. That server does "
        "not offer delivery status notifications, so no further notice of delivery will come."
    ),
}


def build_report(
    *,
    reporting_mta: str,
    remote_mta: str,
    sender: str,
    entries: Sequence[Entry],
    mail_dsn: MailDsn,
    content: bytes,
    original_headers: bytes,
) -> bytes:
    """The DSN: a text part for people, the machine-readable `message/delivery-status` part with one
    block per recipient, and the original message: its header block (`text/rfc822-headers`, RFC 6522),
    or all of it (`message/rfc822`) for a failure report when the sender asked RET=FULL."""
    boundary = f"dsn-{secrets.token_hex(12)}"
    date = email.utils.formatdate(localtime=False, usegmt=True)
    failed = any(entry.action is Action.FAILED for entry in entries)
    subject = "Undelivered Mail Returned to Sender" if failed else "Delivery Status Notification (Relayed)"
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{printable(sender)}>",
        f"Subject: {subject}",
        f"Date: {date}",
        f"Message-ID: <{secrets.token_hex(16)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: no automatic answer to this one
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
    ]
    for action in Action:
        if block := [entry for entry in entries if entry.action is action]:
            lines += [_EXPLAIN[action].format(mta=remote_mta), ""]
            lines += [f"<{printable(entry.rcpt)}>: {entry.reply.one_line()}" for entry in block]
            lines.append("")
    lines += [f"--{boundary}", "Content-Type: message/delivery-status", ""]
    if (envid := mail_dsn.envelope_id) is not None:
        lines.append(f"Original-Envelope-Id: {envid}")
    lines += [f"Reporting-MTA: dns; {reporting_mta}", f"Arrival-Date: {date}"]
    for entry in entries:
        lines.append("")
        if (original := entry.dsn.original_recipient) is not None:
            lines.append(f"Original-Recipient: {original}")
        lines += [
            f"Final-Recipient: rfc822;{printable(entry.rcpt)}",
            f"Action: {entry.action}",
            f"Status: {status_of(entry.reply)}",
            f"Remote-MTA: dns; {remote_mta}",
            f"Diagnostic-Code: smtp; {entry.reply.one_line()}",
        ]
    full = failed and mail_dsn.ret == "FULL"
    lines += ["", f"--{boundary}", f"Content-Type: {'message/rfc822' if full else 'text/rfc822-headers'}", ""]
    text = "\r\n".join(lines).encode("ascii", "replace") + b"\r\n"
    if full:
        returned = content if content.endswith(b"\n") or not content else content + b"\r\n"
    else:
        returned = original_headers.rstrip(b"\r\n") + b"\r\n" if original_headers.strip() else b""
    return text + returned + f"\r\n--{boundary}--\r\n".encode("ascii")
