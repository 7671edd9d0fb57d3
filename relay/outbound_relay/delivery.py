"""Relay mode: one inbound transaction becomes one upstream transaction, and the upstream's verdict is
the client's. Nothing is acknowledged with 250 unless the upstream acknowledged it.

Recipients are grouped at RCPT by the domain policies that apply to them (ScopeIndex.signature), since the
binding header and hooks are only known after DATA; a recipient of another route gets `452 4.5.3` and
the client sends it in a new transaction (RFC 5321 4.5.3.1.10).
"""

from __future__ import annotations

import logging
import re
import time
import weakref

from aiosmtpd.smtp import SMTP, Envelope, Session
from aiosmtplib.email import quote_address

from outbound_relay.config import CONTEXT_KEYS
from outbound_relay.errors import HookFailed, RelayError, RouteMisconfigured, UpstreamUnavailable
from outbound_relay.generation import Generation
from outbound_relay.message import parse_headers, pop_header, split_headers
from outbound_relay.metrics import MessageResult, RelayMetrics
from outbound_relay.scopes import Route
from outbound_relay.upstream import Reply, UpstreamConnection, UpstreamDropped, UpstreamPool

log = logging.getLogger(__name__)

# RFC 5321 4.1.1.4: lines end in CRLF; a bare LF becomes one. A lone CR is left as it is: turning it into
# a line end could split a header line and end the header block early. A line starting with "." gets another.
_BARE_LF = re.compile(rb"(?<!\r)\n")
_LEADING_DOT = re.compile(rb"(?m)^\.")

# An RFC 5321 Mailbox whose local part and domain are both dot-atoms: nearly every envelope address.
# For these, the full RFC 5322 parsers (aiosmtpd's on the way in, aiosmtplib's on the way out) only give
# back the same text, at a cost that showed in profiles; anything else still goes through them.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM_ADDRESS = rf"{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*"
_SIMPLE_ADDRESS = re.compile(rf"{DOT_ATOM_ADDRESS}\Z")


