"""One authenticated SMTP session with an upstream server, from connect to QUIT, and the transactions it
carries. The pool (pool.py) only leases these; a session that errs marks itself broken and is closed,
never leased again.

aiosmtplib does the handshake: connect, STARTTLS, EHLO and AUTH (PLAIN, LOGIN, XOAUTH2). Then the session
takes over the transport's reads with a `ReplyReader`, because aiosmtplib reads exactly one reply per
command it sent and so cannot pipeline (RFC 2920): with PIPELINING, MAIL, RCPT and (for one recipient)
DATA go out in one write, which saves two round trips and two writes per message.

Each part of the conversation has one place:
- `_authenticate`: AUTH, with the mechanism and credentials the route resolved to (for an `oauth2` block,
  an access token from oauth2.py, and once more with a new one if the upstream refuses a cached one);
- `_mail_command`, `_rcpt_command`: the envelope's command lines and their parameters;
- `encode_data`: the message as DATA sends it;
- `Reply.parse` (reply.py), called by `ReplyReader`: every reply after the handshake;
- `_read`: what a 421 means (RFC 5321 3.8: the server is closing the session);
- `send`: the transaction, its refusals, RSET, and what a lost connection means for it;
- `begin`, `add_recipient`, `finish`, `abort`: the same transaction in step with the app's commands
  (pass-through, docs/delivery.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import aiosmtplib
from aiosmtplib import SMTPStatus
from aiosmtplib.auth import auth_xoauth2_encode
from aiosmtplib.email import quote_address

from outbound_relay.config import AuthType, TlsMode, TlsSettings
from outbound_relay.dsn_params import NO_MAIL_DSN, NO_RCPT_DSN, MailDsn, RcptDsn
from outbound_relay.errors import (
    DeliveryUncertain,
    RouteMisconfigured,
    UpstreamAuthFailed,
    UpstreamUnavailable,
)
from outbound_relay.message import address_defect
from outbound_relay.metrics import AuthResult, RelayMetrics
from outbound_relay.oauth2 import TokenProvider
from outbound_relay.reply import Reply
from outbound_relay.scopes import Route

log = logging.getLogger(__name__)

# RFC 5321 2.3.8 and 4.1.1.4: lines end in CRLF, and a bare CR or bare LF must not reach the upstream, which
# may read either as a line end (and "\r.\r" as the end of DATA: SMTP smuggling). CRs before a line end
# join it (a stray CR must not turn a header line into a blank line that ends the header block), and each
# other bare CR or bare LF becomes CRLF (docs/delivery.md, "Line ends"); then a line starting with "."
# gets another.
_LINE_END = re.compile(rb"\r*\n|\r")
_LEADING_DOT = re.compile(rb"(?m)^\.")

# An RFC 5321 Mailbox whose local part and domain are both dot-atoms: nearly every envelope address.
# For these, the full RFC 5322 parsers (aiosmtpd's on the way in, aiosmtplib's on the way out) only give
# back the same text, at a cost that showed in profiles; anything else still goes through them.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
DOT_ATOM_ADDRESS = rf"{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*"
_SIMPLE_ADDRESS = re.compile(rf"{DOT_ATOM_ADDRESS}\Z")

# RFC 5321 4.5.3.1.5 allows 512 octets a reply line; a server that sends far more is not talking SMTP.
MAX_REPLY_BYTES = 64 * 1024

_RCPT_ACCEPTED = (SMTPStatus.completed, SMTPStatus.will_forward)

# Upstreams already warned about for AUTH without protecting TLS: the warning is logged once each.
_WARNED_INSECURE_AUTH: set[UpstreamKey] = set()
MAX_WARNED = 1000


class UpstreamKey(NamedTuple):
    """What makes two sessions interchangeable: the same server, TLS settings and credentials."""

    host: str
    port: int
    tls_mode: TlsMode
    verify: bool
    ca_file: Path | None
    identity: str  # a digest of mechanism, user and password (Route.identity)

    @classmethod
    def of(cls, route: Route) -> UpstreamKey:
        if route.gateway is None:
            raise RouteMisconfigured(
                f"no gateway for domain {route.domain} on binding {route.binding}: "
                "set gateway in a policy of this scope or a wider one"
            )
        gateway, tls = route.gateway.value, route.tls.value
        return cls(gateway.host, gateway.port, tls.mode, tls.verify, tls.ca_file, route.identity())

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Transaction:
    """One message for the upstream: the envelope as the client gave it and the content to send."""

    mail_from: str  # "" for the null sender
    rcpt_tos: tuple[str, ...]
    content: bytes
    smtp_utf8: bool = False  # the client said SMTPUTF8 on MAIL (RFC 6531)
    dsn: MailDsn = NO_MAIL_DSN  # RET and ENVID of the client's MAIL (RFC 3461)
    declared_size: int | None = None  # the client's SIZE= on MAIL (RFC 1870), while the content is not there
    rcpt_dsn: tuple[RcptDsn, ...] = ()  # NOTIFY and ORCPT of each of rcpt_tos; empty when none was given

    def dsn_of(self, index: int) -> RcptDsn:
        return self.rcpt_dsn[index] if self.rcpt_dsn else NO_RCPT_DSN

    @property
    def size(self) -> int | None:
        """The message's size as MAIL's SIZE= gives it: the content's as it goes out (line ends made
        CRLF), once there; else the client's declared one."""
        return normalised_size(self.content) if self.content else self.declared_size


