"""The running relay: the loopback SMTP listener, the upstream pool, the metrics endpoint, hot reload
and graceful shutdown."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session, syntax
from prometheus_client import start_http_server

from outbound_relay.config import ClientAuth, ConfigError, ListenConfig, fingerprint
from outbound_relay.delivery import RelayHandler
from outbound_relay.dsn_params import MAIL_LINE_EXTRA, RCPT_LINE_EXTRA, is_dsn_param
from outbound_relay.generation import NO_OVERRIDES, Generation, Overrides
from outbound_relay.health import with_health
from outbound_relay.metrics import RelayMetrics
from outbound_relay.oauth2 import TokenProvider
from outbound_relay.pool import UpstreamPool
from outbound_relay.redaction import SecretRedactor
from outbound_relay.scopes import OAuth2Source
from outbound_relay.session import DOT_ATOM_ADDRESS

log = logging.getLogger(__name__)

# `<local@domain>` of dot-atoms, then nothing or parameters after white space (no comment: "(" would
# start one, which the full parser skips).
_SIMPLE_PATH = re.compile(rf"<({DOT_ATOM_ADDRESS})>(?:[ \t]+([^(\\\"]*))?\Z")


class _QuietLoginData(logging.Filter):
    """aiosmtpd warns "Session.login_data is deprecated" on every successful AUTH, from its own code:
    noise in the sidecar's log for each message of an app that authenticates."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Session.login_data is deprecated")


logging.getLogger("mail.log").addFilter(_QuietLoginData())


def client_authenticator(mode: ClientAuth) -> Callable[[SMTP, Session, Envelope, str, Any], AuthResult]:
    """The listener's AUTH check. Any credentials are accepted: the listener is on loopback, where any
    process of the Pod can already send without them, so a password would guard nothing; it is never
    kept, forwarded or logged. In `binding` mode the session keeps the user as the message's binding
    (delivery.RelayHandler reads a `str` auth_data as that)."""

    def authenticate(
        server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if mode is not ClientAuth.BINDING:
            return AuthResult(success=True, auth_data=None)
        assert isinstance(auth_data, LoginPassword)
        user = auth_data.login.decode("utf-8", "replace").strip()
        if not user:
            return AuthResult(
                success=False,
                handled=False,
                message="535 5.7.8 listen.clientAuth is binding: the AUTH user names the binding, "
                "and must not be empty",
            )
        return AuthResult(success=True, auth_data=user)

    return authenticate


def listener_tls_context(listen: ListenConfig) -> ssl.SSLContext | None:
    """The STARTTLS context of `listen.tls`, read once at start."""
    if listen.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(listen.tls.cert_file, listen.tls.key_file)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"listen.tls: certificate {listen.tls.cert_file} with key {listen.tls.key_file} "
            f"cannot be used: {error}"
        ) from None
    return context