class RelayHandler:
    """aiosmtpd handler; `generation` is swapped by the reloader, transactions pin theirs at MAIL.

    aiosmtpd drops a transaction's envelope without telling the handler (EHLO in mid-transaction, an
    oversized DATA, a dropped connection), so open transactions are not counted here: the server asks
    each session's current envelope (RelayServer.open_transactions)."""

    def __init__(self, generation: Generation, pool: UpstreamPool, metrics: RelayMetrics) -> None:
        self.generation = generation
        self.pool = pool
        self.metrics = metrics
        self._pinned: weakref.WeakKeyDictionary[Envelope, Generation] = weakref.WeakKeyDictionary()
        self._counted = {result: metrics.messages.labels(result=result.value) for result in MessageResult}
        self.closing = False  # set on SIGTERM: no new transactions

    def _generation_of(self, envelope: Envelope) -> Generation:
        return self._pinned.get(envelope) or self.generation

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.closing:
            return "421 4.3.2 The relay is shutting down; try again"
        self._pinned[envelope] = self.generation
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return "553 5.1.3 Recipient address must be local@domain"
        scopes = self._generation_of(envelope).scopes
        if envelope.rcpt_tos:
            first_domain = envelope.rcpt_tos[0].rpartition("@")[2]
            if scopes.signature(domain) != scopes.signature(first_domain):
                return "452 4.5.3 Recipient takes another upstream route; send it in a new transaction"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        reply = await self.deliver(self._generation_of(envelope), envelope)
        self.metrics.delivery_duration.observe(time.perf_counter() - started)
        result = (
            MessageResult.DELIVERED
            if reply.startswith("2")
            else MessageResult.DEFERRED
            if reply.startswith("4")
            else MessageResult.REJECTED
        )
        self._counted[result].inc()
        return reply

    async def deliver(self, generation: Generation, envelope: Envelope) -> str:
        """The reply for the client's DATA: the upstream's, or ours when it could not be asked."""
        assert isinstance(envelope.content, bytes)
        assert envelope.mail_from is not None
        try:
            if generation.missing is not None:
                raise RouteMisconfigured(f"the relay has no config yet: {generation.missing} does not exist")
            route, content = await self._route(generation, envelope, envelope.content)
            return await self._send(route, envelope, content)
        except RelayError as error:
            level = logging.WARNING if error.temporary else logging.INFO
            log.log(level, "transaction for %d recipient(s) not delivered: %s", len(envelope.rcpt_tos), error)
            return error.reply
        except Exception:
            # Never aiosmtpd's "500 Error": a bug of ours must not make the app drop the message.
            log.exception("transaction for %d recipient(s) failed unexpectedly", len(envelope.rcpt_tos))
            return "451 4.3.0 Internal error in the relay; try again later"

    async def _route(self, generation: Generation, envelope: Envelope, content: bytes) -> tuple[Route, bytes]:
        config = generation.config
        content, header_binding = pop_header(content, config.binding_header)
        binding = header_binding or config.default_binding
        domain = envelope.rcpt_tos[0].rpartition("@")[2]
        overrides: dict[str, str] = {}
        if generation.hooks:
            from outbound_relay.hooks import HookError, HookMessage  # loaded with the chain

            msg = HookMessage(
                mailfrom=envelope.mail_from or "",
                rcptto=tuple(envelope.rcpt_tos),
                headers=parse_headers(split_headers(content)[0]),
                binding=binding,
                context={},
            )
            try:
                await generation.hooks.run(msg)
            except HookError as error:
                self.metrics.hook_errors.labels(kind=error.kind).inc()
                raise HookFailed(f"per-message auth hook failed ({error.kind}): {error}") from None
            binding = msg.binding
            overrides = msg.context
        route = generation.scopes.route(domain, binding)
        if route.suspended is not None:
            raise RouteMisconfigured(route.suspended)
        type_key, user_key, pass_key = CONTEXT_KEYS
        if any(key in overrides for key in CONTEXT_KEYS):
            try:
                route = route.with_overrides(
                    type=overrides.get(type_key),
                    user=overrides.get(user_key),
                    password=overrides.get(pass_key),
                )
            except ValueError as error:
                self.metrics.hook_errors.labels(kind="error").inc()
                raise HookFailed(f"hook set {type_key}: {error}") from None
        return route, content

    async def _send(self, route: Route, envelope: Envelope, content: bytes) -> str:
        assert envelope.mail_from is not None
        args = (envelope.mail_from, envelope.rcpt_tos, content, bool(envelope.smtp_utf8))
        async with self.pool.session(route) as conn:
            try:
                return await _transaction(conn, *args)
            except _StaleConnection:
                conn.broken = True
        # A pooled session the upstream had quietly closed: nothing was sent, so one retry is safe.
        async with self.pool.session(route, fresh=True) as conn:
            try:
                return await _transaction(conn, *args)
            except _StaleConnection as stale:
                conn.broken = True
                raise UpstreamUnavailable(f"upstream {conn.key} dropped the connection: {stale}") from None


class _StaleConnection(Exception):
    """A reused connection failed before anything of this transaction reached the upstream."""


def _reply(code: int, message: str) -> str:
    text = " ".join(message.split())
    return f"{code} {text}" if text else str(code)


def _refused(reply: Reply, stage: str) -> str:
    """The upstream's refusal, passed on; a 2xx or 3xx where a refusal was expected is a broken or
    confused upstream, and must never reach the app as a success."""
    if reply.code >= 400:
        return _reply(reply.code, reply.message)
    return _reply(451, f"4.5.0 upstream answered {reply.code} to {stage}, which SMTP does not allow there")


def _path(address: str, smtp_utf8: bool) -> bytes:
    """`<address>` for MAIL FROM / RCPT TO; only unusual addresses pay for aiosmtplib's parser."""
    if _SIMPLE_ADDRESS.match(address):
        return b"<" + address.encode("ascii") + b">"
    if smtp_utf8:
        return b"<" + address.encode("utf-8") + b">"  # RFC 6531: sent as the app gave it
    return quote_address(address).encode("ascii")