@dataclass(frozen=True, slots=True)
class Sent:
    """What the upstream made of a transaction: the reply to the message, and the recipients it refused
    while it took the message for the others (empty when the reply is a refusal: nobody got it)."""

    reply: Reply
    refused: tuple[tuple[str, Reply], ...] = ()


class SessionDropped(ConnectionError):
    """The session ended or broke while we waited for a reply: closed, reset, garbled or timed out."""


class _Closing(SessionDropped):
    """The upstream answered 421: it is closing the session (RFC 5321 3.8)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.one_line())
        self.reply = reply


class StaleSession(Exception):
    """A reused session failed before anything of the transaction reached the upstream: the session is
    broken, and sending the transaction again on a fresh one is safe."""


class TlsContexts:
    """One SSL context per (verify, caFile), shared by the sessions that use them."""

    def __init__(self) -> None:
        self._contexts: dict[tuple[bool, Path | None], ssl.SSLContext] = {}

    def clear(self) -> None:
        """Forget them: a CA file is read anew (a rotated caFile keeps its path) for the next session."""
        self._contexts.clear()

    def get(self, tls: TlsSettings) -> ssl.SSLContext | None:
        if tls.mode is TlsMode.NONE:
            return None
        cache_key = (tls.verify, tls.ca_file)
        context = self._contexts.get(cache_key)
        if context is None:
            try:
                context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            except (OSError, ssl.SSLError) as error:
                raise RouteMisconfigured(f"tls.caFile {tls.ca_file} cannot be used: {error}") from None
            if not tls.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._contexts[cache_key] = context
        return context


class ReplyReader(asyncio.Protocol):
    """The protocol of a session's transport once it is authenticated: splits what arrives into SMTP
    replies, however many a read brings, and hands them out in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # the lines so far of a multiline reply
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: SessionDropped | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._split()
        except ValueError as error:
            self._fail(SessionDropped(f"malformed reply: {error}"))
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(SessionDropped("reply too long"))
        self._wake()

    def _split(self) -> None:
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            line = bytes(self._buffer[start:end])
            start = end + 1
            self._lines.append(line)
            if line[3:4] != b"-":  # "250 ..." ends a reply, "250-..." continues it
                lines, self._lines = self._lines, []
                self._replies.append(Reply.parse(lines))
        del self._buffer[:start]

    def eof_received(self) -> bool:
        self._fail(SessionDropped("the upstream closed the connection"))
        return False  # and the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed"
        self._fail(SessionDropped(reason))

    def _fail(self, error: SessionDropped) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read(self, patience: float) -> Reply:
        """The next reply; replies that arrived before a failure are still handed out first."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(patience, self._fail, SessionDropped(f"no reply within {patience:g}s"))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._replies.popleft()


class UpstreamSession:
    """An authenticated session with one upstream: `open` it, `send` transactions on it, `close` it."""

    def __init__(self, key: UpstreamKey, smtp: aiosmtplib.SMTP, *, timeout: float) -> None:
        self.key = key
        self.timeout = timeout  # for each reply; the pool sets it anew when a reload changed it
        self.data_timeout = timeout  # for sending the body and the final reply to it (RFC 5321 4.5.3.2)
        self.size_limit = 0  # the server's SIZE (RFC 1870), 0 when it gives none
        self.size_offered = False  # the server offers SIZE, with or without a limit: SIZE= goes on MAIL
        self.reused = False  # set by the pool when it leases the session out again
        self.broken = False  # it erred, or the upstream is closing it: closed, never leased again
        self.closed = False
        self.last_used = time.monotonic()
        self.pipelining = False  # the server offers PIPELINING (RFC 2920)
        self.eight_bit_mime = False  # the server offers 8BITMIME
        self.smtputf8 = False  # the server offers SMTPUTF8 (RFC 6531)
        self.chunking = False  # the server offers CHUNKING: BDAT (RFC 3030)
        self._content_sent = False  # the current transaction's message went out: a failure now is uncertain
        self.dsn = False  # the server offers DSN (RFC 3461): the client's DSN parameters go to it
        self._smtp = smtp
        self._transport: asyncio.WriteTransport | None = None
        self._reader: ReplyReader | None = None

    # -- the handshake -------------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        key: UpstreamKey,
        route: Route,
        *,
        tls_context: ssl.SSLContext | None,
        local_hostname: str,
        connect_timeout: float,
        reply_timeout: float,
        metrics: RelayMetrics,
        tokens: TokenProvider,
    ) -> UpstreamSession:
        """Connect, STARTTLS and EHLO as `route.tls` says, then AUTH if the route has a mechanism."""
        smtp = aiosmtplib.SMTP(
            hostname=key.host,
            port=key.port,
            local_hostname=local_hostname,
            timeout=reply_timeout,
            use_tls=key.tls_mode is TlsMode.IMPLICIT,
            start_tls=False,
            tls_context=tls_context,
        )
        session = cls(key, smtp, timeout=reply_timeout)
        try:
            await session._handshake(tls_context, connect_timeout)
            if route.type is not None:
                await session._authenticate(route, metrics, tokens)
        except BaseException:
            await session.close()
            raise
        session._take_over()
        return session

    async def _handshake(self, context: ssl.SSLContext | None, connect_timeout: float) -> None:
        smtp, key = self._smtp, self.key
        try:
            await smtp.connect(timeout=connect_timeout)
            await smtp.ehlo()
            if key.tls_mode is TlsMode.STARTTLS:
                if not smtp.supports_extension("starttls"):
                    raise UpstreamAuthFailed(
                        f"upstream {key} does not offer STARTTLS and tls.mode is starttls; "
                        "refusing to send mail or credentials in clear"
                    )
                await smtp.starttls(tls_context=context)
                await smtp.ehlo()  # RFC 3207: forget what was learnt before TLS; AUTH is offered anew
        except ssl.SSLError as error:
            raise UpstreamUnavailable(f"TLS with upstream {key} failed: {error.reason or error}") from None
        except aiosmtplib.SMTPResponseException as error:
            raise UpstreamUnavailable(
                f"upstream {key} refused the session: {error.code} {error.message}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as error:
            raise UpstreamUnavailable(f"cannot reach upstream {key}: {_reason(error)}") from None

    async def _authenticate(self, route: Route, metrics: RelayMetrics, tokens: TokenProvider) -> None:
        assert route.type is not None
        mechanism = route.type.value
        policy = route.credential_policy
        where = f"upstream {self.key} (AUTH {mechanism} as set by {route.type.source})"
        if route.user is None or (route.password is None and route.oauth2 is None):
            missing = "user" if route.user is None else "password"
            raise RouteMisconfigured(
                f"AUTH {mechanism} from {route.type.source} needs a {missing}, and no scope gives one"
            )
        smtp = self._smtp
        if mechanism.lower() not in smtp.server_auth_methods:
            metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.ERROR, policy=policy).inc()
            offered = " ".join(smtp.server_auth_methods).upper() or "no AUTH at all"
            raise UpstreamAuthFailed(f"{where} does not offer it; it offers {offered}")
        if (exposure := route.auth_exposure()) is not None:
            raise UpstreamAuthFailed(f"not sending AUTH {mechanism} to upstream {self.key}: {exposure}")
        if not route.tls_protects_auth:
            metrics.plaintext_auth.inc()
            if self.key not in _WARNED_INSECURE_AUTH and len(_WARNED_INSECURE_AUTH) < MAX_WARNED:
                _WARNED_INSECURE_AUTH.add(self.key)
                log.warning(
                    "sending AUTH %s to %s over %s, as %s allows",
                    mechanism,
                    self.key,
                    "plaintext" if self.key.tls_mode is TlsMode.NONE else "unverified TLS",
                    route.insecure_auth_by,
                )
        if route.oauth2 is not None:
            await self._authenticate_oauth2(route, metrics, tokens, where)
            return
        assert route.password is not None
        user, secret = route.user.value, route.password.value.get_secret_value()
        started = time.monotonic()
        try:
            if mechanism is AuthType.PLAIN:
                await smtp.auth_plain(user, secret)
            elif mechanism is AuthType.LOGIN:
                await smtp.auth_login(user, secret)
            else:
                await auth_xoauth2(smtp, user, secret)
        except aiosmtplib.SMTPAuthenticationError as error:
            metrics.auth_duration.labels(policy=policy).observe(time.monotonic() - started)
            metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.FAILURE, policy=policy).inc()
            raise UpstreamAuthFailed(
                f"authentication to {where} failed: {error.code} {_one_line(error.message)}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as error:
            metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.ERROR, policy=policy).inc()
            raise UpstreamUnavailable(f"AUTH with {where} did not complete: {_reason(error)}") from None
        metrics.auth_duration.labels(policy=policy).observe(time.monotonic() - started)
        metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.SUCCESS, policy=policy).inc()

    async def _authenticate_oauth2(
        self, route: Route, metrics: RelayMetrics, tokens: TokenProvider, where: str
    ) -> None:
        """AUTH XOAUTH2 with an access token from the policy's token endpoint. If the upstream refuses a
        cached token, it may have been revoked or expired early: AUTH once more with a new one. A token
        fetched for this very AUTH is not retried: the endpoint would only issue another like it."""
        assert route.oauth2 is not None
        assert route.user is not None
        assert route.type is not None
        if route.type.value is not AuthType.XOAUTH2:
            raise RouteMisconfigured(
                f"{route.oauth2.source} gives an oauth2 token source, but AUTH {route.type.value} "
                f"(from {route.type.source}) needs a password"
            )
        source, user, refused = route.oauth2.value, route.user.value, None
        policy = route.credential_policy
        attempts = metrics.auth_attempts
        for attempt in (1, 2):
            token = await tokens.token(source, refused=refused)  # TokenUnavailable: a 454 naming it
            started = time.monotonic()
            try:
                await auth_xoauth2(self._smtp, user, token.value)
            except aiosmtplib.SMTPAuthenticationError as error:
                metrics.auth_duration.labels(policy=policy).observe(time.monotonic() - started)
                attempts.labels(mechanism=AuthType.XOAUTH2, result=AuthResult.FAILURE, policy=policy).inc()
                if attempt == 1 and not token.fetched:
                    log.info("%s refused the cached access token; asking for a new one", where)
                    refused = token.value
                    continue
                raise UpstreamAuthFailed(
                    f"authentication to {where} failed with a new access token from policy "
                    f"{source.policy}'s oauth2.tokenUrl: {error.code} {_one_line(error.message)}"
                ) from None
            except (aiosmtplib.SMTPException, OSError) as error:
                attempts.labels(mechanism=AuthType.XOAUTH2, result=AuthResult.ERROR, policy=policy).inc()
                raise UpstreamUnavailable(f"AUTH with {where} did not complete: {_reason(error)}") from None
            metrics.auth_duration.labels(policy=policy).observe(time.monotonic() - started)
            attempts.labels(mechanism=AuthType.XOAUTH2, result=AuthResult.SUCCESS, policy=policy).inc()
            return

    def _take_over(self) -> None:
        """From now on, commands go through `_write` and `_read`, no longer through aiosmtplib."""
        smtp = self._smtp
        self.pipelining = smtp.supports_extension("pipelining")
        self.eight_bit_mime = smtp.supports_extension("8bitmime")
        self.smtputf8 = smtp.supports_extension("smtputf8")
        self.chunking = smtp.supports_extension("chunking")
        self.dsn = smtp.supports_extension("dsn")
        size = smtp.esmtp_extensions.get("size", "")
        self.size_limit = int(size) if size.isdigit() else 0
        self.size_offered = smtp.supports_extension("size")
        assert smtp.transport is not None, "connected"
        # uvloop's transports are not asyncio.WriteTransport subclasses, but write like one.
        self._transport, self._reader = cast(asyncio.WriteTransport, smtp.transport), ReplyReader()
        self._transport.set_protocol(self._reader)

    # -- the session's state -------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return self._smtp.is_connected and not (self._transport is not None and self._transport.is_closing())

    @property
    def usable(self) -> bool:
        """Connected and not broken: it may carry another transaction."""
        return not self.broken and self.is_connected

    async def close(self, patience: float = 2) -> bool:
        """Say QUIT if the session is usable, waiting at most `patience` seconds for the reply, then
        close it. True the first time, so that whoever counts open sessions counts each once."""
        if self.usable:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                if self._reader is None:
                    await asyncio.wait_for(self._smtp.quit(), patience)
                else:
                    self._write(b"QUIT\r\n")
                    await self._reader.read(patience)
        self._smtp.close()
        first, self.closed = not self.closed, True
        return first

    # -- the wire ------------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Write one or more command lines (or message data): buffered, the reply says how it went."""
        if self._transport is None or self._transport.is_closing():
            raise SessionDropped("connection closed")
        self._transport.write(data)

    async def _read(self, patience: float | None = None) -> Reply:
        assert self._reader is not None, "the handshake is done"
        reply = await self._reader.read(self.timeout if patience is None else patience)
        if reply.code == SMTPStatus.domain_unavailable:
            self.broken = True
            raise _Closing(reply)
        return reply

    def _mail_command(self, message: Transaction) -> bytes:
        params = (b" BODY=8BITMIME" if self.eight_bit_mime else b"") + (
            b" SMTPUTF8" if message.smtp_utf8 and self.smtputf8 else b""
        )
        if self.size_offered and (size := message.size) is not None:
            params += b" SIZE=%d" % size
        if self.dsn:
            params += message.dsn.params()
        return b"MAIL FROM:" + _path(message.mail_from, message.smtp_utf8) + params + b"\r\n"

    def _rcpt_command(self, rcpt: str, dsn: RcptDsn, smtp_utf8: bool) -> bytes:
        params = dsn.params() if self.dsn else b""
        return b"RCPT TO:" + _path(rcpt, smtp_utf8) + params + b"\r\n"

    # -- the transaction -----------------------------------------------------------------------------

    def _cannot_carry(self, message: Transaction) -> Reply | None:
        """Why this upstream cannot take `message` at all, before anything is sent."""
        if message.smtp_utf8 and not self.smtputf8 and not _all_ascii(message):
            return Reply.of(
                553, "5.6.7", f"upstream {self.key} does not offer SMTPUTF8, which these addresses need"
            )
        if self.size_limit and (size := message.size or 0) > self.size_limit:
            return Reply.of(
                552,
                "5.3.4",
                f"message of {size} octets is over the {self.size_limit} that upstream {self.key} accepts",
            )
        return None

    async def send(self, message: Transaction, *, defer: bool = True) -> Sent:
        """MAIL, RCPT, DATA: the upstream's reply to the message, or the refusal to pass on. With
        PIPELINING the commands, DATA included, go out in one write and their replies are read after it
        (RFC 2920). Recipients the upstream refuses while it accepts others are left out and named in
        the result: the others get the message (docs/delivery.md, "Recipients the upstream refuses").
        `defer`: a recipient refused for now (not for being over the upstream's cap, `over_cap`) defers
        the whole message, before anything is sent; else it is one of the refused.

        Raises StaleSession when a reused session fails before anything reached the upstream,
        DeliveryUncertain when the connection fails after the message was sent, and UpstreamUnavailable
        when it fails otherwise (nothing was delivered)."""
        self._content_sent = False
        return await self._send_once(message, defer=defer)

    async def _send_once(self, message: Transaction, *, defer: bool) -> Sent:
        if (refusal := self._cannot_carry(message)) is not None:
            return Sent(refusal)
        mail = self._mail_command(message)
        rcpts = [
            self._rcpt_command(rcpt, message.dsn_of(index), message.smtp_utf8)
            for index, rcpt in enumerate(message.rcpt_tos)
        ]
        try:
            if self.pipelining:
                self._write(b"".join([mail, *rcpts, b"DATA\r\n"]))
            else:
                self._write(mail)
            mail_reply = await self._read()
        except OSError as error:  # _Closing too: at MAIL, a 421 is a session that had gone stale
            self.broken = True
            if self.reused:
                raise StaleSession(str(error) or type(error).__name__) from None
            raise UpstreamUnavailable(f"upstream {self.key} failed at MAIL: {error}") from None
        try:
            return await self._after_mail(message, mail_reply, rcpts, defer=defer)
        except _Closing as closing:
            return Sent(closing.reply)  # a transient refusal, passed on as it is
        except OSError as error:
            self.broken = True
            reason = error or type(error).__name__
            if self._content_sent:
                raise DeliveryUncertain(
                    f"upstream {self.key} failed after the message was sent ({reason}): it may have been "
                    "delivered"
                ) from None
            raise UpstreamUnavailable(
                f"upstream {self.key} failed during the transaction, before the message was sent ({reason})"
            ) from None

    async def _after_mail(
        self, message: Transaction, mail_reply: Reply, rcpts: list[bytes], *, defer: bool
    ) -> Sent:
        mail_accepted = mail_reply.code == SMTPStatus.completed
        refused: list[tuple[str, Reply]] = []
        # Pipelined, every RCPT has a reply to read; one at a time, none is sent after a failed MAIL.
        if self.pipelining or mail_accepted:
            for rcpt, line in zip(message.rcpt_tos, rcpts, strict=True):
                if not self.pipelining:
                    self._write(line)
                reply = await self._read()
                if reply.code not in _RCPT_ACCEPTED:
                    refused.append((rcpt, reply))
        data_reply = await self._read() if self.pipelining else None
        deferred = [(rcpt, reply) for rcpt, reply in refused if reply.is_transient and not over_cap(reply)]
        if defer and mail_accepted and deferred and len(refused) < len(rcpts):
            # Some recipients refused for now: no message for the others either, so that the app's retry
            # of the whole message gives nobody a second copy (and a temporary refusal stays temporary).
            if data_reply is not None and data_reply.code == SMTPStatus.start_input:
                # DATA was taken (pipelined): only closing the connection ends it undelivered (RFC 5321
                # 3.3: a transaction without its end mark is not delivered).
                self.broken = True
                self._smtp.close()
            else:
                await self._reset()
            return Sent(_deferral(deferred, len(rcpts)))
        if not mail_accepted or len(refused) == len(rcpts):
            if data_reply is not None and data_reply.code == SMTPStatus.start_input:
                # RFC 2920 3.1: DATA was taken with no valid recipient; an empty message ends it.
                self._write(b".\r\n")
                await self._read()
            await self._reset()
            if not mail_accepted:
                return Sent(refused_reply(mail_reply, "MAIL"))
            return Sent(_refusal(refused, len(rcpts)))
        if data_reply is None:
            self._write(b"DATA\r\n")
            data_reply = await self._read()
        final = await self._content(message.content, data_reply)
        return Sent(final, tuple(refused) if final.is_positive else ())

    async def _content(self, content: bytes, data_reply: Reply) -> Reply:
        """The message after the reply to DATA: the upstream's final reply, or its refusal (then the
        transaction is reset)."""
        if data_reply.code != SMTPStatus.start_input:
            await self._reset()
            return refused_reply(data_reply, "DATA")
        self._write(encode_data(content))
        self._content_sent = True  # only now: a write that failed sent nothing
        # Written to the transport's buffer at once: the wait covers sending the body and the verdict.
        final = await self._read(self.data_timeout)
        if final.is_positive:
            return final
        await self._reset()
        return refused_reply(final, "the message")

    # -- a transaction in step with the app's (pass-through) -----------------------------------------

    async def begin(self, message: Transaction) -> tuple[Reply, bool]:
        """MAIL FROM and the first RCPT TO (pipelined when offered), as the app's first RCPT arrives:
        the reply for that RCPT, and whether the upstream transaction is open (MAIL accepted). A refused
        MAIL is that reply, and the transaction is reset. Raises like `send`."""
        if (refusal := self._cannot_carry(message)) is not None:
            return refusal, False
        [rcpt] = message.rcpt_tos
        mail = self._mail_command(message)
        rcpt_line = self._rcpt_command(rcpt, message.dsn_of(0), message.smtp_utf8)
        try:
            self._write(mail + rcpt_line if self.pipelining else mail)
            mail_reply = await self._read()
        except OSError as error:
            self.broken = True
            if self.reused:
                raise StaleSession(str(error) or type(error).__name__) from None
            raise UpstreamUnavailable(f"upstream {self.key} failed at MAIL: {error}") from None
        try:
            if mail_reply.code != SMTPStatus.completed:
                if self.pipelining:
                    await self._read()  # the RCPT's, moot
                await self._reset()
                return refused_reply(mail_reply, "MAIL"), False
            if not self.pipelining:
                self._write(rcpt_line)
            return await self._read(), True
        except _Closing as closing:
            return closing.reply, False
        except OSError as error:
            raise self._lost(error) from None

    async def add_recipient(self, rcpt: str, dsn: RcptDsn, message: Transaction) -> Reply:
        """One more RCPT TO in a begun transaction: the upstream's reply to it."""
        if (refusal := self._cannot_carry(Transaction("", (rcpt,), b"", message.smtp_utf8))) is not None:
            return refusal
        try:
            self._write(self._rcpt_command(rcpt, dsn, message.smtp_utf8))
            return await self._read()
        except _Closing as closing:
            return closing.reply
        except OSError as error:
            raise self._lost(error) from None

    async def finish(self, content: bytes) -> Reply:
        """DATA and the message in a begun transaction with at least one accepted recipient: the
        upstream's final reply, or its refusal (then the transaction is reset)."""
        if self.size_limit and normalised_size(content) > self.size_limit:
            await self.abort()
            refusal = self._cannot_carry(Transaction("", (), content))
            assert refusal is not None
            return refusal
        try:
            if self.chunking:
                # BDAT (RFC 3030) needs no 354 first: command and message in one write, one reply, which
                # saves the round trip DATA costs here (it cannot join the app's RCPTs, unlike in `send`).
                data = normalise_line_ends(content)
                self._write(b"BDAT %d LAST\r\n" % len(data) + data)
                final = await self._read(self.data_timeout)
                if final.is_positive:
                    return final
                await self._reset()
                return refused_reply(final, "the message")
            self._write(b"DATA\r\n")
            return await self._content(content, await self._read())
        except _Closing as closing:
            return closing.reply
        except OSError as error:
            raise self._lost(error) from None

    async def abort(self) -> None:
        """End a begun transaction without a message (RSET): the app reset it or went away."""
        if self.usable:
            await self._reset()

    def _lost(self, error: OSError) -> UpstreamUnavailable:
        self.broken = True
        return UpstreamUnavailable(
            f"upstream {self.key} failed during the transaction ({error or type(error).__name__}); "
            "if DATA was sent, the message may have been delivered"
        )

    async def _reset(self) -> None:
        """RSET after a refusal, so that the session can carry the next transaction; if that fails, it
        cannot, and is closed."""
        try:
            self._write(b"RSET\r\n")
            if (await self._read()).code != SMTPStatus.completed:
                self.broken = True
        except OSError:
            self.broken = True


# RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE = 512


async def auth_xoauth2(smtp: aiosmtplib.SMTP, user: str, token: str) -> None:
    """AUTH XOAUTH2 (Google's and Microsoft's format). The credentials go in the AUTH command itself when
    that line stays within 512 octets, else after the server's empty 334 challenge, as RFC 4954 4 asks:
    a JWT access token alone is often longer (Dovecot's submission service refuses longer lines)."""
    encoded = auth_xoauth2_encode(user, token)
    if len(b"AUTH XOAUTH2 " + encoded + b"\r\n") <= MAX_COMMAND_LINE:
        response = await smtp.execute_command(b"AUTH", b"XOAUTH2", encoded)
    else:
        response = await smtp.execute_command(b"AUTH", b"XOAUTH2")
        if response.code == SMTPStatus.auth_continue:
            response = await smtp.execute_command(encoded)
    if response.code == SMTPStatus.auth_continue:
        # A refusal comes as a challenge carrying a JSON error; an empty response gets the final reply.
        response = await smtp.execute_command(b"")
    if response.code != SMTPStatus.auth_successful:
        raise aiosmtplib.SMTPAuthenticationError(response.code, response.message)


def normalised_size(content: bytes) -> int:
    """len(normalise_line_ends(content)), without a copy of a message whose line ends are all CRLF."""
    crlf = content.count(b"\r\n")
    if crlf == content.count(b"\r") == content.count(b"\n"):
        return len(content) + (2 if content and not content.endswith(b"\r\n") else 0)
    return len(normalise_line_ends(content))


