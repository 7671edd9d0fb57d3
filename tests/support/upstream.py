"""An aiosmtpd upstream in the test's own event loop that requires STARTTLS and AUTH (PLAIN, LOGIN and
XOAUTH2) and records who authenticated and what arrived, so a test can assert what the upstream saw."""

from __future__ import annotations

import asyncio
import base64
import ssl
import warnings
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.peers.certs import TLSFiles


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    mechanism: str | None
    login: str | None


@dataclass
class _State:
    users: dict[str, str]  # PLAIN / LOGIN: user -> password
    tokens: dict[str, str]  # XOAUTH2: user -> bearer token
    received: list[Received] = field(default_factory=list)
    auth_log: list[tuple[str, str, bool]] = field(default_factory=list)  # (mechanism, user, accepted)
    xoauth2: list[bytes] = field(default_factory=list)  # each XOAUTH2 initial response, decoded
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> forced reply
    mail_replies: list[str] = field(default_factory=list)  # forced replies to the next MAILs, in order
    data_reply: str | None = None
    data_delay: float = 0.0
    connections: int = 0


class _Handler:
    def __init__(self, state: _State) -> None:
        self.state = state

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        """RFC-less but documented by Google/Microsoft: base64("user=U\\x01auth=Bearer T\\x01\\x01")."""
        blob = base64.b64decode(args[1]) if len(args) > 1 else await server.challenge_auth("")
        assert isinstance(blob, bytes)
        self.state.xoauth2.append(blob)
        fields = dict(part.split("=", 1) for part in blob.decode().split("\x01") if "=" in part)
        user, auth = fields.get("user", ""), fields.get("auth", "")
        ok = auth == f"Bearer {self.state.tokens.get(user)}" and user in self.state.tokens
        self.state.auth_log.append(("XOAUTH2", user, ok))
        if not ok:
            return AuthResult(success=False, handled=False, message="535 5.7.8 Invalid token")
        return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.state.mail_replies:
            return self.state.mail_replies.pop(0)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        forced = self.state.rcpt_replies.get(address)
        if forced:
            return forced
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.state.data_delay:
            await asyncio.sleep(self.state.data_delay)
        if self.state.data_reply:
            return self.state.data_reply
        auth = session.auth_data
        login = auth.login.decode() if isinstance(auth, LoginPassword) else None
        assert isinstance(envelope.content, bytes)
        self.state.received.append(
            Received(
                envelope.mail_from or "",
                tuple(envelope.rcpt_tos),
                envelope.content,
                self.state.auth_log[-1][0] if session.authenticated and self.state.auth_log else None,
                login,
            )
        )
        return f"250 2.0.0 Ok: queued as {len(self.state.received)}"


class _SMTP(SMTP):
    # RFC 4954 4: AUTH responses to a challenge may be up to 12288 octets (a JWT access token is longer
    # than a 512-octet command line); commands themselves stay limited to 512 (command_size_limit).
    line_length_limit = 12288


class AuthUpstream:
    """Use as `async with AuthUpstream(tls, users={...}) as up:`; `up.port` is its loopback port."""

    def __init__(
        self,
        tls: TLSFiles,
        *,
        users: dict[str, str] | None = None,
        tokens: dict[str, str] | None = None,
        implicit_tls: bool = False,
        require_tls: bool = True,
        require_auth: bool = True,
        offer_starttls: bool = True,
        smtputf8: bool = False,
    ) -> None:
        self.state = _State(users=dict(users or {}), tokens=dict(tokens or {}))
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.require_tls = require_tls
        self.require_auth = require_auth
        self.offer_starttls = offer_starttls
        self.smtputf8 = smtputf8
        self._server: asyncio.Server | None = None
        self._sessions: set[SMTP] = set()

    @property
    def received(self) -> list[Received]:
        return self.state.received

    @property
    def auth_log(self) -> list[tuple[str, str, bool]]:
        return self.state.auth_log

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        user, password = data.login.decode(), data.password.decode()
        ok = self.state.users.get(user) == password
        self.state.auth_log.append((mechanism, user, ok))
        return AuthResult(success=ok, handled=False, auth_data=data)

    def _context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        return context

    def _protocol(self) -> SMTP:
        self.state.connections += 1
        with warnings.catch_warnings():
            # aiosmtpd warns about AUTH without TLS, which is what the tls.mode: none tests need.
            warnings.simplefilter("ignore", UserWarning)
            smtp = self._smtp()
        self._sessions.add(smtp)
        return smtp

    def _smtp(self) -> SMTP:
        return _SMTP(
            _Handler(self.state),
            hostname="upstream.test",
            authenticator=self._authenticate,
            auth_required=self.require_auth,
            enable_SMTPUTF8=self.smtputf8,
            # With implicit TLS the whole socket is TLS, which aiosmtpd does not see: it only tracks STARTTLS.
            auth_require_tls=self.require_tls and not self.implicit_tls,
            require_starttls=self.require_tls and not self.implicit_tls,
            # aiosmtpd offers STARTTLS exactly when it has a context.
            tls_context=self._context() if self.offer_starttls and not self.implicit_tls else None,
        )

    async def __aenter__(self) -> AuthUpstream:
        loop = asyncio.get_running_loop()
        ssl_context = self._context() if self.implicit_tls else None
        self._server = await loop.create_server(self._protocol, "127.0.0.1", 0, ssl=ssl_context)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for smtp in self._sessions:
            if smtp.transport is not None:
                smtp.transport.close()
        await self._server.wait_closed()
        await asyncio.sleep(0)
