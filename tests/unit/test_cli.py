"""The command line: check, explain, and serve as a process (graceful shutdown on SIGTERM)."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from pathlib import Path

import pytest
import yaml

from outbound_relay.cli import main
from tests.peers.certs import TLSFiles
from tests.support.relay import message, submit, write_config
from tests.support.seed import SEED_CONF
from tests.support.upstream import AuthUpstream

EXPLAIN_CONFIG = {
    "bindingGroups": {"marketing": ["bulk-a"]},
    "policies": [
        {"name": "mail/global", "gateway": {"host": "smtp.example.net", "port": 587}},
        {"name": "mail/sparkpost", "scope": {"domain": "sparkpost.com"}, "type": "PLAIN", "user": "sparkpost",
         "password": "hunter2-sparkpost"},
        {"name": "mail/marketing", "scope": {"bindingGroup": "marketing"}, "user": "bulk"},
    ],
}  # fmt: skip


def test_check_accepts_a_good_file(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(config_path, EXPLAIN_CONFIG)
    assert main(["check", "--config", str(config_path)]) == 0
    assert "ok, 3 policies" in capsys.readouterr().out


def test_check_and_explain_show_the_operators_revision(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(config_path, {**EXPLAIN_CONFIG, "revision": "12"})
    assert main(["check", "--config", str(config_path)]) == 0
    assert "ok, 3 policies, revision 12" in capsys.readouterr().out
    assert main(["explain", "--config", str(config_path), "--rcpt", "a@sparkpost.com"]) == 0
    assert "config revision 12" in capsys.readouterr().out
    write_config(config_path, {**EXPLAIN_CONFIG, "revision": "12\nMAIL FROM:<x>"})
    assert main(["check", "--config", str(config_path)]) == 2
    assert "revision" in capsys.readouterr().err


def test_check_names_what_is_wrong(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config_path.write_text("policies: [{name: a, type: CRAM-MD5}]")
    assert main(["check", "--config", str(config_path)]) == 2
    assert "policies[0] (a): type: must be one of PLAIN, LOGIN, XOAUTH2" in capsys.readouterr().err


def test_explain_shows_values_and_sources(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(config_path, EXPLAIN_CONFIG)
    assert (
        main(["explain", "--config", str(config_path), "--rcpt", "a@sparkpost.com", "--binding", "bulk-a"])
        == 0
    )
    out = capsys.readouterr().out
    lines = {
        line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and not line[2].isdigit()
    }
    assert "PLAIN" in lines["type"] and "policy mail/sparkpost (domain=sparkpost.com)" in lines["type"]
    assert "bulk" in lines["user"] and "policy mail/marketing (bindingGroup=marketing)" in lines["user"]
    assert "***" in lines["password"] and "mail/sparkpost" in lines["password"]
    assert "smtp.example.net:587" in lines["gateway"] and "mail/global" in lines["gateway"]
    assert "mode=starttls verify=true" in lines["tls"] and "default" in lines["tls"]
    assert "binding group marketing" in out
    assert "hunter2" not in out


def test_explain_default_binding_and_no_auth(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(config_path, EXPLAIN_CONFIG)
    assert main(["explain", "--config", str(config_path), "--rcpt", "x@other.org"]) == 0
    out = capsys.readouterr().out
    assert "binding default" in out
    assert "sent without AUTH" in out


def test_explain_rejects_a_non_address(config_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(config_path, EXPLAIN_CONFIG)
    assert main(["explain", "--config", str(config_path), "--rcpt", "sparkpost.com"]) == 2
    assert "expected an address" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_listening(port: int, proc: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(20):
        while True:
            assert proc.returncode is None, "relay exited early"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def test_serve_finishes_in_flight_transactions_on_sigterm(tls: TLSFiles, config_path: Path) -> None:
    async with AuthUpstream(tls, users={"u": "pw"}) as up:
        up.state.data_delay = 1.0
        port = free_port()
        write_config(
            config_path,
            {
                "policies": [{"name": "p", "type": "PLAIN", "user": "u", "password": "pw",
                              "gateway": {"host": "127.0.0.1", "port": up.port},
                              "tls": {"caFile": str(tls.ca_file)}}],
            },
        )  # fmt: skip
        data = yaml.safe_load(config_path.read_text())
        data["listen"]["port"] = port
        data["metrics"]["enabled"] = False
        config_path.write_text(yaml.safe_dump(data))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "outbound_relay.cli", "serve", "--config", str(config_path),
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            await wait_listening(port, proc)
            sending = asyncio.create_task(submit(port, ["a@x.org"], message()))
            async with asyncio.timeout(10):
                while not up.state.connections or not up.auth_log:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # DATA is under way at the upstream
            proc.send_signal(signal.SIGTERM)
            outcome = await sending
            async with asyncio.timeout(20):
                code = await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
    assert outcome.code == 250, log
    assert code == 0, log
    assert len(up.received) == 1
    assert "relay stopped" in log
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_serve_refuses_a_bad_config(config_path: Path) -> None:
    config_path.write_text("listen: {host: 0.0.0.0}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "outbound_relay.cli", "serve", "--config", str(config_path),
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 2
    assert b"listen.host: must be a loopback address" in err


# The seed's stanzas plus one key import-momentum does not convert (line 23).
SEED_CONF_EXTRA = SEED_CONF + 'Domain "example.org" {\n  Max_Outbound_Connections = 20\n}\n'


def test_import_momentum_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "ecelerity.conf"
    conf.write_text(SEED_CONF_EXTRA)
    assert main(["import-momentum", str(conf), "--namespace", "mail"]) == 0
    out = capsys.readouterr()
    docs = [d for d in yaml.safe_load_all(out.out) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["OutboundAuthPolicy"] * 3 + ["Secret"] * 3
    assert all(d["metadata"]["namespace"] == "mail" for d in docs)
    # The unconverted key is reported by name and line, on stderr too.
    assert "Max_Outbound_Connections" in out.err and ":23" in out.err

    assert main(["import-momentum", str(conf), "--relay-config"]) == 0
    relay_yaml = tmp_path / "relay.yaml"
    relay_yaml.write_text(capsys.readouterr().out)
    assert main(["check", "--config", str(relay_yaml)]) == 0

    assert main(["import-momentum", str(conf), "--strict"]) == 2
    assert "Max_Outbound_Connections" in capsys.readouterr().err


def test_import_momentum_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "ecelerity.conf"
    conf.write_text('Domain "x.com" {\n  Outbound_SMTP_AUTH_Type = "PLAIN"\n')
    assert main(["import-momentum", str(conf)]) == 2
    assert str(conf) in capsys.readouterr().err


def test_serve_rejects_an_empty_default_binding(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(config_path, {})
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(config_path), "--default-binding", " "])
    assert exited.value.code == 2
    assert "a binding name must not be empty" in capsys.readouterr().err


def test_explain_oauth2_without_a_running_relay(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The source of the token, never the client secret; the cached token's expiry is asked from the
    relay's metrics port, and nothing listens there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    policy = {
        "name": "mail/o365", "type": "XOAUTH2", "user": "sender@contoso.com",
        "oauth2": {"tokenUrl": "https://login.microsoftonline.com/contoso/oauth2/v2.0/token",
                   "clientId": "app-id", "clientSecret": "s3cret-client-value",
                   "scopes": ["https://outlook.office365.com/.default"]},
        "gateway": {"host": "smtp.office365.com", "port": 587},
    }  # fmt: skip
    write_config(config_path, {"policies": [policy]})
    argv = ["explain", "--config", str(config_path), "--rcpt", "a@contoso.com"]
    assert main([*argv, "--metrics-port", str(closed_port)]) == 0
    out = capsys.readouterr().out
    assert "(OAuth2 access token)" in out
    assert "the password is an OAuth2 access token from policy mail/o365's oauth2 block" in out
    assert "tokenUrl https://login.microsoftonline.com/contoso/oauth2/v2.0/token" in out
    assert "grant client_credentials, clientId app-id" in out
    assert "scopes https://outlook.office365.com/.default" in out
    assert f"cached token: unknown (the relay's metrics at http://127.0.0.1:{closed_port}/metrics" in out
    assert "s3cret-client-value" not in out


def test_serve_client_auth_flag_names_the_modes(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_config(config_path, {})
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--config", str(config_path), "--client-auth", "open"])
    assert exited.value.code == 2
    assert "'accept', 'binding', 'none'" in capsys.readouterr().err


def test_serve_refuses_listen_tls_files_that_are_no_certificate(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config_path.parent / "bad.pem").write_text("not PEM\n")
    write_config(config_path, {"listen": {"port": 0, "tls": {"certFile": "bad.pem", "keyFile": "bad.pem"}}})
    assert main(["serve", "--config", str(config_path)]) == 2
    assert "listen.tls: certificate" in capsys.readouterr().err
