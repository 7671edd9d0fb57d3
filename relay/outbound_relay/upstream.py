"""Authenticated upstream sessions, pooled per (host, port, tls, identity).

A pooled session carries many transactions, so the TLS handshake and AUTH are paid once per connection
instead of once per message. A connection that errs is closed, never handed out again.

aiosmtplib does the handshake (connect, STARTTLS, EHLO, AUTH); then a `ReplyReader` takes over the
session's reads, because aiosmtplib reads exactly one reply per command it sent and so cannot pipeline
(RFC 2920), which saves two round trips and two writes per message (delivery.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast

import aiosmtplib

from outbound_relay.config import AuthType, TlsMode, TlsSettings
from outbound_relay.errors import RouteMisconfigured, UpstreamAuthFailed, UpstreamUnavailable
from outbound_relay.metrics import AuthResult, RelayMetrics
from outbound_relay.scopes import Route

log = logging.getLogger(__name__)


class UpstreamKey(NamedTuple):
    host: str
    port: int
    tls_mode: TlsMode
    verify: bool
    ca_file: Path | None
    identity: str  # a digest of mechanism, user and password (Route.identity)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class Reply(NamedTuple):
    code: int
    message: str  # lines joined with "\n", without codes, as aiosmtplib gives them


class UpstreamDropped(ConnectionError):
    """The session ended or broke while we waited for a reply: closed, reset, garbled or timed out."""


# RFC 5321 4.5.3.1.5 allows 512 octets a reply line; a server that sends far more is not talking SMTP.
MAX_REPLY_BYTES = 64 * 1024


class ReplyReader(asyncio.Protocol):
    """The protocol of an authenticated session's transport: splits what arrives into SMTP replies,
    however many a read brings, and hands them out in order."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._lines: list[bytes] = []  # the lines so far of a multiline reply
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: UpstreamDropped | None = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except ValueError:
            self._fail(UpstreamDropped(f"malformed reply {bytes(self._buffer[:80])!r}"))
        if len(self._buffer) > MAX_REPLY_BYTES:
            self._fail(UpstreamDropped("reply too long"))
        self._wake()

    def _parse(self) -> None:
        start = 0
        while (end := self._buffer.find(b"\n", start)) != -1:
            line = bytes(self._buffer[start:end])
            start = end + 1
            self._lines.append(line)
            if line[3:4] != b"-":  # "250 ..." ends a reply, "250-..." continues it
                code = int(line[:3])
                text = b"\n".join(part[4:].strip(b" \t\r") for part in self._lines)
                self._replies.append(Reply(code, text.decode("utf-8", "surrogateescape")))
                self._lines = []
        del self._buffer[:start]

    def eof_received(self) -> bool:
        self._fail(UpstreamDropped("the upstream closed the connection"))
        return False  # and the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f"connection lost: {exc}" if exc else "connection closed"
        self._fail(UpstreamDropped(reason))

    def _fail(self, error: UpstreamDropped) -> None:
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
            timer = loop.call_later(patience, self._fail, UpstreamDropped(f"no reply within {patience:g}s"))
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._replies.popleft()


@dataclass(eq=False)
class UpstreamConnection:
    key: UpstreamKey
    smtp: aiosmtplib.SMTP
    reused: bool = False
    broken: bool = False  # set by whoever saw it err: it is closed, not pooled
    closed: bool = False
    last_used: float = field(default_factory=time.monotonic)
    timeout: float = 60.0  # for each reply
    pipelining: bool = False  # the server offers PIPELINING (RFC 2920)
    eight_bit_mime: bool = False  # the server offers 8BITMIME
    smtputf8: bool = False  # the server offers SMTPUTF8 (RFC 6531)
    _transport: asyncio.WriteTransport | None = None
    _reader: ReplyReader | None = None

    def take_over(self) -> None:
        """From now on, commands go through `send` and `reply`, no longer through `smtp`."""
        smtp = self.smtp
        self.pipelining = smtp.supports_extension("pipelining")
        self.eight_bit_mime = smtp.supports_extension("8bitmime")
        self.smtputf8 = smtp.supports_extension("smtputf8")
        assert smtp.transport is not None, "connected"
        # uvloop's transports are not asyncio.WriteTransport subclasses, but write like one.
        self._transport, self._reader = cast(asyncio.WriteTransport, smtp.transport), ReplyReader()
        self._transport.set_protocol(self._reader)

    @property
    def is_connected(self) -> bool:
        return self.smtp.is_connected and not (self._transport is not None and self._transport.is_closing())

    def send(self, data: bytes) -> None:
        """Write one or more command lines (or message data): buffered, the reply says how it went."""
        if self._transport is None or self._transport.is_closing():
            raise UpstreamDropped("connection closed")
        self._transport.write(data)

    async def reply(self) -> Reply:
        assert self._reader is not None, "take_over() first"
        reply = await self._reader.read(self.timeout)
        if reply.code == 421:  # RFC 5321 3.8: the server is closing the session
            self.broken = True
        return reply

    async def quit(self, patience: float) -> None:
        """Say QUIT, waiting at most `patience` seconds for the reply, then close."""
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            if self._reader is None:
                await asyncio.wait_for(self.smtp.quit(), patience)
            else:
                self.send(b"QUIT\r\n")
                await self._reader.read(patience)
        self.smtp.close()