def normalise_line_ends(content: bytes) -> bytes:
    """The message with CRs before a line end joined to it and every other bare CR and bare LF made CRLF,
    ending in CRLF unless empty: what the upstream receives, once un-stuffed."""
    crlf = content.count(b"\r\n")
    if crlf != content.count(b"\r") or crlf != content.count(b"\n"):  # the common case needs no copy
        content = _LINE_END.sub(b"\r\n", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content


def encode_data(content: bytes) -> bytes:
    """The message as DATA sends it: CRLF line ends and nothing else ending a line, a final CRLF, dots
    doubled, then the end mark."""
    return _LEADING_DOT.sub(b"..", normalise_line_ends(content)) + b".\r\n"


def _path(address: str, smtp_utf8: bool) -> bytes:
    """`<address>` for MAIL FROM / RCPT TO; only unusual addresses pay for aiosmtplib's parser.

    Raises ValueError for an address with a control character, which could end the command line: the
    handler refuses those at MAIL and RCPT, this is the second lock."""
    if _SIMPLE_ADDRESS.match(address):
        return b"<" + address.encode("ascii") + b">"
    if (reason := address_defect(address)) is not None:
        raise ValueError(f"envelope address {address!r} {reason}")
    if smtp_utf8:
        return b"<" + address.encode("utf-8") + b">"  # RFC 6531: sent as the app gave it
    return quote_address(address).encode("ascii")


def envelope_path(address: str, smtp_utf8: bool) -> bytes:
    """`<address>` as MAIL FROM / RCPT TO send it upstream. ValueError when it cannot be sent: non-ASCII
    without SMTPUTF8, or characters that would end the command line (the relay checks this at the
    client's MAIL and RCPT, so that nothing fails later at DATA)."""
    return _path(address, smtp_utf8)


def _all_ascii(message: Transaction) -> bool:
    return message.mail_from.isascii() and all(rcpt.isascii() for rcpt in message.rcpt_tos)


def refused_reply(reply: Reply, stage: str) -> Reply:
    """The upstream's refusal, passed on; a 2xx or 3xx where a refusal was expected is a broken or
    confused upstream, and must never reach the app as a success."""
    if reply.code >= 400:
        return reply
    return Reply.of(
        451, "4.5.0", f"upstream answered {reply.code} to {stage}, which SMTP does not allow there"
    )


def _refusal(refused: list[tuple[str, Reply]], total: int) -> Reply:
    """The one reply to the message when the upstream refused every recipient: a temporary refusal
    if any was temporary (a retry may get that one through), else the first permanent one."""
    if total == 1:
        return refused_reply(refused[0][1], "RCPT")
    temporary = [(rcpt, reply) for rcpt, reply in refused if reply.code < 500]
    _, first = (temporary or refused)[0]
    if first.code < 400:
        return refused_reply(first, "RCPT")
    names = ", ".join(rcpt for rcpt, _ in refused)
    return first._replace(
        lines=(*first.lines, f"(upstream refused all {total} recipients: {names}; nothing was delivered)")
    )


def refused_at(rcpt_tos: tuple[str, ...], refused: tuple[tuple[str, Reply], ...]) -> list[tuple[int, Reply]]:
    """The index in `rcpt_tos` of each refused recipient: refusals come in the order of the RCPTs, so a
    recipient given twice is matched to the right one of its RCPTs."""
    found, start = [], 0
    for rcpt, reply in refused:
        index = rcpt_tos.index(rcpt, start)
        found.append((index, reply))
        start = index + 1
    return found


def over_cap(reply: Reply) -> bool:
    """A RCPT refused because the transaction has as many recipients as the upstream takes in one: RFC
    5321 4.5.3.1.10's `452` (RFC 3463 `4.5.3`), which the client answers with another transaction."""
    return reply.code == 452 and (
        reply.status == "4.5.3" or (reply.status is None and "recipients" in reply.text)
    )


def _deferral(deferred: list[tuple[str, Reply]], total: int) -> Reply:
    """The reply to a message not sent because the upstream refused some of its recipients for now."""
    _, first = deferred[0]
    names = ", ".join(rcpt for rcpt, _ in deferred)
    return first._replace(
        lines=(
            *first.lines,
            f"(upstream deferred {len(deferred)} of {total} recipients: {names}; nothing was sent, "
            "send the message again)",
        )
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error) or type(error).__name__
    return _one_line(text)
