"""One log line per message outcome (docs/metrics.md, "Logs"): what happened to one app transaction, with
an id that the app also finds in the relay's reply to DATA. Sender and recipients appear as domains
unless `serve --log-addresses`; no secret and no part of the message is ever in the line."""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from outbound_relay.reply import MAX_REPLY_LINE, Reply, printable
from outbound_relay.scopes import Route

log = logging.getLogger("outbound_relay.outcome")

# The attribute of a LogRecord that carries an outcome's fields, for the JSON formatter.
FIELDS = "outcome_fields"


class Outcome(StrEnum):
    DELIVERED = "delivered"  # the upstream took the message for every recipient the app gave
    PARTIALLY_REFUSED = "partially_refused"  # taken for some, refused for others (at RCPT, or at DATA)
    DEFERRED = "deferred"  # not taken, 4xx: the app keeps the message and retries
    REFUSED = "refused"  # not taken, 5xx
    ABANDONED = "abandoned"  # the app accepted recipients, then reset or left without a reply to DATA


def new_id() -> str:
    """A message id: 12 upper-case hex digits, like a Postfix queue id, unique enough to grep for."""
    return secrets.token_hex(6).upper()


def with_id(reply: Reply, message_id: str) -> Reply:
    """The reply to DATA with the message id at its end, kept whatever the length of the upstream's text
    (which is cut instead): `250 2.0.0 Ok: queued as 4Xk (relay id 5F3A9C01B2D4)`."""
    suffix = f"(relay id {message_id})"
    head = f"{reply.code} {reply.status}" if reply.status else str(reply.code)
    text = printable(reply.text, MAX_REPLY_LINE - len(head) - len(suffix) - 2)
    return reply._replace(lines=(f"{text} {suffix}" if text else suffix,))


@dataclass(eq=False)
class Record:
    """What one app transaction came to, filled in as it goes."""

    mail_from: str
    id: str = field(default_factory=new_id)
    started: float = field(default_factory=time.monotonic)
    mode: str = "pass-through"  # or "content": the route waited for the message (docs/delivery.md)
    route: Route | None = None
    upstream: str | None = None  # host:port
    attempt: int = 1  # 2 when a pooled session had gone stale and the transaction ran on a new one
    size: int | None = None
    latency: float | None = None  # seconds from the end of the app's DATA to the reply
    dsn: str | None = None  # when the relay owed the sender a DSN: sent, refused, no_sender, not_requested
    # Each RCPT of the app, in order, with the reply it got; then those refused at DATA.
    recipients: list[tuple[str, Reply]] = field(default_factory=list)
    unrecorded: int = 0  # RCPTs past MAX_RECORDED: counted, not kept (one app must not grow a line forever)
    refused_at_data: list[tuple[str, Reply]] = field(default_factory=list)
    logged: bool = False

    @property
    def accepted(self) -> int:
        return sum(1 for _, reply in self.recipients if reply.is_positive)

    def outcome(self, final: Reply | None) -> Outcome:
        if final is None:
            if self.accepted:
                return Outcome.ABANDONED
            transient = any(reply.is_transient for _, reply in self.recipients)
            return Outcome.DEFERRED if transient else Outcome.REFUSED
        if final.is_positive:
            refused = self.refused_at_data or any(not r.is_positive for _, r in self.recipients)
            return Outcome.PARTIALLY_REFUSED if refused else Outcome.DELIVERED
        return Outcome.DEFERRED if final.is_transient else Outcome.REFUSED

    def fields(self, final: Reply | None, *, addresses: bool) -> dict[str, Any]:
        """The line's fields; `final` is the reply to DATA, None when the transaction had none."""
        route = self.route
        verdict = final if final is not None else _first_refusal(self.recipients)
        fields: dict[str, Any] = {
            "event": "message",
            "id": self.id,
            "outcome": self.outcome(final).value,
            "mode": self.mode,
            "from_domain": _domain(self.mail_from),
            "rcpt_domains": _domains(self.recipients),
            "recipients": len(self.recipients) + self.unrecorded,
            "policy": None if route is None else route.policy,
            "scope": None if route is None else route.scope,
            "upstream": self.upstream,
            "code": None if verdict is None else verdict.code,
            "status": None if verdict is None else verdict.status,
            "size": self.size,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 1),
            "attempt": self.attempt,
        }
        if addresses:
            fields["from"] = self.mail_from
            fields["rcpts"] = [rcpt for rcpt, _ in self.recipients]
            if verdict is not None:
                fields["reply"] = printable(verdict.text, 200)
        if self.dsn is not None:
            fields["dsn"] = self.dsn
        # Per recipient, where its outcome is not the message's: refused at its RCPT (the accepted ones
        # share the reply to DATA) or at DATA; by position in the app's RCPT order.
        differing = [
            (n, rcpt, reply)
            for n, (rcpt, reply) in enumerate(self.recipients, 1)
            if not reply.is_positive and (final is not None or verdict is None or reply[:2] != verdict[:2])
        ]
        position = {rcpt: n for n, (rcpt, _) in enumerate(self.recipients, 1)}
        differing += [(position.get(rcpt, 0), rcpt, reply) for rcpt, reply in self.refused_at_data]
        if differing:
            fields["refused"] = [
                {
                    "n": n,
                    ("rcpt" if addresses else "domain"): rcpt if addresses else _domain(rcpt),
                    "code": reply.code,
                    "status": reply.status,
                    **({"stage": "DATA"} if (rcpt, reply) in self.refused_at_data else {}),
                }
                for n, rcpt, reply in differing
            ]
        return fields


