"""No password or token in any log line (debug included), metric, reply or CLI output."""

from __future__ import annotations

import asyncio
import base64
import socket
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from outbound_relay.cli import main
from outbound_relay.redaction import SecretRedactor
from tests.peers.certs import TLSFiles
from tests.support.relay import message, submit, write_config
from tests.support.upstream import AuthUpstream

SECRETS = {
    "sparkpost": "Sp4rk-secret-pw",
    "msys": "Msys-secret-pw",
    "bird": "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA",
}
ROTATED = "Rotated-secret-pw"


def forms(secret: str, user: str) -> list[str]:
    """The secret and the encodings AUTH puts it in."""

    def b64(raw: str) -> str:
        return base64.b64encode(raw.encode()).decode()

    return [
        secret,
        b64(secret),
        b64(f"\0{user}\0{secret}"),
        b64(f"user={user}\x01auth=Bearer {secret}\x01\x01"),
    ]


def leaked(text: str) -> list[str]:
    users = {"sparkpost": "sparkpost", "msys": "msys", "bird": "bird@example.com"}
    found = [s for key, s in SECRETS.items() for s in forms(s, users[key]) if s in text]
    return found + [s for s in forms(ROTATED, "sparkpost") if s in text]


def config(port: int, tls: TLSFiles, sparkpost_password: str) -> dict[str, object]:
    common = {"gateway": {"host": "127.0.0.1", "port": port}, "tls": {"caFile": str(tls.ca_file)}}
    return {
        "policies": [
            {"name": "s/sparkpost", "scope": {"domain": "sparkpost.com"}, "type": "PLAIN",
             "user": "sparkpost", "password": sparkpost_password, **common},
            {"name": "s/msys", "scope": {"domain": "messagesystems.com"}, "type": "LOGIN", "user": "msys",
             "password": SECRETS["msys"], **common},
            {"name": "s/bird", "scope": {"domain": "bird.com"}, "type": "XOAUTH2", "user": "bird@example.com",
             "password": SECRETS["bird"], **common},
        ]
    }  # fmt: skip


async def test_no_secret_in_logs_metrics_or_replies(tls: TLSFiles, config_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port, metrics_port = s.getsockname()[1], None
    async with AuthUpstream(
        tls, users={"sparkpost": SECRETS["sparkpost"], "msys": "not-what-we-send"}, tokens={}
    ) as up:
        data = write_config(config_path, config(up.port, tls, SECRETS["sparkpost"]))
        raw = yaml.safe_load(data.read_text())
        raw["listen"]["port"] = port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_port = s.getsockname()[1]
        raw["metrics"]["port"] = metrics_port
        config_path.write_text(yaml.safe_dump(raw))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "outbound_relay.cli", "serve", "--config", str(config_path),
            "--log-level", "debug", "--reload-interval", "0.05", stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        replies = []
        try:
            async with asyncio.timeout(20):
                while True:
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", port)
                        writer.close()
                        break
                    except OSError:
                        await asyncio.sleep(0.05)
            for rcpt in ("a@sparkpost.com", "b@messagesystems.com", "c@bird.com"):
                replies.append(await submit(port, [rcpt], message()))
            # Rotate a password, then make the upstream refuse it: both paths log.
            config_path.write_text(yaml.safe_dump({**raw, **config(up.port, tls, ROTATED)}))
            await asyncio.sleep(0.5)
            replies.append(await submit(port, ["d@sparkpost.com"], message()))
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        finally:
            proc.terminate()
            _, err = await proc.communicate()
    log = err.decode()
    assert [r.code for r in replies] == [250, 454, 454, 454], log
    assert "config reloaded" in log
    assert "authentication to upstream" in log  # the failures were logged, so there was something to leak
    assert leaked(log) == []
    assert leaked(metrics) == []
    assert leaked(repr(replies)) == []


def test_no_secret_in_cli_output(
    tls: TLSFiles, config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(config_path, config(2525, tls, SECRETS["sparkpost"]))
    for rcpt in ("a@sparkpost.com", "b@messagesystems.com", "c@bird.com"):
        assert main(["explain", "--config", str(config_path), "--rcpt", rcpt]) == 0
    assert main(["check", "--config", str(config_path)]) == 0
    config_path.write_text(config_path.read_text().replace("type: PLAIN", "type: NOPE"))
    assert main(["check", "--config", str(config_path)]) == 2
    out = capsys.readouterr()
    assert "***" in out.out
    assert leaked(out.out + out.err) == []


def test_redactor_scrubs_a_secret_that_a_log_call_would_leak() -> None:
    import logging

    redactor = SecretRedactor()
    redactor.set_secrets(["Sp4rk-secret-pw", "ab"])
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "sent %s to %s", ("Sp4rk-secret-pw", "ab"), None
    )
    assert redactor.filter(record)
    assert record.getMessage() == "sent *** to ab"  # two-letter values would blank ordinary words


def test_a_secret_in_an_exception_is_redacted_in_both_log_formats() -> None:
    """The sidecar logs JSON: a traceback there must be the redacted one, as in text."""
    import logging
    import sys

    from outbound_relay.outcomes import JsonFormatter

    redactor = SecretRedactor()
    redactor.set_secrets(["Sp4rk-secret-pw"])
    try:
        raise ValueError("token Sp4rk-secret-pw rejected")
    except ValueError:
        exc_info = sys.exc_info()
    for formatter in (JsonFormatter(), logging.Formatter()):
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), exc_info)
        record.stack_info = "Stack (most recent call last):\n  uses Sp4rk-secret-pw"
        assert redactor.filter(record)
        line = formatter.format(record)
        assert "rejected" in line and "Sp4rk-secret-pw" not in line, line


def test_redactor_keeps_config_secrets_and_tokens_apart() -> None:
    """Tokens come and go as they are renewed; config secrets stay until the next config."""
    redactor = SecretRedactor()
    redactor.set_secrets(["client-secret-value"])
    redactor.set_secrets(["access-token-1"], kind="oauth2")
    assert redactor.redact("client-secret-value access-token-1") == "*** ***"
    redactor.set_secrets(["access-token-2"], kind="oauth2")
    assert redactor.redact("client-secret-value access-token-1 access-token-2") == "*** access-token-1 ***"