@dataclass(eq=False)
class _Slot:
    capacity: int  # maxConnections of the route
    limit: asyncio.Semaphore
    idle: list[UpstreamConnection] = field(default_factory=list)
    users: int = 0  # tasks holding or waiting for a connection; the slot is dropped only at 0


def route_key(route: Route) -> UpstreamKey:
    if route.gateway is None:
        raise RouteMisconfigured(
            f"no gateway for domain {route.domain} on binding {route.binding}: "
            "set gateway in a policy of this scope or a wider one"
        )
    gateway, tls = route.gateway.value, route.tls.value
    return UpstreamKey(gateway.host, gateway.port, tls.mode, tls.verify, tls.ca_file, route.identity())


class UpstreamPool:
    def __init__(
        self,
        metrics: RelayMetrics,
        *,
        local_hostname: str,
        connect_timeout: float,
        timeout: float,
        idle_timeout: float,
    ) -> None:
        self.metrics = metrics
        self.local_hostname = local_hostname
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self._slots: dict[UpstreamKey, _Slot] = {}
        self._tls_contexts: dict[tuple[bool, Path | None], ssl.SSLContext] = {}
        self._open = 0
        self._reaper: asyncio.Task[None] | None = None
        self._idle_gauge = metrics.upstream_connections.labels(state="idle")
        self._busy_gauge = metrics.upstream_connections.labels(state="busy")

    def configure(self, *, connect_timeout: float, timeout: float, idle_timeout: float) -> None:
        """Take a reloaded config's timeouts; open connections keep working. CA files are read anew (a
        rotated caFile keeps its path), so TLS contexts are rebuilt for new connections."""
        self.connect_timeout, self.timeout, self.idle_timeout = connect_timeout, timeout, idle_timeout
        self._tls_contexts.clear()

    @contextlib.asynccontextmanager
    async def session(self, route: Route, *, fresh: bool = False) -> AsyncIterator[UpstreamConnection]:
        """An authenticated connection for `route`, returned to the pool afterwards unless it broke."""
        key = route_key(route)
        capacity = route.max_connections.value
        slot = self._slots.get(key)
        if slot is None or slot.capacity != capacity:
            # New, or maxConnections changed on reload: a fresh slot takes over the idle sessions; tasks
            # still holding the old one's permits release them there, so the counts stay right.
            idle, slot = (slot.idle if slot else []), _Slot(capacity, asyncio.Semaphore(capacity))
            slot.idle, self._slots[key] = idle, slot
        self._start_reaper()
        slot.users += 1
        try:
            try:
                if slot.limit.locked():  # wait_for costs a task and a timer: only when we must wait
                    await asyncio.wait_for(slot.limit.acquire(), self.timeout)
                else:
                    await slot.limit.acquire()
            except TimeoutError:
                raise UpstreamUnavailable(
                    f"all {route.max_connections.value} connections to {key} "
                    f"stayed busy for {self.timeout:g}s"
                ) from None
            try:
                conn = await self._take_idle(slot, fresh=fresh) or await self._connect(key, route)
                self._gauge()
                try:
                    yield conn
                except BaseException:
                    conn.broken = True
                    raise
                finally:
                    if conn.broken or not conn.is_connected:
                        await self._close(conn)
                    else:
                        conn.last_used = time.monotonic()
                        # To the key's current slot: this one may have been replaced meanwhile.
                        self._slots.setdefault(key, slot).idle.append(conn)
                    self._gauge()
            finally:
                slot.limit.release()
        finally:
            slot.users -= 1

    async def _take_idle(self, slot: _Slot, *, fresh: bool) -> UpstreamConnection | None:
        now = time.monotonic()
        while slot.idle:
            conn = slot.idle.pop()  # the most recently used is the least likely to have been dropped
            if not fresh and conn.is_connected and now - conn.last_used < self.idle_timeout:
                conn.reused = True
                conn.timeout = self.timeout  # a reload may have changed it since the session opened
                return conn
            await self._close(conn)
        return None

    def _tls_context(self, tls: TlsSettings) -> ssl.SSLContext:
        cache_key = (tls.verify, tls.ca_file)
        context = self._tls_contexts.get(cache_key)
        if context is None:
            try:
                context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            except (OSError, ssl.SSLError) as error:
                raise RouteMisconfigured(f"tls.caFile {tls.ca_file} cannot be used: {error}") from None
            if not tls.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            self._tls_contexts[cache_key] = context
        return context

    async def _connect(self, key: UpstreamKey, route: Route) -> UpstreamConnection:
        tls = route.tls.value
        context = None if tls.mode is TlsMode.NONE else self._tls_context(tls)
        smtp = aiosmtplib.SMTP(
            hostname=key.host,
            port=key.port,
            local_hostname=self.local_hostname,
            timeout=self.timeout,
            use_tls=tls.mode is TlsMode.IMPLICIT,
            start_tls=False,
            tls_context=context,
        )
        self._open += 1
        conn = UpstreamConnection(key=key, smtp=smtp, timeout=self.timeout)
        try:
            await self._handshake(conn, route, context)
        except BaseException:
            await self._close(conn)
            raise
        conn.take_over()
        return conn

    async def _handshake(
        self, conn: UpstreamConnection, route: Route, context: ssl.SSLContext | None
    ) -> None:
        smtp, key, mode = conn.smtp, conn.key, route.tls.value.mode
        try:
            await smtp.connect(timeout=self.connect_timeout)
            await smtp.ehlo()
            if mode is TlsMode.STARTTLS:
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
        if route.type is not None:
            await self._authenticate(conn, route)

    async def _authenticate(self, conn: UpstreamConnection, route: Route) -> None:
        assert route.type is not None
        mechanism = route.type.value
        where = f"upstream {conn.key} (AUTH {mechanism} as set by {route.type.source})"
        if route.user is None or route.password is None:
            missing = "user" if route.user is None else "password"
            raise RouteMisconfigured(
                f"AUTH {mechanism} from {route.type.source} needs a {missing}, and no scope gives one"
            )
        smtp = conn.smtp
        if mechanism.lower() not in smtp.server_auth_methods:
            self.metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.ERROR).inc()
            offered = " ".join(smtp.server_auth_methods).upper() or "no AUTH at all"
            raise UpstreamAuthFailed(f"{where} does not offer it; it offers {offered}")
        if route.tls.value.mode is TlsMode.NONE:
            self.metrics.plaintext_auth.inc()
            log.warning("sending AUTH %s to %s without TLS, as tls.mode: none says", mechanism, conn.key)
        user, secret = route.user.value, route.password.value.get_secret_value()
        try:
            if mechanism is AuthType.PLAIN:
                await smtp.auth_plain(user, secret)
            elif mechanism is AuthType.LOGIN:
                await smtp.auth_login(user, secret)
            else:
                await smtp.auth_xoauth2(user, secret)
        except aiosmtplib.SMTPAuthenticationError as error:
            self.metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.FAILURE).inc()
            raise UpstreamAuthFailed(
                f"authentication to {where} failed: {error.code} {_one_line(error.message)}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as error:
            self.metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.ERROR).inc()
            raise UpstreamUnavailable(f"AUTH with {where} did not complete: {_reason(error)}") from None
        self.metrics.auth_attempts.labels(mechanism=mechanism, result=AuthResult.SUCCESS).inc()

    async def _close(self, conn: UpstreamConnection) -> None:
        if conn.is_connected and not conn.broken:
            await conn.quit(patience=2)
        conn.smtp.close()
        if not conn.closed:
            conn.closed = True
            self._open -= 1

    def _gauge(self) -> None:
        idle = sum(len(s.idle) for s in self._slots.values())
        self._idle_gauge.set(idle)
        self._busy_gauge.set(self._open - idle)

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="upstream-idle-reaper")

    async def _reap(self) -> None:
        """Close idle connections past the idle timeout, before the upstream drops them on us."""
        while True:
            await asyncio.sleep(max(self.idle_timeout / 2, 0.05))
            deadline = time.monotonic() - self.idle_timeout
            closed = 0
            for key, slot in list(self._slots.items()):
                stale = [c for c in slot.idle if c.last_used <= deadline]
                slot.idle = [c for c in slot.idle if c.last_used > deadline]
                for conn in stale:
                    await self._close(conn)
                closed += len(stale)
                if not slot.idle and slot.users == 0:
                    del self._slots[key]
            self._gauge()
            if closed and self._open == 0:
                release_free_memory()

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for slot in self._slots.values():
            idle, slot.idle = slot.idle, []
            for conn in idle:
                await self._close(conn)
        self._gauge()


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (musl and others have none)."""
    import ctypes  # here: 0.3 MB, and most relays never go idle with an empty pool

    return getattr(ctypes.CDLL(None), "malloc_trim", None)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS. After a burst, the TLS sessions and buffers it held
    are freed but glibc keeps their pages: measured, a drained pool went from 46 to 41 MB RSS with this."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _reason(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timed out"
    text = str(error) or type(error).__name__
    return _one_line(text)
