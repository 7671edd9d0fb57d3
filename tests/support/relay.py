"""Run the real RelayServer in the test's loop, from a relay.yaml written to disk, and talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import yaml

from outbound_relay.generation import Generation
from outbound_relay.server import RelayServer
from tests.peers.certs import TLSFiles


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """relay.yaml with the test defaults: any free listen port, metrics on a free loopback port."""
    data = {"listen": {"port": 0}, "metrics": {"host": "127.0.0.1", "port": 0}, **config}
    path.write_text(yaml.safe_dump(data))
    return path


def catch_all_policy(port: int, tls: TLSFiles) -> dict[str, Any]:
    """One policy for every recipient: AUTH PLAIN as u / p (an `AuthUpstream(tls, users={"u": "p"})`)
    to 127.0.0.1:port, trusting `tls`'s CA."""
    return {
        "name": "t/all",
        "type": "PLAIN",
        "user": "u",
        "password": "p",
        "gateway": {"host": "127.0.0.1", "port": port},
        "tls": {"caFile": str(tls.ca_file)},
    }


@contextlib.asynccontextmanager
async def running_relay(path: Path, *, reload_interval: float = 0.05) -> AsyncIterator[RelayServer]:
    server = RelayServer(Generation.load(path), config_path=path, reload_interval=reload_interval)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_seconds=5)


# The relay's message id at the end of its reply to DATA (outbound_relay.outcomes.with_id).
_RELAY_ID = re.compile(r" ?\(relay id ([0-9A-F]{12})\)\Z")


@dataclass(frozen=True)
class Outcome:
    rcpt_replies: dict[str, tuple[int, str]]
    data_reply: tuple[int, str] | None  # None when no recipient was accepted; without the relay id
    relay_id: str | None = None  # the message id the relay gave in its reply to DATA

    @property
    def reply(self) -> tuple[int, str]:
        """The transaction's verdict: the reply to DATA or, when no recipient was accepted, the first
        refusal of a RCPT (where the relay answers for the upstream in pass-through mode)."""
        if self.data_reply is not None:
            return self.data_reply
        return next(iter(self.rcpt_replies.values()), (0, ""))

    @property
    def code(self) -> int:
        return self.reply[0]


def message(
    subject: str = "hello", headers: dict[str, str] | None = None, body: str = "Hi there.\r\n"
) -> bytes:
    lines = [
        "From: app@example.org",
        f"Subject: {subject}",
        *(f"{k}: {v}" for k, v in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode()


async def submit(port: int, rcpts: list[str], content: bytes, mail_from: str = "app@example.org") -> Outcome:
    """One transaction, as an app would send it, keeping every reply."""
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, start_tls=False, local_hostname="app"
    ) as smtp:
        if mail_from:
            await smtp.mail(mail_from)
        else:  # the null reverse-path of a bounce, which aiosmtplib's mail() refuses to write
            await smtp.ehlo()
            await smtp.execute_command(b"MAIL", b"FROM:<>")
        replies: dict[str, tuple[int, str]] = {}
        for rcpt in rcpts:
            response = await smtp.execute_command(b"RCPT", b"TO:<" + rcpt.encode() + b">")
            replies[rcpt] = (response.code, response.message)
        if not any(code == 250 for code, _ in replies.values()):
            await smtp.rset()
            return Outcome(replies, None)
        try:
            response = await smtp.data(content)
            code, text = response.code, response.message
        except aiosmtplib.SMTPDataError as error:
            code, text = error.code, error.message
        found = _RELAY_ID.search(text)
        if found is None:
            return Outcome(replies, (code, text))
        return Outcome(replies, (code, text[: found.start()]), found[1])


async def raw_session(port: int, commands: bytes) -> list[bytes]:
    """Write `commands` and QUIT as they are, byte for byte (aiosmtplib would fix line ends), and return
    every reply line that came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(commands + b"QUIT\r\n")
    replies = (await asyncio.wait_for(reader.read(), 60)).split(b"\r\n")
    writer.close()
    await writer.wait_closed()
    return [line for line in replies if line]


def as_data(content: bytes) -> bytes:
    """`content` as an SMTP client sends it after DATA: each CRLF line starting with "." gets another,
    then the end mark; bare CRs and LFs are left in place, as a careless or hostile app sends them."""
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    lines = content[:-2].split(b"\r\n")
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines) + b".\r\n"
