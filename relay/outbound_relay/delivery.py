"""Relay mode: one inbound transaction becomes one upstream transaction, and the upstream's verdict is
the client's. Nothing is acknowledged with 250 unless the upstream acknowledged it.

Recipients are grouped at RCPT by the domain policies that apply to them (ScopeIndex.signature), since the
binding header and hooks are only known after DATA; a recipient of another route gets `452 4.5.3` and
the client sends it in a new transaction (RFC 5321 4.5.3.1.10).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from outbound_relay.config import CONTEXT_KEYS, RelayConfig, fingerprint, load_config, watched_files
from outbound_relay.errors import HookFailed, RelayError, RouteMisconfigured, UpstreamUnavailable
from outbound_relay.hooks import HookChain, HookError, HookMessage
from outbound_relay.message import parse_headers, pop_header, split_headers
from outbound_relay.metrics import MessageResult, RelayMetrics
from outbound_relay.scopes import Route, ScopeIndex
from outbound_relay.upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger(__name__)

# aiosmtplib keeps these on the exception; everything else is a transport or protocol failure.
_UPSTREAM_REPLY_ERRORS = (aiosmtplib.SMTPSenderRefused, aiosmtplib.SMTPDataError)


@dataclass(frozen=True, kw_only=True)
class Generation:
    """One loaded config with everything derived from it; a transaction keeps the one it started with."""

    config: RelayConfig
    scopes: ScopeIndex
    hooks: HookChain
    digest: str
    files: tuple[Path, ...] = ()

    @classmethod
    def load(cls, path: Path) -> Generation:
        config = load_config(path)
        files = watched_files(config, path)
        return cls.build(config, base_dir=path.parent, digest=fingerprint(files), files=files)

    @classmethod
    def build(
        cls, config: RelayConfig, *, base_dir: Path, digest: str = "", files: tuple[Path, ...] = ()
    ) -> Generation:
        hooks = HookChain.load(config.hooks, base_dir)
        return cls(config=config, scopes=ScopeIndex(config), hooks=hooks, digest=digest, files=files)

    @property
    def short_digest(self) -> str:
        return self.digest[:12] or "inline"


class RelayHandler:
    """aiosmtpd handler; `generation` is swapped by the reloader, transactions pin theirs at MAIL."""

    def __init__(self, generation: Generation, pool: UpstreamPool, metrics: RelayMetrics) -> None:
        self.generation = generation
        self.pool = pool
        self.metrics = metrics
        self._pinned: weakref.WeakKeyDictionary[Envelope, Generation] = weakref.WeakKeyDictionary()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def _generation_of(self, envelope: Envelope) -> Generation:
        return self._pinned.get(envelope) or self.generation

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, mail_options: list[str]
    ) -> str:
        self._pinned[envelope] = self.generation
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self._begin()
        return "250 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._end(envelope)
        return "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self._end(envelope)
        return "221 Bye"

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
        try:
            reply = await self.deliver(self._generation_of(envelope), envelope)
        finally:
            self._end(envelope)
        self.metrics.delivery_duration.observe(time.perf_counter() - started)
        result = (
            MessageResult.DELIVERED
            if reply.startswith("2")
            else MessageResult.DEFERRED
            if reply.startswith("4")
            else MessageResult.REJECTED
        )
        self.metrics.messages.labels(result=result.value).inc()
        return reply

    def _begin(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def _end(self, envelope: Envelope) -> None:
        if self._pinned.pop(envelope, None) is not None:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def deliver(self, generation: Generation, envelope: Envelope) -> str:
        """The reply for the client's DATA: the upstream's, or ours when it could not be asked."""
        assert isinstance(envelope.content, bytes)
        assert envelope.mail_from is not None
        try:
            route, content = await self._route(generation, envelope, envelope.content)
            return await self._send(route, envelope.mail_from, envelope.rcpt_tos, content)
        except RelayError as error:
            level = logging.WARNING if error.temporary else logging.INFO
            log.log(level, "transaction for %d recipient(s) not delivered: %s", len(envelope.rcpt_tos), error)
            return error.reply

    async def _route(self, generation: Generation, envelope: Envelope, content: bytes) -> tuple[Route, bytes]:
        config = generation.config
        content, header_binding = pop_header(content, config.binding_header)
        binding = header_binding or config.default_binding
        domain = envelope.rcpt_tos[0].rpartition("@")[2]
        overrides: dict[str, str] = {}
        if generation.hooks:
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

    async def _send(self, route: Route, mail_from: str, rcpt_tos: list[str], content: bytes) -> str:
        async with self.pool.session(route) as conn:
            try:
                return await _transaction(conn, mail_from, rcpt_tos, content)
            except _StaleConnection:
                conn.broken = True
        # A pooled session the upstream had quietly closed: nothing was sent, so one retry is safe.
        async with self.pool.session(route, fresh=True) as conn:
            try:
                return await _transaction(conn, mail_from, rcpt_tos, content)
            except _StaleConnection as stale:
                conn.broken = True
                raise UpstreamUnavailable(f"upstream {conn.key} dropped the connection: {stale}") from None


class _StaleConnection(Exception):
    """A reused connection failed before anything of this transaction reached the upstream."""


def _reply(code: int, message: str) -> str:
    text = " ".join(message.split())
    return f"{code} {text}" if text else str(code)


async def _transaction(conn: UpstreamConnection, mail_from: str, rcpt_tos: list[str], content: bytes) -> str:
    smtp = conn.smtp
    options = ["BODY=8BITMIME"] if smtp.supports_extension("8bitmime") else []
    try:
        await smtp.mail(mail_from, options=options)
    except aiosmtplib.SMTPSenderRefused as error:
        await _reset(conn)
        return _reply(error.code, error.message)
    except (aiosmtplib.SMTPException, OSError) as error:
        conn.broken = True
        if conn.reused:
            raise _StaleConnection(str(error) or type(error).__name__) from None
        raise UpstreamUnavailable(f"upstream {conn.key} failed at MAIL: {error}") from None
    try:
        refused = []
        for rcpt in rcpt_tos:
            try:
                await smtp.rcpt(rcpt)
            except aiosmtplib.SMTPRecipientRefused as error:
                refused.append(error)
        if refused:
            await _reset(conn)
            return _refusal(refused, len(rcpt_tos))
        response = await smtp.data(content)
    except _UPSTREAM_REPLY_ERRORS as error:
        await _reset(conn)
        return _reply(error.code, error.message)
    except (aiosmtplib.SMTPException, OSError) as error:
        conn.broken = True
        raise UpstreamUnavailable(
            f"upstream {conn.key} failed during the transaction ({error or type(error).__name__}); "
            "if DATA was sent, the message may have been delivered"
        ) from None
    return _reply(response.code, response.message)


def _refusal(refused: list[aiosmtplib.SMTPRecipientRefused], total: int) -> str:
    """Our one reply to DATA when the upstream refused some recipients. Delivering to the rest would leave
    the client unable to tell who got the message, so nothing is sent: the client hears why and which."""
    if total == 1:
        return _reply(refused[0].code, refused[0].message)
    temporary = [e for e in refused if e.code < 500]
    first = (temporary or refused)[0]
    names = ", ".join(e.recipient for e in refused)
    return _reply(
        first.code,
        f"{first.message} (upstream refused {len(refused)} of {total} recipients: {names}; "
        "nothing was delivered, send the others again without them)",
    )


async def _reset(conn: UpstreamConnection) -> None:
    try:
        await conn.smtp.rset()
    except (aiosmtplib.SMTPException, OSError):
        conn.broken = True