class RelayServer:
    def __init__(
        self,
        generation: Generation,
        *,
        config_path: Path | None = None,
        reload_interval: float = 1.0,
        redactor: SecretRedactor | None = None,
        overrides: Overrides = NO_OVERRIDES,
    ) -> None:
        self.metrics = RelayMetrics()
        self.config_path = config_path
        self.reload_interval = reload_interval
        self.redactor = redactor
        self.overrides = overrides
        upstream = generation.config.upstream
        self.tokens = TokenProvider(
            self.metrics,
            timeout=upstream.timeout_seconds,
            on_secrets=None if redactor is None else lambda found: redactor.set_secrets(found, kind="oauth2"),
        )
        self.pool = UpstreamPool(
            self.metrics,
            tokens=self.tokens,
            local_hostname=socket.gethostname(),  # not getfqdn(): that may wait on DNS for every connection
            connect_timeout=upstream.connect_timeout_seconds,
            timeout=upstream.timeout_seconds,
            idle_timeout=upstream.idle_timeout_seconds,
            data_timeout=upstream.data_timeout_seconds,
        )
        self.handler = RelayHandler(generation, self.pool, self.metrics)
        self._apply(generation)
        self._smtp_server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()
        self._metrics_server: Any = None
        self._reloader: asyncio.Task[None] | None = None
        self._rejected: str | None = None  # why the newest file was refused, while it is
        # The listener's settings are read once: they change only on restart (see reload).
        listen = generation.config.listen
        self._tls_context = listener_tls_context(listen)
        self._client_auth = listen.client_auth
        self._authenticator = client_authenticator(listen.client_auth)

    @property
    def generation(self) -> Generation:
        return self.handler.generation

    @property
    def port(self) -> int:
        assert self._smtp_server is not None
        port: int = self._smtp_server.sockets[0].getsockname()[1]
        return port

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else int(self._metrics_server.server_port)

    def _apply(self, generation: Generation) -> None:
        self.handler.generation = generation
        upstream = generation.config.upstream
        self.pool.configure(
            connect_timeout=upstream.connect_timeout_seconds,
            timeout=upstream.timeout_seconds,
            idle_timeout=upstream.idle_timeout_seconds,
            data_timeout=upstream.data_timeout_seconds,
        )
        self.metrics.set_generation(generation.short_digest, generation.config.revision)
        self.tokens.timeout = upstream.timeout_seconds
        policies = generation.config.policies
        self.tokens.retain(OAuth2Source(p.name, p.oauth2) for p in policies if p.oauth2 is not None)
        if self.redactor is not None:
            self.redactor.set_secrets(
                [p.password.get_secret_value() for p in policies if p.password is not None]
                + [secret for p in policies if p.oauth2 is not None for secret in p.oauth2.secrets()]
            )

    def _new_session(self) -> asyncio.Protocol:
        limits = self.generation.config.limits
        if len(self._sessions) >= limits.sessions:
            return _Busy(limits.sessions)
        session = (_NoAuthSMTP if self._client_auth is ClientAuth.NONE else _TrackedSMTP)(
            self.handler,
            hostname=socket.gethostname(),
            ident="outbound-relay",
            decode_data=False,
            data_size_limit=limits.message_size_bytes,
            enable_SMTPUTF8=True,
            close_on=self._sessions,
            tls_context=self._tls_context,
            require_starttls=False,
            **(
                # No mechanism left, and no AUTH line before TLS (nor after it: _NoAuthSMTP).
                {"auth_require_tls": True, "auth_exclude_mechanism": ["LOGIN", "PLAIN"]}
                if self._client_auth is ClientAuth.NONE
                else {"authenticator": self._authenticator, "auth_require_tls": False}
            ),
        )
        self._sessions.add(session)
        return session

    async def start(self) -> None:
        config = self.generation.config
        loop = asyncio.get_running_loop()
        self._smtp_server = await loop.create_server(
            self._new_session, config.listen.host, config.listen.port
        )
        if config.metrics.enabled:
            server, _thread = start_http_server(
                config.metrics.port, addr=config.metrics.host, registry=self.metrics.registry
            )
            metrics_app = server.get_app()
            assert metrics_app is not None
            server.set_app(with_health(metrics_app, self.health))
            self._metrics_server = server
        if self.config_path is not None:
            self._reloader = loop.create_task(self._watch(), name="config-reloader")
        log.info(
            "relay listening on %s:%d with %d policies (config %s), metrics on %s:%s",
            config.listen.host,
            self.port,
            len(config.policies),
            self.generation.short_digest,
            config.metrics.host,
            self.metrics_port,
        )

    def health(self) -> str | None:
        """None while the relay can work; else why not (/healthz, from the metrics server's thread)."""
        hooks = self.generation.hooks
        return None if hooks is None else hooks.health()

    async def _watch(self) -> None:
        """Poll the config and password files: cheap for a few small files, and it sees the kubelet's
        atomic `..data` symlink swap, which inotify on the file itself would miss."""
        assert self.config_path is not None
        while True:
            await asyncio.sleep(self.reload_interval)
            # After a refusal, try the file itself again each time: what was wrong may be a file that
            # only the refused config names (a new passwordFile), which the digest below cannot see.
            if self._rejected is None:
                digest = await asyncio.to_thread(fingerprint, self.generation.files)
                if digest == self.generation.digest:
                    continue
            await self.reload()

    async def reload(self) -> bool:
        """Load the config file anew; on any error keep the config in force and count the failure."""
        assert self.config_path is not None
        try:
            generation = await asyncio.to_thread(Generation.load, self.config_path, self.overrides)
        except ConfigError as error:
            if str(error) != self._rejected:  # the same refusal, retried, is logged and counted once
                self._rejected = str(error)
                self.metrics.config_reloads.labels(result="failure").inc()
                log.error(
                    "config reload rejected, keeping config %s: %s", self.generation.short_digest, error
                )
            return False
        self._rejected = None
        old = self.generation.config
        if (old.listen, old.metrics) != (generation.config.listen, generation.config.metrics):
            log.warning("listen and metrics addresses change only on restart; the new ones wait until then")
        self._apply(generation)
        self.metrics.config_reloads.labels(result="success").inc()
        log.info(
            "config reloaded: generation %s, %d policies",
            generation.short_digest,
            len(generation.config.policies),
        )
        return True

    def open_transactions(self) -> int:
        """Sessions between MAIL and the reply to DATA: aiosmtpd gives each a fresh envelope once a
        transaction ends in any way, so the current envelope's sender says whether one is open."""
        return sum(
            1
            for session in self._sessions
            if session.envelope is not None and session.envelope.mail_from is not None
        )

    async def stop(self, grace_seconds: float = 25.0) -> None:
        """Stop accepting, let transactions in flight finish (bounded), then close everything."""
        if self._reloader is not None:
            self._reloader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reloader
        if self._smtp_server is not None:
            self._smtp_server.close()
        self.handler.closing = True
        deadline = asyncio.get_running_loop().time() + grace_seconds
        # Polled: aiosmtpd ends transactions in ways that call no hook of ours (see open_transactions).
        while (still_open := self.open_transactions()) and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if still_open:
            log.warning("%d transaction(s) still open after %gs; closing them", still_open, grace_seconds)
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        if self._smtp_server is not None:
            await self._smtp_server.wait_closed()
        await self.handler.release_all()
        await self.pool.close()
        await self.tokens.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        log.info("relay stopped")


