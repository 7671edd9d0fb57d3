"""Relay mode: one inbound transaction becomes one upstream transaction, and the upstream's verdict is
the client's. Nothing is acknowledged with 250 unless the upstream acknowledged it.

Two ways, by whether the route of a recipient can depend on the message (docs/delivery.md):
- pass-through: no hook, and every binding resolves the recipient's domain to the same route
  (`ScopeIndex.fixed_route`). The upstream transaction opens at the app's first RCPT and each RCPT gets
  the upstream's own reply; a recipient of another route gets `452 4.5.3` (RFC 5321 4.5.3.1.10).
- content-dependent: the binding header or a hook decides the route after DATA. Recipients are grouped at
  RCPT by the domain policies that apply to them (ScopeIndex.signature); at DATA, recipients the upstream
  refuses for good while it accepts others are told to the sender in a DSN (dsn.py); one refused for now
  defers the whole message (UpstreamSession.send).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from dataclasses import dataclass, field, replace

from aiosmtpd.smtp import SMTP, Envelope, Session

from outbound_relay.batches import Batches
from outbound_relay.config import CONTEXT_KEYS
from outbound_relay.dsn import Action, Entry, build_report, requested
from outbound_relay.dsn_params import NO_MAIL_DSN, NO_RCPT_DSN, DsnSyntaxError, MailDsn, RcptDsn
from outbound_relay.errors import (
    DeliveryUncertain,
    HookFailed,
    RelayError,
    RouteMisconfigured,
    UpstreamUnavailable,
)
from outbound_relay.generation import Generation
from outbound_relay.message import address_defect, parse_headers, pop_header, split_headers
from outbound_relay.metrics import DeliveryMetrics, DsnResult, MessageResult, RelayMetrics
from outbound_relay.outcomes import MAX_RECORDED, Outcome, Record, emit, with_id
from outbound_relay.pool import UpstreamPool
from outbound_relay.reply import Reply, printable
from outbound_relay.scopes import Route
from outbound_relay.session import (
    Sent,
    StaleSession,
    Transaction,
    UpstreamKey,
    UpstreamSession,
    envelope_path,
    refused_reply,
)

log = logging.getLogger(__name__)

# Ours when a bug of ours ends a transaction: never aiosmtpd's "500 Error", which would make the app drop
# the message.
_INTERNAL_ERROR = Reply.of(451, "4.3.0", "Internal error in the relay; try again later")


_UNSENDABLE = "553 5.1.3 Address has characters that cannot be sent in an SMTP command"
_CLOSED = Reply.of(451, "4.4.1", "not sent: the upstream closed the session, twice")
_ANOTHER_ROUTE = "452 4.5.3 Recipient takes another upstream route; send it in a new transaction"
# aiosmtpd's own answers when a handler hook gives none.
_RSET_OK, _QUIT_OK = "250 OK", "221 Bye"


@dataclass(eq=False)
class _PassThrough:
    """An upstream transaction in step with one app transaction: leased at the first RCPT, given back at
    the end of DATA, at RSET, at the next MAIL, or when the app goes away."""

    key: UpstreamKey
    message: Transaction  # the sender and SMTPUTF8, for the RCPT lines
    session: UpstreamSession
    lease: contextlib.AsyncExitStack
    accepted: list[tuple[str, RcptDsn]] = field(default_factory=list)  # the recipients the upstream took
    open: bool = True  # MAIL accepted and no DATA yet: an RSET ends it
    busy: bool = False  # a command is in flight: if the app goes away now, the session's state is unknown


@dataclass(eq=False)
class _Transaction:
    """One app transaction, from its MAIL to its end (reply to DATA, RSET, QUIT, the next MAIL, the
    connection lost): its outcome record and, in pass-through, its upstream transaction."""

    envelope: Envelope
    record: Record
    dsn: MailDsn = NO_MAIL_DSN  # RET and ENVID of its MAIL
    declared_size: int | None = None  # SIZE= of its MAIL (RFC 1870; aiosmtpd checked it is digits)
    rcpt_dsn: list[RcptDsn] = field(default_factory=list)  # NOTIFY and ORCPT of each of envelope.rcpt_tos
    passing: _PassThrough | None = None
    lost: Reply | None = None  # the upstream transaction was lost after accepting recipients: DATA's reply


def _not_closing(reply: Reply) -> Reply:
    """An upstream's 421 as the app must hear it: the upstream closes its session, not the relay its own
    (a 421 tells a client the server is closing the connection), so a 451 with the same text."""
    if reply.code != 421:
        return reply
    return Reply(451, reply.status or "4.4.2", ("upstream closed the session:", *reply.lines))


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
        self.delivery_metrics = DeliveryMetrics(metrics.registry)
        self.closing = False  # set on SIGTERM: no new transactions
        self.log_addresses = False  # serve --log-addresses: full addresses in outcome lines
        self._transactions: dict[Session, _Transaction] = {}  # the open one of each client session
        self._releasing: set[asyncio.Task[None]] = set()

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd's hook for an exception it caught in a command: a 451, never its `500 Error`, which
        would make the app drop a message the upstream may have taken or only deferred."""
        log.error("SMTP session error", exc_info=error)
        return _INTERNAL_ERROR.one_line()

    def _generation_of(self, envelope: Envelope) -> Generation:
        return self._pinned.get(envelope) or self.generation

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        """aiosmtpd's EHLO lines, and DSN (RFC 3461): the relay takes the DSN parameters of MAIL and RCPT
        whatever the upstream (docs/delivery.md, "DSN parameters")."""
        session.host_name = hostname  # what aiosmtpd does itself when the handler has no handle_EHLO
        *extensions, last = responses
        return [*extensions, "250-DSN", last]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        await self.release(session)  # what an earlier transaction left open (a failed DATA, an EHLO)
        if self.closing:
            return "421 4.3.2 The relay is shutting down; try again"
        try:
            dsn = MailDsn.from_options(mail_options)
        except DsnSyntaxError as error:
            return f"501 5.5.4 {error}"
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
        # The last SIZE=, the one aiosmtpd checked against limits.messageSizeBytes.
        sizes = [o[5:] for o in mail_options if o.upper().startswith("SIZE=") and o[5:].isascii()]
        declared = int(sizes[-1]) if sizes and sizes[-1].isdecimal() else None
        record = Record("" if address == "<>" else address)
        self._transactions[session] = _Transaction(envelope, record, dsn, declared)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        transaction = self._transactions.get(session)
        if transaction is not None and transaction.envelope is not envelope:
            await self.release(session)  # aiosmtpd started another envelope without telling us
            transaction = None
        reply = await self._rcpt(session, transaction, envelope, address, rcpt_options)
        if transaction is not None:
            record = transaction.record
            if len(record.recipients) < MAX_RECORDED:
                record.recipients.append((address, Reply.parse([reply.encode()])))
            else:
                record.unrecorded += 1
        return reply

    async def _rcpt(
        self,
        session: Session,
        transaction: _Transaction | None,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return "553 5.1.3 Recipient address must be local@domain"
        try:
            dsn = RcptDsn.from_options(rcpt_options)
        except DsnSyntaxError as error:
            return f"501 5.5.4 {error}"
        if (defect := address_defect(address)) is not None:
            return f"553 5.1.3 Recipient address {defect}"
        if refusal := _unsendable(address, envelope):
            return refusal
        generation = self._generation_of(envelope)
        limit = generation.config.limits.recipients_per_transaction
        if len(envelope.rcpt_tos) >= limit:
            return f"452 4.5.3 Too many recipients (at most {limit} a transaction); send the rest in another"
        scopes = generation.scopes
        route = None if generation.hooks or generation.missing else scopes.fixed_route(domain)
        passing = None if transaction is None else transaction.passing
        if route is not None and transaction is not None:
            if envelope.rcpt_tos and passing is None:
                return _ANOTHER_ROUTE  # the transaction waits for its content
            return await self._pass_rcpt(transaction, envelope, route, address, rcpt_options, dsn)
        if passing is not None:
            if passing.accepted:
                return _ANOTHER_ROUTE
            await self._end_upstream(transaction)
        if envelope.rcpt_tos:
            first_domain = envelope.rcpt_tos[0].rpartition("@")[2]
            if scopes.signature(domain) != scopes.signature(first_domain):
                return _ANOTHER_ROUTE
        if address in envelope.rcpt_tos:
            # Taken once (RFC 5321 3.3 lets a server do so), so that no transaction the relay splits the
            # recipients into carries it a second time.
            return "250 2.1.5 OK (a recipient given twice gets the message once)"
        if transaction is not None:
            transaction.record.mode = "content"
            transaction.rcpt_dsn.append(dsn)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self.release(session)
        return _RSET_OK

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await self.release(session)
        return _QUIT_OK

    # -- pass-through ----------------------------------------------------------------------------------

    async def _pass_rcpt(
        self,
        transaction: _Transaction,
        envelope: Envelope,
        route: Route,
        address: str,
        rcpt_options: list[str],
        dsn: RcptDsn,
    ) -> str:
        """The app's RCPT, forwarded: the upstream's reply is the app's."""
        passing = transaction.passing
        record = transaction.record
        try:
            if route.suspended is not None:
                raise RouteMisconfigured(route.suspended)
            key = UpstreamKey.of(route)
            if passing is not None and passing.key != key:
                if passing.accepted:
                    return _ANOTHER_ROUTE
                await self._end_upstream(transaction)
                passing = None
            if passing is None:
                record.route, record.upstream = route, str(key)
                passing, reply = await self._begin(transaction, route, key, address, dsn)
            else:
                passing.busy = True
                reply = await passing.session.add_recipient(address, dsn, passing.message)
                passing.busy = False
        except RelayError as error:
            log.log(logging.WARNING if error.temporary else logging.INFO, "RCPT not forwarded: %s", error)
            await self._lose_upstream(transaction, error.reply)
            return error.reply.one_line()
        except Exception:
            log.exception("RCPT failed unexpectedly")
            await self._lose_upstream(transaction, _INTERNAL_ERROR)
            return _INTERNAL_ERROR.one_line()
        reply = _not_closing(reply)
        if passing is not None and not passing.session.usable:  # a 421, or the connection went
            await self._lose_upstream(transaction, reply)
        if reply.code in (250, 251) and passing is not None and transaction.passing is passing:
            passing.accepted.append((address, dsn))
            transaction.rcpt_dsn.append(dsn)
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            return reply.one_line()
        return refused_reply(reply, "RCPT").one_line()

    async def _begin(
        self, transaction: _Transaction, route: Route, key: UpstreamKey, address: str, dsn: RcptDsn
    ) -> tuple[_PassThrough | None, Reply]:
        """Lease a session and send MAIL and the first RCPT: the pass-through transaction (None when the
        upstream refused MAIL) and the reply for the app's RCPT."""
        mail_from = transaction.record.mail_from
        smtp_utf8 = bool(transaction.envelope.smtp_utf8)
        message = Transaction(
            mail_from,
            (address,),
            b"",
            smtp_utf8,
            dsn=transaction.dsn,
            declared_size=transaction.declared_size,
            rcpt_dsn=(dsn,),
        )
        for attempt, fresh in ((1, False), (2, True)):
            transaction.record.attempt = attempt
            lease = contextlib.AsyncExitStack()
            upstream = await lease.enter_async_context(self.pool.lease(route, fresh=fresh))
            try:
                reply, began = await upstream.begin(message)
            except StaleSession:  # nothing reached the upstream: once more, on a fresh session
                await lease.aclose()
                continue
            except BaseException:
                upstream.broken = True
                await lease.aclose()
                raise
            if not began:
                await lease.aclose()
                return None, reply
            passing = _PassThrough(key, message, upstream, lease)
            transaction.passing = passing
            return passing, reply
        raise AssertionError("a fresh session is never stale")

    async def _lose_upstream(self, transaction: _Transaction, reply: Reply) -> None:
        """The upstream transaction is gone: if it had accepted recipients, the app's DATA gets a 4xx,
        so that the app sends them all again (none of them got the message)."""
        passing = transaction.passing
        if passing is not None and passing.accepted:
            transaction.lost = (
                reply
                if reply.is_transient
                else Reply.of(451, "4.4.1", f"lost the upstream transaction: {printable(reply.text)}")
            )
        await self._end_upstream(transaction)

    async def _end_upstream(self, transaction: _Transaction | None) -> None:
        """RSET upstream while a transaction is open there, and the session back to the pool (or closed,
        when its state is unknown)."""
        passing = None if transaction is None else transaction.passing
        if transaction is None or passing is None:
            return
        transaction.passing = None
        upstream = passing.session
        try:
            if passing.busy:
                upstream.broken = True  # a reply is still due: it cannot carry another transaction
            elif passing.open and upstream.usable:
                await upstream.abort()
        except Exception:
            upstream.broken = True
            raise
        finally:
            await passing.lease.aclose()

    async def release(self, session: Session, final: Reply | None = None) -> None:
        """End the session's transaction, if one is open: its upstream transaction released, its outcome
        logged (`final`: the reply to DATA; None when it ended without one)."""
        transaction = self._transactions.pop(session, None)
        if transaction is None:
            return
        try:
            await self._end_upstream(transaction)
        finally:
            record = transaction.record
            if final is not None or record.recipients:
                if final is None and not record.accepted:
                    result = (
                        MessageResult.DEFERRED
                        if record.outcome(None) is Outcome.DEFERRED
                        else (MessageResult.REJECTED)
                    )
                    self._counted[result].inc()
                emit(record, final, addresses=self.log_addresses)

    def release_later(self, session: Session) -> None:
        """The app's connection is gone (closed, timed out): end its transaction in the background."""
        if session in self._transactions:
            task = asyncio.get_running_loop().create_task(self.release(session))
            self._releasing.add(task)
            task.add_done_callback(self._releasing.discard)

    async def release_all(self) -> None:
        """At shutdown: every transaction ended, before the pool closes."""
        for session in list(self._transactions):
            await self.release(session)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    async def _finish(self, transaction: _Transaction, passing: _PassThrough, content: bytes) -> Reply:
        """DATA of a pass-through transaction: the upstream's final reply, once the sender has the
        `relayed` DSN it asked for when the upstream does not offer DSN."""
        passing.busy = True  # until the DSN too is done: a session left now is in no state to reuse
        upstream, route = passing.session, transaction.record.route
        owed = not upstream.dsn and any(dsn.wants("SUCCESS") for _, dsn in passing.accepted)
        held = True
        try:
            reply = _not_closing(await upstream.finish(content))
            if reply.is_positive and owed and route is not None:
                rcpts, dsns = zip(*passing.accepted, strict=True)
                message = replace(passing.message, rcpt_tos=rcpts, content=content, rcpt_dsn=dsns)
                held = upstream.usable  # else on a session of its own, once this one is given back
                if held:
                    reply = await self._tell_sender(
                        upstream, route, message, Sent(reply), transaction.record, held=True
                    )
            passing.busy = False
        except RelayError as error:
            log.log(logging.WARNING if error.temporary else logging.INFO, "message not delivered: %s", error)
            reply = error.reply
        except Exception:
            log.exception("transaction for %d recipient(s) failed unexpectedly", len(passing.accepted))
            reply = _INTERNAL_ERROR
        finally:
            passing.open = False
            await self._end_upstream(transaction)
        if not held and route is not None:
            reply = await self._tell_sender(
                upstream, route, message, Sent(reply), transaction.record, held=False
            )
        return reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        started = time.perf_counter()
        assert isinstance(envelope.content, bytes)
        generation = self._generation_of(envelope)
        transaction = self._transactions.get(session)
        if transaction is None or transaction.envelope is not envelope:  # not seen at MAIL: cannot be
            transaction = _Transaction(envelope, Record(envelope.mail_from or "", mode="content"))
            self._transactions[session] = transaction
        record = transaction.record
        record.size = len(envelope.content)
        if transaction.lost is not None:
            reply = transaction.lost
        elif transaction.passing is not None:
            # Removed as always; the binding cannot change this route (ScopeIndex.fixed_route).
            content, _ = pop_header(envelope.content, generation.config.binding_header)
            reply = await self._finish(transaction, transaction.passing, content)
        else:
            reply = await self.deliver(generation, envelope, transaction)
        record.latency = time.perf_counter() - started
        self.metrics.delivery_duration.observe(record.latency)
        result = (
            MessageResult.DELIVERED
            if reply.is_positive
            else MessageResult.DEFERRED
            if reply.is_transient
            else MessageResult.REJECTED
        )
        self._counted[result].inc()
        reply = with_id(reply, record.id)
        await self.release(session, reply)
        return reply.one_line()

    async def deliver(self, generation: Generation, envelope: Envelope, transaction: _Transaction) -> Reply:
        """The reply for the client's DATA when the route waited for the content: the upstream's, or
        ours when it could not be asked."""
        assert isinstance(envelope.content, bytes)
        record = transaction.record
        assert envelope.mail_from is not None
        try:
            if generation.missing is not None:
                raise RouteMisconfigured(f"the relay has no config yet: {generation.missing} does not exist")
            route, content = await self._route(generation, envelope, envelope.content)
            record.route = route
            # aiosmtpd keeps the null reverse-path as "<>"; the upstream session spells it "".
            mail_from = "" if envelope.mail_from == "<>" else envelope.mail_from
            message = Transaction(
                mail_from,
                tuple(envelope.rcpt_tos),
                content,
                bool(envelope.smtp_utf8),
                dsn=transaction.dsn,
                rcpt_dsn=tuple(transaction.rcpt_dsn),
            )
            return _not_closing(await self._send(route, message, record))
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

    async def _send(self, route: Route, message: Transaction, record: Record) -> Reply:
        """The message upstream: its transaction, then one for the recipients over the upstream's cap, and
        so on (batches.py), on one session while it lasts, else on a new one; then the DSN the sender is
        owed, through the last session while its lease is held, else through a new one."""
        record.upstream = str(UpstreamKey.of(route))
        loop = asyncio.get_running_loop()
        batches = Batches(message, budget=self.pool.timeout)
        fresh, last = False, None
        while True:
            try:
                async with self.pool.lease(route, fresh=fresh) as session:
                    last = session
                    if not session.usable:  # closed as it was handed over (after EHLO or AUTH, say)
                        if batches.first and fresh:
                            raise UpstreamUnavailable(f"upstream {session.key} closed the session at once")
                        if not batches.first:
                            if batches.retried:
                                batches.lost(_CLOSED, maybe_delivered=False)
                            batches.retried = True
                    while batches.batch is not None and session.usable:
                        try:
                            sent = await session.send(batches.batch, defer=batches.first)
                        except StaleSession:  # a pooled session the upstream had closed: nothing was sent
                            if batches.first:
                                record.attempt = 2
                            elif batches.retried:
                                batches.lost(_CLOSED, maybe_delivered=False)
                            else:
                                batches.retried = True
                            break
                        except UpstreamUnavailable as error:
                            if batches.first:
                                raise  # nobody has it: the app hears it and sends it again
                            uncertain = isinstance(error, DeliveryUncertain)
                            if uncertain or batches.retried:
                                batches.lost(error.reply, maybe_delivered=uncertain)
                            else:
                                batches.retried = True  # nothing of it was delivered (a 421 at MAIL, say)
                            break
                        if sent.reply.code == 421 and not batches.first and not batches.retried:
                            batches.retried = True  # closing before it took the message: once more, anew
                            break
                        batches.took(sent, loop.time())
                    if batches.batch is None and session.usable:
                        return await self._finished(session, route, batches, record, held=True)
            except RelayError as error:
                if batches.first or last is None:
                    raise
                # No new session for a further transaction (unreachable, AUTH refused): the first
                # recipients have the message, so the app hears its 250 and the sender of the rest.
                batches.lost(error.reply, maybe_delivered=False)
            if batches.batch is None:
                assert last is not None
                return await self._finished(last, route, batches, record, held=False)
            fresh = True  # what is left goes on a new session, once the old one is given back

    async def _finished(
        self, session: UpstreamSession, route: Route, batches: Batches, record: Record, *, held: bool
    ) -> Reply:
        if batches.uncertain:
            log.warning(
                "message %s: upstream %s failed after the message was sent to %d recipient(s) of a further "
                "transaction; they may have it, and no DSN names them",
                record.id,
                session.key,
                len(batches.uncertain),
            )
        return await self._tell_sender(
            session,
            route,
            batches.message,
            batches.sent(),
            record,
            held=held,
            unsure=frozenset(batches.uncertain),
        )

    async def _tell_sender(
        self,
        upstream: UpstreamSession,
        route: Route,
        message: Transaction,
        sent: Sent,
        record: Record,
        *,
        held: bool,
        unsure: frozenset[str] = frozenset(),
    ) -> Reply:
        """The app's reply to a message the upstream took, once the sender has the DSN it asked for: of
        the recipients the upstream refused while it took the message for others (`failed`), and, when
        the upstream does not offer DSN, of those whose NOTIFY asked SUCCESS (`relayed`). Sent before the
        reply: through `upstream`, the session that carried the message, when the caller `held` its
        lease still; else through one leased for it (the caller holds none then, so that a route of one
        connection cannot wait for itself). docs/delivery.md, "Recipients the upstream refuses" and "DSN
        parameters"."""
        if not sent.reply.is_positive:
            return sent.reply  # nobody got it: the app's refusal says so, and it sends again or bounces
        dsn_of = dict(zip(message.rcpt_tos, message.rcpt_dsn, strict=False))
        entries = [
            Entry(rcpt, Action.FAILED, reply, dsn_of.get(rcpt, NO_RCPT_DSN)) for rcpt, reply in sent.refused
        ]
        if not upstream.dsn:
            refused = {rcpt for rcpt, _ in sent.refused} | unsure  # unsure: lost after the message went out
            entries += [
                Entry(rcpt, Action.RELAYED, sent.reply, dsn_of.get(rcpt, NO_RCPT_DSN))
                for rcpt in dict.fromkeys(message.rcpt_tos)  # a recipient given twice is reported once
                if rcpt not in refused
            ]
        wanted = requested(entries)
        if not sent.refused and not wanted:
            return sent.reply
        if sent.refused:
            record.refused_at_data = list(sent.refused)
        if not wanted:
            result, told = DsnResult.NOT_REQUESTED, "no DSN: NOTIFY asked for none"
        elif not message.mail_from:
            result, told = DsnResult.NO_SENDER, "no DSN: the sender is null"
        else:
            # The upstream took the message: nothing here may turn that into a failure for the app, which
            # would then send it again.
            try:
                bounce = await self._send_report(upstream if held else None, route, message, wanted)
                result = DsnResult.SENT if bounce.reply.is_positive else DsnResult.REFUSED
                told = f"DSN {'sent' if result is DsnResult.SENT else 'refused'}: {bounce.reply.one_line()}"
            except (RelayError, StaleSession) as error:
                result, told = DsnResult.REFUSED, f"DSN not sent: {error}"
            except Exception:
                log.exception("message %s: the DSN failed unexpectedly", record.id)
                result, told = DsnResult.REFUSED, "DSN not sent: internal error"
        record.dsn = result.value
        self.delivery_metrics.dsn.labels(result=result.value).inc()
        if not sent.refused:
            if result is not DsnResult.SENT:
                log.warning(
                    "message %s: the sender asked for a DSN on relay and cannot have it (%s)", record.id, told
                )
            return sent.reply
        count = f"{len(sent.refused)} of {len(message.rcpt_tos)} recipients"
        if result in (DsnResult.REFUSED, DsnResult.NO_SENDER):
            log.error(
                "message %s: upstream %s refused %s (%s) and the sender cannot be told (%s); the relay "
                "keeps no queue, so these recipients do not get the message",
                record.id,
                record.upstream,
                count,
                printable(" ".join(f"<{rcpt}> {reply.one_line()}" for rcpt, reply in sent.refused)),
                told,
            )
        note = {
            DsnResult.SENT: "a DSN names them to the sender",
            DsnResult.NOT_REQUESTED: "the sender asked for no DSN",
        }.get(result, "no DSN could be sent")
        return sent.reply._replace(lines=(*sent.reply.lines, f"(upstream refused {count}; {note})"))

    async def _send_report(
        self, session: UpstreamSession | None, route: Route, message: Transaction, entries: list[Entry]
    ) -> Sent:
        """The DSN to the sender, through `session` or, when None, a session leased for it."""
        if session is None:
            async with self.pool.lease(route) as leased:
                with contextlib.suppress(StaleSession):
                    return await self._send_report(leased, route, message, entries)
            async with self.pool.lease(route, fresh=True) as leased:  # that one had been closed: nothing sent
                return await self._send_report(leased, route, message, entries)
        mail_dsn = message.dsn
        if mail_dsn.ret == "FULL" and session.size_limit and len(message.content) > session.size_limit // 2:
            mail_dsn = replace(mail_dsn, ret="HDRS")  # the whole message would not fit beside the report
        report = build_report(
            reporting_mta=self.pool.local_hostname,
            remote_mta=session.key.host,
            sender=message.mail_from,
            entries=entries,
            mail_dsn=mail_dsn,
            content=message.content,
            original_headers=split_headers(message.content)[0],
        )
        return await session.send(Transaction("", (message.mail_from,), report, message.smtp_utf8))
