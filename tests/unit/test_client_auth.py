"""AUTH from the app (`listen.clientAuth`), tried with swaks as an app configured with SMTP credentials
would: `accept` takes any credentials and uses none of them, `binding` makes the AUTH user the binding,
`none` offers no AUTH. The app's password never reaches a log line, at any level."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import pytest

from tests.peers.certs import TLSFiles
from tests.support.relay import catch_all_policy, running_relay, write_config
from tests.support.swaks import swaks
from tests.support.upstream import AuthUpstream

APP_PASSWORD = "app-Pa55word-9f3c"  # what Django's EMAIL_HOST_PASSWORD would hold


def policies(port: int, tls: TLSFiles) -> list[dict[str, Any]]:
    """Everything through `port` as u / p, but binding `billing` as b / pb."""
    billing = {**catch_all_policy(port, tls), "name": "t/billing", "scope": {"binding": "billing"}}
    return [catch_all_policy(port, tls), {**billing, "user": "b", "password": "pb"}]


def relay_config(config_path: Path, port: int, tls: TLSFiles, client_auth: str | None) -> Path:
    listen: dict[str, Any] = {"port": 0}
    if client_auth is not None:
        listen["clientAuth"] = client_auth
    return write_config(config_path, {"listen": listen, "policies": policies(port, tls)})


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_accept_takes_any_credentials_and_never_logs_them(
    tls: TLSFiles, config_path: Path, caplog: pytest.LogCaptureFixture, mechanism: str
) -> None:
    caplog.set_level(logging.DEBUG)  # aiosmtpd's own command log included
    async with (
        AuthUpstream(tls, users={"u": "p", "b": "pb"}) as up,
        running_relay(relay_config(config_path, up.port, tls, None)) as relay,
    ):
        run = await swaks(
            relay.port,
            "--to",
            "a@example.com",
            "--auth",
            mechanism,
            "--auth-user",
            "billing",
            "--auth-password",
            APP_PASSWORD,
        )
    assert run.reply_to("AUTH")[0] in (235, 334), run.transcript
    assert run.exit_code == 0, run.transcript
    # accept: the AUTH user means nothing; the default binding's credentials went upstream.
    assert [r.login for r in up.received] == ["u"]
    plain_blob = base64.b64encode(b"\0billing\0" + APP_PASSWORD.encode()).decode()
    password_b64 = base64.b64encode(APP_PASSWORD.encode()).decode()
    assert caplog.text, "nothing was logged: the scan below would prove nothing"
    for secret in (APP_PASSWORD, password_b64, plain_blob):
        assert secret not in caplog.text
    assert "login_data is deprecated" not in caplog.text


async def test_binding_mode_routes_by_the_auth_user(tls: TLSFiles, config_path: Path) -> None:
    async with (
        AuthUpstream(tls, users={"u": "p", "b": "pb"}) as up,
        running_relay(relay_config(config_path, up.port, tls, "binding")) as relay,
    ):
        as_billing = await swaks(
            relay.port, "--to", "a@example.com", "-a", "PLAIN", "-au", "billing", "-ap", "x"
        )
        as_other = await swaks(relay.port, "--to", "a@example.com", "-a", "LOGIN", "-au", "shop", "-ap", "x")
        header_wins = await swaks(
            relay.port,
            "--to",
            "a@example.com",
            "-a",
            "PLAIN",
            "-au",
            "shop",
            "-ap",
            "x",
            "--header",
            "X-Binding: billing",
        )
    for run in (as_billing, as_other, header_wins):
        assert run.exit_code == 0, run.transcript
    assert [r.login for r in up.received] == ["b", "u", "b"]


async def test_binding_mode_refuses_an_empty_user(tls: TLSFiles, config_path: Path) -> None:
    async with (
        AuthUpstream(tls, users={"u": "p"}) as up,
        running_relay(relay_config(config_path, up.port, tls, "binding")) as relay,
    ):
        run = await swaks(relay.port, "--to", "a@example.com", "-a", "PLAIN", "-au", "", "-ap", "x")
    code, text = run.reply_to("AUTH")
    assert code == 535, run.transcript
    assert "names the binding" in text


async def test_none_offers_no_auth(tls: TLSFiles, config_path: Path) -> None:
    async with (
        AuthUpstream(tls, users={"u": "p"}) as up,
        running_relay(relay_config(config_path, up.port, tls, "none")) as relay,
    ):
        run = await swaks(relay.port, "--to", "a@example.com", "-a", "PLAIN", "-au", "u", "-ap", "x")
    assert "AUTH" not in "".join(text for _, text in run.replies), run.transcript
    assert "Host did not advertise authentication" in run.transcript
    assert up.received == []
