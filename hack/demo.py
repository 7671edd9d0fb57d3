"""`make demo`: the product doing its main job, with nothing mocked.

A real Dovecot submission server on loopback requires STARTTLS and AUTH (PLAIN and LOGIN against a
passwd-file, XOAUTH2 through its oauth2 passdb validating a JWT locally). Then, twice:

1. without a cluster: the three Domain stanzas of Momentum's outbound_smtp_auth example
   (messagesystems.com LOGIN, sparkpost.com PLAIN, bird.com XOAUTH2) as a hand-written relay.yaml,
   `outbound-relay serve` as its own process, one message to each domain; it prints the replies, what
   arrived behind Dovecot, the auth metrics and `explain`;
2. on a real Kubernetes control plane (built from Go modules on first use, minutes; cached after): the
   example ecelerity.conf through `outbound-relay import-momentum` into OutboundAuthPolicies and Secrets,
   `kubectl apply`, `outbound-operator` rendering them into the Secret outbound-relay-config, the Secret
   projected into a directory as the kubelet does, and the relay serving from it.

`hack/demo.py --relay-only` stops after the first part.
"""

from __future__ import annotations

import asyncio
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
from tests.support.seed import SEED_CONF  # noqa: E402

XOAUTH2_USER = "test@contoso.onmicrosoft.com"  # Momentum's example user
USERS = {"msys": "msys", "sparkpost": "sparkpost"}  # Momentum's example passwords
RCPTS = ("someone@messagesystems.com", "someone@sparkpost.com", "someone@bird.com")
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


def relay_only(work: Path, dovecot: DovecotSubmission) -> bool:
    port, metrics_port = free_port(), free_port()
    config_path = work / "relay.yaml"
    config_path.write_text(yaml.safe_dump(relay_config(dovecot, port, metrics_port), sort_keys=False))
    print("1. the relay on its own, from a hand-written relay.yaml (Momentum's key spellings)")
    print(f"  relay     outbound-relay serve --config {config_path}  (app side: 127.0.0.1:{port})")
    log_path = work / "relay.log"
    with log_path.open("wb") as log:
        relay = subprocess.Popen([*RELAY, "serve", "--config", str(config_path)], stderr=log)
        try:
            wait_listening(port, relay)
            print("\nthe app sends one message to each of the example's domains:")
            for rcpt in RCPTS:
                print(f"  {rcpt:<28} -> {send(port, rcpt)}")
            arrived = dovecot.sink.wait_for(3, timeout=15)
            print(f"\narrived behind Dovecot: {len(arrived)} message(s)")
            for m in arrived:
                subject = next(
                    (ln for ln in m.content.decode().splitlines() if ln.startswith("Subject:")), ""
                )
                print(f"  to {', '.join(m.rcpt_tos):<28} {subject}")
            url = f"http://127.0.0.1:{metrics_port}/metrics"
            metrics = urllib.request.urlopen(url, timeout=5).read().decode()
            print("\nmetrics (auth and outcomes):")
            for line in metrics.splitlines():
                if line.startswith(("outbound_relay_auth_attempts_total", "outbound_relay_messages_total")):
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
    if not ok:
        print(f"part 1 FAILED: see {log_path}")
    return ok


def upstream_policy(dovecot: DovecotSubmission) -> str:
    """The one thing ecelerity.conf did not say: where to send. A global policy with only the gateway
    and the CA; every other setting comes from the imported Domain policies (per-setting fallback)."""
    return yaml.safe_dump(
        {
            "apiVersion": "outboundrelay.io/v1alpha1",
            "kind": "OutboundAuthPolicy",
            "metadata": {"name": "upstream", "namespace": "mail"},
            "spec": {
                "gateway": {"host": dovecot.host, "port": dovecot.port},
                "tls": {"mode": "starttls", "caSecretRef": {"name": "upstream-ca", "key": "ca.crt"}},
            },
        }
    )