# aiosmtpd's own texts for a line or message too long, as a client should hear them. Postfix folds long
# lines instead; the relay refuses them, since folding a line changes the message a signature covers.
_CLEARER = {
    "500 Line too long (see RFC5321 4.5.3.1.6)": "552 5.6.0 Message has a line over 1000 octets with its "
    "CRLF (RFC 5321 4.5.3.1.6); encode the body (quoted-printable or base64)",
    "552 Error: Too much mail data": "552 5.3.4 Message is over the {limit} octets this relay accepts",
    "552 Error: message size exceeds fixed maximum message size": "552 5.3.4 Message is over the "
    "{limit} octets this relay accepts",
}


class _Busy(asyncio.Protocol):
    """A connection past `limits.sessions`: 421 (RFC 5321 3.8), and closed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(f"421 4.3.2 Too many sessions ({self.limit}); try again later\r\n".encode())
        transport.close()


class _TrackedSMTP(SMTP):
    """An aiosmtpd session that leaves the server's set when its connection ends."""

    def __init__(self, *args: Any, close_on: set[SMTP], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._close_on = close_on
        # aiosmtpd keeps these limits in one dict of its class, which every new session clears and every
        # EHLO grows: each session gets its own, set afresh at each EHLO (smtp_EHLO).
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        # The DSN parameters (dsn_params.py) of the MAIL or RCPT being parsed: aiosmtpd upper-cases the
        # parameters it hands on and refuses any it does not know, so they are lifted out by _getaddr,
        # case kept, and handed to the handler after the others (_call_handler_hook).
        self._dsn_words: list[str] = []

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        self.command_size_limits.clear()
        await super().smtp_EHLO(hostname)
        if self.session is not None and self.session.extended_smtp:
            self.command_size_limits["MAIL"] += MAIL_LINE_EXTRA  # as offered: DSN (RelayHandler.handle_EHLO)
            self.command_size_limits["RCPT"] += RCPT_LINE_EXTRA

    def connection_lost(self, exc: Exception | None) -> None:
        self._close_on.discard(self)
        if self.session is not None and isinstance(self.event_handler, RelayHandler):
            self.event_handler.release_later(self.session)  # its upstream transaction, if one is open
        super().connection_lost(exc)

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        # TLS gives aiosmtpd a new Session (RFC 3207 4.2: the SMTP state starts afresh), so a transaction
        # opened before it, keyed by the old one, would keep its upstream session for good: end it first.
        handler, session = self.event_handler, self.session
        if not arg and self.tls_context and session is not None and isinstance(handler, RelayHandler):
            await handler.release(session)
        await super().smtp_STARTTLS(arg)

    async def push(self, status: Any) -> None:
        """aiosmtpd's replies, with the few that are opaque made clear (RFC 3463 status, what to do)."""
        if isinstance(status, str) and status in _CLEARER:
            status = _CLEARER[status].format(limit=self.data_size_limit)
        await super().push(status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's parser of MAIL FROM / RCPT TO arguments, with a fast path for plain addresses (the
        same result, tests/unit/test_server_addresses.py checks it against aiosmtpd's own)."""
        match = _SIMPLE_PATH.match(arg)
        if match is None or self.local_part_limit:
            address, params = super()._getaddr(arg)
        else:
            address, params = match[1], match[2] or ""
        self._dsn_words = []
        if params and "=" in params and self.session is not None and self.session.extended_smtp:
            words = params.split()
            self._dsn_words = [word for word in words if is_dsn_param(word)]
            if self._dsn_words:
                params = " ".join(word for word in words if not is_dsn_param(word))
        return address, params

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        if command in ("MAIL", "RCPT") and self._dsn_words:
            *head, options = args
            args = (*head, [*options, *self._dsn_words])
            self._dsn_words = []
        return await super()._call_handler_hook(command, *args)


class _NoAuthSMTP(_TrackedSMTP):
    """A session of `listen.clientAuth: none`: with every mechanism excluded, aiosmtpd still writes an
    empty "250-AUTH " line after STARTTLS; it is left out (a subclass, so other sessions pay nothing)."""

    async def push(self, status: AnyStr) -> None:
        if status != "250-AUTH ":
            await super().push(status)
