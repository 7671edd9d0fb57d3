"""A fault-injecting SMTP upstream for the relay's tests: a real SMTP server on loopback, written at the
byte level so that it can misbehave in ways no well-made server library allows: 8-bit, NUL, CR and
multi-code replies, slow answers, a dropped connection in the middle of DATA, a cap on recipients, and
STARTTLS advertised then refused. It records the commands and messages it received."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass
class Faults:
    """What the upstream does wrong; by default nothing (plain SMTP, no TLS, no AUTH, PIPELINING)."""

    # The raw reply lines (without CRLF) to a command verb ("MAIL", "RCPT", "DATA" for the 354, "." for
    # the final reply to the message), instead of the normal ones.
    replies: dict[str, list[bytes]] = field(default_factory=dict)
    delays: dict[str, float] = field(default_factory=dict)  # seconds before replying to a verb
    drop_after_data_bytes: int | None = None  # close the connection once this much DATA has arrived
    max_rcpts: int | None = None  # 452 4.5.3 to each RCPT beyond this many in one transaction
    starttls_refused: bool = False  # advertise STARTTLS, then answer it 454
    refuse_rcpts: dict[str, bytes] = field(default_factory=dict)  # address -> reply line
    size: int = 100_000_000  # advertised as SIZE (RFC 1870)
    chunking: bool = False  # advertise CHUNKING and take BDAT (RFC 3030)
    dsn: bool = False  # advertise DSN (RFC 3461); its parameters are only recorded, in `commands`
    close_at_mail: int | None = None  # answer the Nth MAIL of a connection 421 and close (a message cap)
    connections: int | None = None  # greet connections past this many with 554 (no more sessions)
    close_after_ehlo: bool = False  # close each connection right after answering EHLO
    final_delays: dict[int, float] = field(default_factory=dict)  # the Nth final reply (from 1) waits so long


@dataclass(frozen=True)
class Message:
    mail_from: bytes
    rcpt_tos: tuple[bytes, ...]
    data: bytes  # as it came on the wire: after DATA dot-stuffed, without the end mark; after BDAT as is


class FaultyUpstream:
    """`async with FaultyUpstream(Faults(...)) as up:`; `up.port`, `up.messages`, `up.commands`."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults or Faults()
        self.messages: list[Message] = []
        self.commands: list[bytes] = []
        self.connections = 0
        self.finals = 0  # final replies to a message so far, on every connection
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aenter__(self) -> FaultyUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def _reply(self, writer: asyncio.StreamWriter, verb: str, normal: list[bytes]) -> None:
        if delay := self.faults.delays.get(verb):
            await asyncio.sleep(delay)
        lines = self.faults.replies.get(verb, normal)
        writer.write(b"".join(line + b"\r\n" for line in lines))
        await writer.drain()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            async with _closing(writer):
                await self._session(reader, writer)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        faults = self.faults
        if faults.connections is not None and self.connections > faults.connections:
            await self._reply(writer, "greeting", [b"554 5.3.2 No more sessions for you"])
            return
        await self._reply(writer, "greeting", [b"220 faulty.test ESMTP"])
        mail_from: bytes | None = None
        rcpts: list[bytes] = []
        mails = 0
        while line := await reader.readline():
            self.commands.append(line)
            verb = line[:4].upper().rstrip(b"\r\n").decode("ascii", "replace")
            arg = line.rstrip(b"\r\n")[5:]
            if verb in ("EHLO", "HELO"):
                ehlo = [b"250-faulty.test", b"250-PIPELINING", b"250-8BITMIME", b"250-SIZE %d" % faults.size]
                if faults.starttls_refused:
                    ehlo.append(b"250-STARTTLS")
                if faults.chunking:
                    ehlo.append(b"250-CHUNKING")
                if faults.dsn:
                    ehlo.append(b"250-DSN")
                await self._reply(writer, "EHLO", [*ehlo, b"250 SMTPUTF8"])
                if faults.close_after_ehlo:
                    return
            elif verb == "STAR":
                await self._reply(writer, "STARTTLS", [b"454 4.7.0 TLS not available due to local problem"])
            elif verb == "MAIL" and faults.close_at_mail == (mails := mails + 1):
                await self._reply(writer, "MAIL", [b"421 4.7.0 Too many messages on this connection"])
                return
            elif verb == "MAIL":
                mail_from, rcpts = arg.partition(b":")[2].split(b" ")[0], []
                await self._reply(writer, "MAIL", [b"250 2.1.0 Ok"])
            elif verb == "RCPT":
                address = arg.partition(b":")[2].split(b" ")[0].strip(b"<>")
                # The cap first, as Postfix checks smtpd_recipient_limit before its restrictions.
                if faults.max_rcpts is not None and len(rcpts) >= faults.max_rcpts:
                    await self._reply(writer, "RCPT", [b"452 4.5.3 Too many recipients"])
                elif (forced := faults.refuse_rcpts.get(address.decode("utf-8", "replace"))) is not None:
                    await self._reply(writer, "RCPT", [forced])
                else:
                    rcpts.append(address)
                    await self._reply(writer, "RCPT", [b"250 2.1.5 Ok"])
            elif verb == "DATA":
                if not rcpts:
                    await self._reply(writer, "DATA", [b"554 5.5.1 No valid recipients"])
                    continue
                await self._reply(writer, "DATA", [b"354 End data with <CR><LF>.<CR><LF>"])
                data = await self._data(reader)
                if data is None:
                    return  # dropped mid-DATA
                self.messages.append(Message(mail_from or b"", tuple(rcpts), data))
                self.finals += 1
                await asyncio.sleep(faults.final_delays.get(self.finals, 0))
                await self._reply(writer, ".", [b"250 2.0.0 Ok: queued"])
                mail_from, rcpts = None, []
            elif verb == "BDAT" and faults.chunking:
                size, _, last = arg.partition(b" ")
                chunk = await reader.readexactly(int(size))
                if last.upper() != b"LAST" or not rcpts:
                    await self._reply(writer, ".", [b"554 5.5.1 Only one BDAT LAST chunk, after a RCPT"])
                    continue
                self.messages.append(Message(mail_from or b"", tuple(rcpts), chunk))
                await self._reply(writer, ".", [b"250 2.0.0 Ok: queued"])
                mail_from, rcpts = None, []
            elif verb == "RSET":
                mail_from, rcpts = None, []
                await self._reply(writer, "RSET", [b"250 2.0.0 Ok"])
            elif verb == "QUIT":
                await self._reply(writer, "QUIT", [b"221 2.0.0 Bye"])
                return
            else:
                await self._reply(writer, verb, [b"502 5.5.2 Command not recognized"])

    async def _data(self, reader: asyncio.StreamReader) -> bytes | None:
        lines: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            if line == b".\r\n":
                return b"".join(lines)
            lines.append(line)
            size += len(line)
            limit = self.faults.drop_after_data_bytes
            if limit is not None and size >= limit:
                return None


@contextlib.asynccontextmanager
async def _closing(writer: asyncio.StreamWriter) -> AsyncIterator[None]:
    try:
        yield
    finally:
        writer.close()


def plain_policy(port: int, **extra: object) -> dict[str, object]:
    """A catch-all policy for a FaultyUpstream: no TLS, no AUTH."""
    return {
        "name": "t/faulty",
        "gateway": {"host": "127.0.0.1", "port": port},
        "tls": {"mode": "none"},
        **extra,
    }


def content_dependent_policies(port: int) -> list[dict[str, object]]:
    """A catch-all policy for a FaultyUpstream and a binding's own credentials: the route of every
    recipient waits for the binding header, so the relay answers RCPT itself and sends at DATA."""
    return [
        plain_policy(port),
        {"name": "t/bulk", "scope": {"binding": "bulk"}, "type": "PLAIN", "user": "bulk", "password": "pw"},
    ]
