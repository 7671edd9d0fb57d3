"""Delivery status notifications (RFC 3464) for recipients the upstream refused while it took the message
for others, in a transaction whose route waited for the content (docs/delivery.md, "Recipients the
upstream refuses"). The app heard 250 for the message, so the sender learns of the refused recipients
the way it would from any MTA: a `multipart/report` sent from the null reverse-path (RFC 5321 4.5.5),
carrying the message's header, not its body (RFC 3461 RET=HDRS, the usual default)."""

from __future__ import annotations

import email.utils
import secrets
from collections.abc import Sequence

from outbound_relay.reply import Reply, printable


def status_of(reply: Reply) -> str:
    """The reply's enhanced status code, or its class's generic one (RFC 3463: 4.0.0, 5.0.0)."""
    return reply.status or f"{reply.code // 100}.0.0"


def build_report(
    *,
    reporting_mta: str,
    remote_mta: str,
    sender: str,
    refused: Sequence[tuple[str, Reply]],
    original_headers: bytes,
) -> bytes:
    """The DSN: a text part for people, the machine-readable `message/delivery-status` part with one
    block per refused recipient (Action: failed, since the relay keeps no queue to retry from), and the
    original header block (`text/rfc822-headers`, RFC 6522)."""
    boundary = f"dsn-{secrets.token_hex(12)}"
    date = email.utils.formatdate(localtime=False, usegmt=True)
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {date}",
        f"Message-ID: <{secrets.token_hex(16)}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: no automatic answer to this one
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"The mail server {remote_mta} refused your message for the recipients below; every other",
        "recipient of the message received it. The relay keeps no queue: it will not try again.",
        "",
        *(f"<{printable(rcpt)}>: {reply.one_line()}" for rcpt, reply in refused),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"Arrival-Date: {date}",
    ]
    for rcpt, reply in refused:
        lines += [
            "",
            f"Final-Recipient: rfc822;{printable(rcpt)}",
            "Action: failed",
            f"Status: {status_of(reply)}",
            f"Remote-MTA: dns; {remote_mta}",
            f"Diagnostic-Code: smtp; {reply.one_line()}",
        ]
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    text = "\r\n".join(lines).encode("ascii", "replace") + b"\r\n"
    headers = original_headers.rstrip(b"\r\n") + b"\r\n" if original_headers.strip() else b""
    return text + headers + f"\r\n--{boundary}--\r\n".encode("ascii")