MAX_RECORDED = 1000  # RCPTs of one transaction kept for its line (10 times the default recipient limit)


def _domains(recipients: list[tuple[str, Reply]]) -> list[str]:
    if len(recipients) == 1:
        return [_domain(recipients[0][0])]
    return sorted({_domain(rcpt) for rcpt, _ in recipients})


def _first_refusal(recipients: list[tuple[str, Reply]]) -> Reply | None:
    refusals = [reply for _, reply in recipients if not reply.is_positive]
    transient = [reply for reply in refusals if reply.is_transient]
    found = transient or refusals
    return found[0] if found else None


def _domain(address: str) -> str:
    if address in ("", "<>"):
        return ""
    if "@" not in address:
        return "-"  # no domain (a refused RCPT): the rest could be anything, a mistyped password even
    domain = address.rpartition("@")[2].lower()
    if domain.isascii() and domain.isprintable() and " " not in domain and len(domain) <= 255:
        return domain  # the common case, without printable()'s regex
    return printable(domain, 255)


def emit(record: Record, final: Reply | None, *, addresses: bool) -> None:
    """The record's one line, at INFO (WARNING when the message was not taken for some recipient)."""
    if record.logged:
        return
    record.logged = True
    fields = record.fields(final, addresses=addresses)
    level = logging.INFO if fields["outcome"] == Outcome.DELIVERED else logging.WARNING
    if log.isEnabledFor(level):
        log.log(level, "message %s", _Text(fields), extra={FIELDS: fields})


class _Text:
    """The fields as `key=value` text, made only when a handler formats the line (not for JSON)."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        parts = []
        for key, value in self.fields.items():
            if key == "event":
                continue
            if value is None:
                value = "-"
            elif isinstance(value, list):
                value = ",".join(
                    ":".join(str(v) for v in item.values()) if isinstance(item, dict) else str(item)
                    for item in value
                )
            parts.append(f"{key}={value}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """`serve --log-format json`: one JSON object a line; an outcome's fields at its top level."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):  # the fields themselves, not their text form again
            line["msg"] = f"message {fields['id']} {fields['outcome']}"
            line.update(fields)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # as the redaction filter left it: never the exception formatted anew
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, separators=(",", ":"))