def _wire_data(content: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends, a final CRLF, dots doubled, then the end mark."""
    content = _BARE_LF.sub(b"\r\n", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return _LEADING_DOT.sub(b"..", content) + b".\r\n"


async def _transaction(
    conn: UpstreamConnection, mail_from: str, rcpt_tos: list[str], content: bytes, smtp_utf8: bool
) -> str:
    """MAIL, RCPT, DATA on a pooled session. With PIPELINING the commands go out in one write and their
    replies are read after it (RFC 2920); DATA joins them only for one recipient, since a refusal among
    several must not leave the others to get the message."""
    if smtp_utf8 and not conn.smtputf8 and not all(a.isascii() for a in (mail_from, *rcpt_tos)):
        return f"553 5.6.7 upstream {conn.key} does not offer SMTPUTF8, which these addresses need"
    params = (b" BODY=8BITMIME" if conn.eight_bit_mime else b"") + (
        b" SMTPUTF8" if smtp_utf8 and conn.smtputf8 else b""
    )
    mail = b"MAIL FROM:" + _path(mail_from, smtp_utf8) + params + b"\r\n"
    rcpts = [b"RCPT TO:" + _path(rcpt, smtp_utf8) + b"\r\n" for rcpt in rcpt_tos]
    data_in_group = conn.pipelining and len(rcpt_tos) == 1
    try:
        if conn.pipelining:
            conn.send(b"".join([mail, *rcpts, b"DATA\r\n" if data_in_group else b""]))
        else:
            conn.send(mail)
        mail_reply = await conn.reply()
        if mail_reply.code == 421:  # RFC 5321 3.8: the upstream is closing this session
            raise UpstreamDropped(_reply(*mail_reply))
    except OSError as error:
        conn.broken = True
        if conn.reused:
            raise _StaleConnection(str(error) or type(error).__name__) from None
        raise UpstreamUnavailable(f"upstream {conn.key} failed at MAIL: {error}") from None
    try:
        refused: list[tuple[str, Reply]] = []
        # Pipelined, every RCPT has a reply to read; one at a time, none is sent after a failed MAIL.
        if conn.pipelining or mail_reply.code == 250:
            for rcpt, line in zip(rcpt_tos, rcpts, strict=True):
                if not conn.pipelining:
                    conn.send(line)
                reply = await conn.reply()
                if reply.code not in (250, 251):
                    refused.append((rcpt, reply))
        if data_in_group:
            data_reply = await conn.reply()
        if mail_reply.code != 250 or refused:
            if data_in_group and data_reply.code == 354:
                # RFC 2920 3.1: DATA was taken with no valid recipient; an empty message ends it.
                conn.send(b".\r\n")
                await conn.reply()
            await _reset(conn)
            if mail_reply.code != 250:
                return _refused(mail_reply, "MAIL")
            return _refusal(refused, len(rcpt_tos))
        if not data_in_group:
            conn.send(b"DATA\r\n")
            data_reply = await conn.reply()
        if data_reply.code != 354:
            await _reset(conn)
            return _refused(data_reply, "DATA")
        conn.send(_wire_data(content))
        final = await conn.reply()
    except OSError as error:
        conn.broken = True
        raise UpstreamUnavailable(
            f"upstream {conn.key} failed during the transaction ({error or type(error).__name__}); "
            "if DATA was sent, the message may have been delivered"
        ) from None
    if final.code // 100 == 2:
        return _reply(final.code, final.message)
    await _reset(conn)
    return _refused(final, "the message")


def _refusal(refused: list[tuple[str, Reply]], total: int) -> str:
    """Our one reply to DATA when the upstream refused some recipients. Delivering to the rest would leave
    the client unable to tell who got the message, so nothing is sent: the client hears why and which."""
    if total == 1:
        return _refused(refused[0][1], "RCPT")
    temporary = [(rcpt, reply) for rcpt, reply in refused if reply.code < 500]
    _, first = (temporary or refused)[0]
    if first.code < 400:
        return _refused(first, "RCPT")
    names = ", ".join(rcpt for rcpt, _ in refused)
    return _reply(
        first.code,
        f"{first.message} (upstream refused {len(refused)} of {total} recipients: {names}; "
        "nothing was delivered, send the others again without them)",
    )


async def _reset(conn: UpstreamConnection) -> None:
    try:
        conn.send(b"RSET\r\n")
        if (await conn.reply()).code != 250:
            conn.broken = True
    except OSError:
        conn.broken = True