async def on_kubernetes(work: Path, dovecot: DovecotSubmission) -> bool:
    from tests.cluster.controlplane import ControlPlane, build
    from tests.operator.cluster import OperatorProcess
    from tests.operator.kubelet import projected_secret

    print(
        "\n2. on Kubernetes: import-momentum, kubectl apply, the operator, the relay from the rendered Secret"
    )
    print("  building the control plane from Go modules if not cached (about 7 minutes the first time)...")
    await asyncio.to_thread(build)
    cluster = ControlPlane(work / "cluster")
    await asyncio.to_thread(cluster.start)
    try:
        kubectl = cluster.kubectl
        kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        kubectl("create", "namespace", "mail")
        conf = work / "ecelerity.conf"
        conf.write_text(SEED_CONF)
        print(f"  $ outbound-relay import-momentum {conf.name} --namespace mail | kubectl apply -f -")
        done = await asyncio.to_thread(
            subprocess.run,
            [*RELAY, "import-momentum", str(conf), "--namespace", "mail"],
            capture_output=True,
            text=True,
            check=True,
        )
        imported = done.stdout
        print("\n".join(f"    {line}" for line in kubectl("apply", "-f", "-", input=imported).splitlines()))
        # The example's bird.com token is a plain string; Dovecot validates a signed JWT, so put one in.
        bird = next(
            d for d in yaml.safe_load_all(imported) if d and d["kind"] == "OutboundAuthPolicy"
            and d["spec"]["scope"].get("domain") == "bird.com"
        )  # fmt: skip
        token_secret = bird["spec"]["passwordSecretRef"]["name"]
        rotated = kubectl(
            "create", "secret", "generic", token_secret, "-n", "mail", "--dry-run=client", "-o", "json",
            f"--from-literal=password={dovecot.make_token(XOAUTH2_USER)}",
        )  # fmt: skip
        kubectl("apply", "-f", "-", input=rotated)
        kubectl(
            "create",
            "secret",
            "generic",
            "upstream-ca",
            "-n",
            "mail",
            f"--from-file=ca.crt={dovecot.ca_file}",
        )
        kubectl("apply", "-f", "-", input=upstream_policy(dovecot))
        print("  + a global policy with only the gateway (Dovecot) and its CA, and a real JWT for bird.com")
        operator = OperatorProcess(cluster.kubeconfig, ["mail"], work / "operator.log")
        try:
            kubectl("wait", "oap", "--all", "-n", "mail", "--for=condition=Ready", "--timeout=60s")
            print("\n  $ kubectl get oap -n mail")
            print("\n".join(f"    {line}" for line in kubectl("get", "oap", "-n", "mail").splitlines()))
            with cluster.api_client() as api:
                async with projected_secret(api, "mail", "outbound-relay-config", work / "mount") as mount:
                    return await asyncio.to_thread(relay_from, mount / "relay.yaml", dovecot, work)
        finally:
            operator.stop()
    finally:
        await asyncio.to_thread(cluster.stop)


def relay_from(config_path: Path, dovecot: DovecotSubmission, work: Path) -> bool:
    """The sidecar as the webhook injects it: serve from the projected Secret, listen on 127.0.0.1:2525."""
    config = yaml.safe_load(config_path.read_text())
    port = config.get("listen", {}).get("port", 2525)
    print(f"\n  the Secret projected as the kubelet does: {config_path} ({len(config['policies'])} policies)")
    dovecot.sink.clear()
    with (work / "sidecar.log").open("wb") as log:
        relay = subprocess.Popen([*RELAY, "serve", "--config", str(config_path)], stderr=log)
        try:
            wait_listening(port, relay)
            print(f"  the app sends to 127.0.0.1:{port}:")
            for rcpt in RCPTS:
                print(f"  {rcpt:<28} -> {send(port, rcpt)}")
            arrived = dovecot.sink.wait_for(3, timeout=15)
            print(f"  arrived behind Dovecot: {len(arrived)} message(s)")
        finally:
            relay.terminate()
            relay.wait(30)
    return len(arrived) == 3 and relay.returncode == 0


def main(argv: list[str]) -> int:
    with shared_workdir("outbound-relay-demo-") as work, DovecotSubmission(work, users=USERS) as dovecot:
        print("outbound-relay demo")
        print(f"  upstream  Dovecot submission on {dovecot.host}:{dovecot.port}: STARTTLS, then AUTH")
        print("            PLAIN / LOGIN (passwd-file) or XOAUTH2 (oauth2 passdb, local JWT validation)\n")
        ok = relay_only(work, dovecot)
        if ok and "--relay-only" not in argv:
            ok = asyncio.run(on_kubernetes(work, dovecot))
        print("\ndemo " + ("succeeded" if ok else f"FAILED: logs in {work} are removed; rerun to look"))
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
