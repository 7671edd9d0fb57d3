"""The interop matrix (docs/interop.md): real SMTP clients (tests/interop/senders.py) send into the relay,
which relays to Dovecot submission (STARTTLS + AUTH PLAIN); delivery is counted at Dovecot's sink.

Each sender is tried with the cases an app meets: a plain message with and without AUTH, an 8-bit body,
an SMTPUTF8 address, a 10 MB attachment and 50 recipients, and with the client's pipelining on where it has
a switch. Dovecot 2.3's submission does not offer SMTPUTF8, so a non-ASCII address must get a permanent
`553 5.6.7` that names the reason, never a 4xx the app would retry forever."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.senders import SENDERS, Send
from tests.peers import DovecotSubmission, TLSFiles
from tests.support.relay import running_relay, write_config

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Case:
    name: str
    body: str = "plain"  # plain | 8bit | big
    rcpts: int = 1
    auth: bool = False
    pipelining: bool = False
    utf8: bool = False

    @property
    def delivered(self) -> bool:
        """What the matrix expects: everything arrives but a non-ASCII address (Dovecot lacks SMTPUTF8)."""
        return not self.utf8


CASES = [
    Case("plain"),
    Case("plain-auth", auth=True),
    Case("plain-pipelining", pipelining=True),
    Case("8bit-body", body="8bit", auth=True),
    Case("smtputf8-address", utf8=True, auth=True),
    Case("10mb-attachment", body="big", auth=True),
    Case("50-recipients", rcpts=50, auth=True),
]
# Only where the client can be told to pipeline, or to use SMTPUTF8, does the case mean anything.
NOT_APPLICABLE = {
    ("swaks", "smtputf8-address"): "swaks cannot give MAIL parameters",
    ("python-smtplib", "plain-pipelining"): "smtplib never pipelines",
    ("msmtp", "plain-pipelining"): "msmtp pipelines by itself when offered: the same as plain",
    ("go-net-smtp", "plain-pipelining"): "net/smtp never pipelines",
    ("nodemailer", "plain-pipelining"): "nodemailer has no pipelining switch",
    ("jakarta-mail", "plain-pipelining"): "Jakarta Mail never pipelines",
}


def _message(path: Path, case: Case, to: str) -> Path:
    headers = f"From: app@example.org\r\nTo: {to}\r\nSubject: interop {case.name}\r\nMIME-Version: 1.0\r\n"
    if case.body == "8bit":
        body = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        body += "Grüße aus Köln, 東京 — naïve café.\r\n"
    elif case.body == "big":
        blob = base64.encodebytes(os.urandom(10 * 1024 * 1024 * 3 // 4)).decode().replace("\n", "\r\n")
        body = (
            'Content-Type: multipart/mixed; boundary="b"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n'
            "see attached\r\n--b\r\nContent-Type: application/octet-stream\r\n"
            'Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename="a.bin"\r\n\r\n'
            f"{blob}--b--\r\n"
        )
    else:
        body = "Content-Type: text/plain\r\n\r\nHello from the interop matrix.\r\n"
    path.write_bytes((headers + body).encode())
    return path


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
@pytest.mark.parametrize("sender", list(SENDERS))
async def test_interop(
    sender: str, case: Case, dovecot: DovecotSubmission, ca: TLSFiles, tmp_path: Path
) -> None:
    if (sender, case.name) in NOT_APPLICABLE:
        pytest.skip(NOT_APPLICABLE[sender, case.name])
    send_with, program = SENDERS[sender]
    if shutil.which(program) is None:
        message = f"{program} is not installed (hack/setup installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    tag = uuid.uuid4().hex[:10]
    rcpts = tuple(f"{'ü' if case.utf8 else 'r'}{i}-{tag}@dovecot.test" for i in range(case.rcpts))
    # A 10 MB attachment is about 13.7 MB once base64-encoded: past the relay's default size limit
    # (Postfix's message_size_limit), so the matrix raises it as docs/interop.md tells such apps to.
    config = write_config(
        tmp_path / "relay.yaml",
        {"limits": {"messageSizeBytes": 20 * 1024 * 1024},
         "policies": [{"name": "it/dovecot", "type": "PLAIN", "user": "alice",
                       "password": dovecot.users["alice"],
                       "gateway": {"host": dovecot.host, "port": dovecot.port},
                       "tls": {"caFile": str(ca.ca_file)}}]},
    )  # fmt: skip
    file = _message(tmp_path / "message.eml", case, rcpts[0])
    async with running_relay(config) as relay:
        send = Send(
            relay.port,
            "app@example.org",
            rcpts,
            file,
            user="app" if case.auth else None,
            pipelining=case.pipelining,
            smtputf8=case.utf8,
        )
        result = await asyncio.to_thread(send_with, send)
    if case.delivered:
        assert result.ok, result.output
        arrived = await dovecot.sink.wait_for_async(1, rcpt=rcpts[-1], timeout=30)
        assert set(arrived[0].rcpt_tos) == set(rcpts)
        if case.body != "plain":
            assert arrived[0].content.rstrip().endswith(file.read_bytes().rstrip()[-200:])
    else:
        assert not result.ok, result.output
        assert "553" in result.output and ("5.6.7" in result.output or "SMTPUTF8" in result.output), (
            result.output
        )
        assert not [m for m in dovecot.messages if rcpts[0] in m.rcpt_tos]
