"""Relay mode: one inbound transaction becomes one upstream transaction, and the upstream's verdict is
the client's. Nothing is acknowledged with 250 unless the upstream acknowledged it.

Recipients are grouped at RCPT by the domain policies that apply to them (ScopeIndex.signature), since the
binding header and hooks are only known after DATA; a recipient of another route gets `452 4.5.3` and
the client sends it in a new transaction (RFC 5321 4.5.3.1.10).
"""

from __future__ import annotations

import logging
import time
import weakref

from aiosmtpd.smtp import SMTP, Envelope, Session

from outbound_relay.config import CONTEXT_KEYS
from outbound_relay.errors import HookFailed, RelayError, RouteMisconfigured
from outbound_relay.generation import Generation
from outbound_relay.message import address_defect, parse_headers, pop_header, split_headers
from outbound_relay.metrics import MessageResult, RelayMetrics
from outbound_relay.pool import UpstreamPool
from outbound_relay.reply import Reply
from outbound_relay.scopes import Route
from outbound_relay.session import StaleSession, Transaction, envelope_path

log = logging.getLogger(__name__)

# Ours when a bug of ours ends a transaction: never aiosmtpd's "500 Error", which would make the app drop
# the message.
_INTERNAL_ERROR = Reply.of(451, "4.3.0", "Internal error in the relay; try again later")


_UNSENDABLE = "553 5.1.3 Address has characters that cannot be sent in an SMTP command"


def _unsendable(address: str, envelope: Envelope) -> str | None:
    """The refusal of an address that cannot be sent upstream, at the client's MAIL or RCPT: later, at
    DATA, it would fail the same way on every retry. RFC 6531 3.5: a non-ASCII address is only allowed
    after SMTPUTF8 on MAIL (553 5.6.7). Control characters are refused before this (address_defect)."""
    if not (address.isascii() or envelope.smtp_utf8):
        return (
            "553 5.6.7 Non-ASCII address needs SMTPUTF8 on MAIL FROM (RFC 6531); "
            "give it, or use an ASCII address"
        )
    if address in ("", "<>"):
        return None  # the null reverse-path of a bounce: MAIL FROM:<> (aiosmtpd gives "<>")
    try:
        envelope_path(address, bool(envelope.smtp_utf8))
    except ValueError:  # aiosmtplib's check of what would end the command line
        return _UNSENDABLE
    return None


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
        # The binding the app named as its AUTH user (listen.clientAuth: binding), per transaction.
        self._auth_binding: weakref.WeakKeyDictionary[Envelope, str] = weakref.WeakKeyDictionary()
        self._counted = {result: metrics.messages.labels(result=result.value) for result in MessageResult}
        self.closing = False  # set on SIGTERM: no new transactions

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception it caught in a command: a 451, never its `500 Error`, which
        would make the app drop a message the upstream may have taken or only deferred."""
        log.error("SMTP session error", exc_info=error)
        return _INTERNAL_ERROR.one_line()

    def _generation_of(self, envelope: Envelope) -> Generation:
        return self._pinned.get(envelope) or self.generation

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        if self.closing:
            return "421 4.3.2 The relay is shutting down; try again"
        if (defect := address_defect(address)) is not None:
            return f"553 5.1.7 Sender address {defect}"
        if refusal := _unsendable(address, envelope):
            return refusal
        self._pinned[envelope] = self.generation
        auth_data: object = session.auth_data  # a str only in binding mode (server.client_authenticator)
        if isinstance(auth_data, str):
            self._auth_binding[envelope] = auth_data
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return "553 5.1.3 Recipient address must be local@domain"
        if (defect := address_defect(address)) is not None:
            return f"553 5.1.3 Recipient address {defect}"
        if refusal := _unsendable(address, envelope):
            return refusal
        generation = self._generation_of(envelope)
        limit = generation.config.limits.recipients_per_transaction
        if len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 Too many recipients (at most {limit} a transaction); send the rest in another"
        scopes = generation.scopes
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
            if reply.is_positive
            else MessageResult.DEFERRED
            if reply.is_transient
            else MessageResult.REJECTED
        )
        self._counted[result].inc()
        return reply.one_line()

    async def deliver(self, generation: Generation, envelope: Envelope) -> Reply:
        """The reply for the client's DATA: the upstream's, or ours when it could not be asked."""
        assert isinstance(envelope.content, bytes)
        assert envelope.mail_from is not None
        try:
            if generation.missing is not None:
                raise RouteMisconfigured(f"the relay has no config yet: {generation.missing} does not exist")
            route, content = await self._route(generation, envelope, envelope.content)
            # aiosmtpd keeps the null reverse-path as "<>"; the upstream session spells it "".
            mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from
            message = Transaction(mail_from, tuple(envelope.rcpt_tos), content, bool(envelope.smtp_utf8))
            return await self._send(route, message)
        except RelayError as error:
            level = logging.WARNING if error.temporary else logging.INFO
            log.log(level, "transaction for %d recipient(s) not delivered: %s", len(envelope.rcpt_tos), error)
            return error.reply
        except Exception:
            log.exception("transaction for %d recipient(s) failed unexpectedly", len(envelope.rcpt_tos))
            return _INTERNAL_ERROR

    async def _route(self, generation: Generation, envelope: Envelope, content: bytes) -> tuple[Route, bytes]:
        config = generation.config
        content, header_binding = pop_header(content, config.binding_header)
        # The header names the binding of one message, the AUTH user that of the session's messages.
        binding = header_binding or self._auth_binding.get(envelope) or config.default_binding
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

    async def _send(self, route: Route, message: Transaction) -> Reply:
        async with self.pool.lease(route) as session:
            try:
                return await session.send(message)
            except StaleSession:
                pass
        # A pooled session the upstream had quietly closed: nothing was sent, so one retry is safe.
        async with self.pool.lease(route, fresh=True) as session:
            return await session.send(message)
