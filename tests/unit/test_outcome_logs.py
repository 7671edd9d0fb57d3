"""One log line per message outcome (docs/metrics.md, "Logs"): each kind of outcome gives exactly one
line, with the fields an operator needs and the id the app got in its reply to DATA, and never a
password, a token or, unless asked, a full address."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from outbound_relay.outcomes import FIELDS, JsonFormatter
from tests.peers.certs import TLSFiles
from tests.support.relay import Outcome, message, running_relay, submit, write_config
from tests.support.upstream import AuthUpstream

SECRET = "log-test-password-4711"
OK, GONE = "alice.ok@accepting.example", "bob.gone@refusing.example"


def _policies(port: int, tls: TLSFiles) -> list[dict[str, Any]]:
    return [
        {"name": "t/all", "type": "PLAIN", "user": "u", "password": SECRET,
         "gateway": {"host": "127.0.0.1", "port": port}, "tls": {"caFile": str(tls.ca_file)}},
    ]  # fmt: skip


def _lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The outcome lines, as `--log-format json` writes them."""
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if hasattr(r, FIELDS)]


async def _run(
    tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture, rcpts: list[str], **up: Any
) -> tuple[Outcome, list[dict[str, Any]]]:
    async with AuthUpstream(tls, users={"u": SECRET}) as upstream:
        upstream.state.rcpt_replies[GONE] = "550 5.1.1 No such user"
        upstream.state.data_reply = up.get("data_reply")
        write_config(config_path, {"policies": _policies(upstream.port, tls)})
        with caplog.at_level(logging.INFO):
            async with running_relay(config_path) as relay:
                outcome = await submit(relay.port, rcpts, message(), mail_from="app@sender.example")
    everything = "\n".join(JsonFormatter().format(r) + logging.Formatter().format(r) for r in caplog.records)
    assert SECRET not in everything
    # The relay's own lines (aiosmtpd's "mail.log" logs commands, and `serve` keeps it at WARNING).
    ours = "\n".join(JsonFormatter().format(r) for r in caplog.records if r.name.startswith("outbound_relay"))
    assert "alice.ok" not in ours and "bob.gone" not in ours and "app@" not in ours
    return outcome, _lines(caplog)


def _common(line: dict[str, Any]) -> None:
    assert line["event"] == "message"
    assert line["from_domain"] == "sender.example"
    assert line["policy"] == "t/all" and line["scope"] == "global"
    assert line["upstream"].startswith("127.0.0.1:")
    assert line["attempt"] == 1
    assert line["mode"] == "pass-through"
    for key in ("id", "outcome", "rcpt_domains", "code", "status", "size", "latency_ms", "level", "time"):
        assert key in line, key


async def test_delivered(tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outcome, lines = await _run(tls, config_path, caplog, [OK])
    [line] = lines
    _common(line)
    assert (line["outcome"], line["code"], line["status"]) == ("delivered", 250, "2.0.0")
    assert line["id"] == outcome.relay_id
    assert line["rcpt_domains"] == ["accepting.example"]
    assert line["size"] > 0 and line["latency_ms"] >= 0
    assert "refused" not in line


async def test_deferred(tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outcome, lines = await _run(tls, config_path, caplog, [OK], data_reply="451 4.3.0 Try again later")
    [line] = lines
    _common(line)
    assert (line["outcome"], line["code"], line["status"]) == ("deferred", 451, "4.3.0")
    assert line["id"] == outcome.relay_id
    assert "refused" not in line  # its one recipient shares the message's outcome


async def test_refused(tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The only recipient is refused at RCPT: there is no DATA, and the line comes when the app resets.
    outcome, lines = await _run(tls, config_path, caplog, [GONE])
    assert outcome.data_reply is None
    [line] = lines
    _common(line)
    assert (line["outcome"], line["code"], line["status"]) == ("refused", 550, "5.1.1")
    assert line["size"] is None


async def test_partially_refused(tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    outcome, lines = await _run(tls, config_path, caplog, [OK, GONE])
    [line] = lines
    _common(line)
    assert (line["outcome"], line["code"]) == ("partially_refused", 250)
    assert line["id"] == outcome.relay_id
    assert line["recipients"] == 2
    assert line["refused"] == [{"n": 2, "domain": "refusing.example", "code": 550, "status": "5.1.1"}]


async def test_addresses_only_when_asked(
    tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with AuthUpstream(tls, users={"u": SECRET}) as upstream:
        write_config(config_path, {"policies": _policies(upstream.port, tls)})
        with caplog.at_level(logging.INFO):
            async with running_relay(config_path) as relay:
                relay.handler.log_addresses = True
                await submit(relay.port, [OK], message(), mail_from="app@sender.example")
    [line] = _lines(caplog)
    assert (line["from"], line["rcpts"]) == ("app@sender.example", [OK])
    assert SECRET not in json.dumps(line)


async def test_a_recipient_without_a_domain_is_never_logged_whole(
    tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """What an app gives as a recipient may be anything (a token pasted in the wrong field): without an @,
    the line has no domain to show, so it shows "-"."""
    outcome, [line] = await _run(tls, config_path, caplog, ["Tok3n-pasted-by-mistake", OK])
    assert outcome.rcpt_replies["Tok3n-pasted-by-mistake"][0] == 553
    assert line["rcpt_domains"] == ["-", "accepting.example"]
    assert "Tok3n" not in json.dumps(line)
