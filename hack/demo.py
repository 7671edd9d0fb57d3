"""`make demo`: the relay doing its main job, with nothing mocked.

The seed's three Domain stanzas (messagesystems.com LOGIN, sparkpost.com PLAIN, bird.com XOAUTH2) become a
relay.yaml; a real Dovecot submission server on loopback requires STARTTLS and AUTH (XOAUTH2 through its
oauth2 passdb, validating a JWT locally); `outbound-relay serve` runs as its own process; an app sends one
message to each domain; the demo prints the replies, what arrived behind Dovecot, the auth metrics and
`outbound-relay explain` for one recipient.
"""

from __future__ import annotations

import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.peers import DovecotSubmission, shared_workdir  # noqa: E402

XOAUTH2_USER = "test@contoso.onmicrosoft.com"  # the seed's example user
USERS = {"msys": "msys-demo-password", "sparkpost": "sparkpost-demo-password"}
RELAY = [sys.executable, "-m", "outbound_relay.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def relay_config(dovecot: DovecotSubmission, port: int, metrics_port: int) -> dict[str, object]:
    upstream = {
        "gateway": {"host": dovecot.host, "port": dovecot.port},
        "tls": {"caFile": str(dovecot.ca_file)},
    }
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "policies": [
            {"name": "demo/messagesystems", "scope": {"domain": "messagesystems.com"},
             "Outbound_SMTP_AUTH_Type": "LOGIN", "Outbound_SMTP_AUTH_User": "msys",
             "Outbound_SMTP_AUTH_Pass": USERS["msys"], **upstream},
            {"name": "demo/sparkpost", "scope": {"domain": "sparkpost.com"},
             "Outbound_SMTP_AUTH_Type": "PLAIN", "Outbound_SMTP_AUTH_user": "sparkpost",
             "Outbound_SMTP_AUTH_pass": USERS["sparkpost"], **upstream},
            {"name": "demo/bird", "scope": {"domain": "bird.com"},
             "Outbound_SMTP_AUTH_Type": "XOAUTH2", "Outbound_SMTP_AUTH_user": XOAUTH2_USER,
             "Outbound_SMTP_AUTH_pass": dovecot.make_token(XOAUTH2_USER), **upstream},
        ],
    }  # fmt: skip


def wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the relay exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the relay did not start listening within 20 s")


def send(port: int, rcpt: str) -> str:
    """One transaction as an app sends it; the DATA reply is the upstream's, passed on by the relay."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "app@example.org", rcpt, f"demo to {rcpt.split('@')[1]}"
    msg.set_content("Sent through the outbound-relay sidecar.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo()
        smtp.mail("app@example.org")
        code, text = smtp.rcpt(rcpt)
        if code == 250:
            code, text = smtp.data(msg.as_bytes())
    return f"{code} {text.decode()}"


def main() -> int:
    with shared_workdir("outbound-relay-demo-") as work:
        dovecot = DovecotSubmission(work, users=USERS)
        with dovecot:
            port, metrics_port = free_port(), free_port()
            config_path = work / "relay.yaml"
            config_path.write_text(yaml.safe_dump(relay_config(dovecot, port, metrics_port), sort_keys=False))
            print("outbound-relay demo")
            print(f"  upstream  Dovecot submission on {dovecot.host}:{dovecot.port}: STARTTLS, then AUTH")
            print("            PLAIN / LOGIN (passwd-file) or XOAUTH2 (oauth2 passdb, local JWT validation)")
            print(f"  relay     outbound-relay serve --config {config_path}  (app side: 127.0.0.1:{port})")
            log_path = work / "relay.log"
            with log_path.open("wb") as log:
                relay = subprocess.Popen([*RELAY, "serve", "--config", str(config_path)], stderr=log)
                try:
                    wait_listening(port, relay)
                    print("\nthe app sends one message to each of the seed's domains:")
                    for rcpt in ("someone@messagesystems.com", "someone@sparkpost.com", "someone@bird.com"):
                        print(f"  {rcpt:<28} -> {send(port, rcpt)}")
                    arrived = dovecot.sink.wait_for(3, timeout=15)
                    print(f"\narrived behind Dovecot: {len(arrived)} message(s)")
                    for m in arrived:
                        subject = next(
                            (line for line in m.content.decode().splitlines() if line.startswith("Subject:")),
                            "",
                        )
                        print(f"  to {', '.join(m.rcpt_tos):<28} {subject}")
                    url = f"http://127.0.0.1:{metrics_port}/metrics"
                    metrics = urllib.request.urlopen(url, timeout=5).read().decode()
                    print("\nmetrics (auth and outcomes):")
                    for line in metrics.splitlines():
                        if line.startswith(
                            ("outbound_relay_auth_attempts_total", "outbound_relay_messages_total")
                        ):
                            print(f"  {line}")
                finally:
                    relay.terminate()
                    relay.wait(timeout=30)
            print(f"\nthe relay exited with {relay.returncode} on SIGTERM")
            print("\noutbound-relay explain --config relay.yaml --rcpt someone@bird.com")
            explain = subprocess.run(
                [*RELAY, "explain", "--config", str(config_path), "--rcpt", "someone@bird.com"],
                capture_output=True,
                text=True,
                check=True,
            )
            print("\n".join(f"  {line}" for line in explain.stdout.splitlines()))
            ok = len(arrived) == 3 and relay.returncode == 0
            print("\ndemo " + ("succeeded" if ok else "FAILED: see " + str(log_path)))
            return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
