"""End to end on a real node: the image built from the Dockerfile (hack/image), the chart installed with
helm, the operator running in its Pod, the webhook injecting the native sidecar into an app Pod, the
kubelet projecting the rendered Secret, and the app's mail reaching a real Dovecot with LOGIN, PLAIN and
XOAUTH2 through 127.0.0.1:2525. Then a password rotation through the kubelet's own volume update, and
what happens to Pods created while the operator is down.

The network (hack/control-plane, "the kubelet node"): the operator runs with hostNetwork in the node's
network namespace, where the forwarder gives it the API server on 127.0.0.1 and gives the API server its
webhook on the host's 127.0.0.1:<published port> (the chart's `webhook.url`). The app Pod has a network
namespace of its own (the webhook refuses hostNetwork Pods), and Dovecot is started inside it, on
127.0.0.2 as everywhere in these tests: nothing listens on an address of the host's namespace but
loopback. Every image is built here and run with imagePullPolicy Never.
"""

from __future__ import annotations

import base64
import json
import os
import re
import smtplib
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from outbound_operator.injection import VOLUME_NAME
from tests.cluster.controlplane import REPO, ControlPlane
from tests.helm.chart import read_json
from tests.node.node import container_log, in_netns, pod_netns, volume_file
from tests.peers import DovecotSubmission, shared_workdir
from tests.peers.certs import make_tls_files
from tests.support.seed import SEED_CONF, SEED_LUA, SEED_USER

pytestmark = [pytest.mark.cluster, pytest.mark.node]

IMAGE_REPOSITORY, IMAGE_TAG = "localhost/outbound-relay", "dev"  # hack/image's NAME
DOVECOT_PORT = 587  # inside the app Pod's network namespace: any port is free there
RCPTS = ("someone@messagesystems.com", "someone@sparkpost.com", "someone@bird.com")
MECHANISMS = {"msys": "LOGIN", "sparkpost": "PLAIN", SEED_USER: "XOAUTH2"}
USERS = {"msys": "msys", "sparkpost": "sparkpost"}  # the seed's passwords

# The app: waits for the upstream (Dovecot, started by the test once the Pod's network exists), then
# hands one message per domain to the sidecar, unauthenticated, as any app would; then idles.
APP = """
import smtplib, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 120
while True:
    try:
        socket.create_connection((host, port), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("no upstream at %s:%d" % (host, port))
        time.sleep(0.2)
for rcpt in sys.argv[3:]:
    with smtplib.SMTP("127.0.0.1", 2525, timeout=60) as smtp:
        msg = "From: app@example.org\\r\\nTo: %s\\r\\nSubject: from the app Pod\\r\\n\\r\\nhello\\r\\n" % rcpt
        try:
            smtp.sendmail("app@example.org", [rcpt], msg)
            print("sent", rcpt, "250", flush=True)
        except smtplib.SMTPException as error:
            print("failed", rcpt, error, flush=True)
print("app done", flush=True)
time.sleep(10**6)
"""


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not after {timeout:.0f}s"
        time.sleep(interval)


@dataclass(frozen=True)
class Installed:
    cluster: ControlPlane
    api: client.ApiClient
    system: str  # the release's namespace
    mail: str  # the apps' namespace, labelled for injection
    dovecot: DovecotSubmission  # not started: it runs in the app Pod's network namespace
    upstream_ca: Path  # Dovecot's CA, made before Dovecot starts
    timings: dict[str, float]
    password_secrets: dict[str, str]  # domain -> the Secret import-momentum made for its password

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api)

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl(*args, input=input)


README_BLOCK_AFTER = "These commands are what `tests/node/test_real_node.py` runs word for word (as root):"


def readme_commands() -> list[str]:
    """The real-node quick start of README.md: one command per entry (continuation lines joined)."""
    text = (REPO / "README.md").read_text()
    block = text.split(README_BLOCK_AFTER, 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").splitlines()
    return [re.sub(r"\s+# .*$", "", command).strip() for command in commands if command.strip()]


@dataclass(frozen=True)
class QuickStart:
    cluster: ControlPlane
    outputs: dict[str, str]  # command -> its stdout
    seconds: dict[str, float]  # command -> how long it took


@pytest.fixture(scope="module")
def quick_start(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickStart]:
    """README.md's real-node quick start, run by bash as written, in a cluster dir of its own (the
    session's control plane has kwok's node: Pods of other tests never land here). The image is built
    before the tests (tests/cluster/plugin.py), so `make image` finds it cached."""
    if os.geteuid() != 0:
        pytest.fail("a real node needs root (containerd, mounts, cgroups, network namespaces)")
    state = tmp_path_factory.mktemp("node")
    cluster = ControlPlane(state, node="kubelet")
    env = {**os.environ, "OUTBOUND_RELAY_CLUSTER_DIR": str(state)}
    outputs, seconds = {}, {}
    script = ["set -euo pipefail"]
    for index, command in enumerate(readme_commands()):
        # Each command's output to a file of its own, and its duration, for the test to look at.
        script += [
            f"start=$(date +%s.%N); {{ {command}; }} > {state}/out-{index}",
            f'echo "$start $(date +%s.%N)" > {state}/time-{index}',
        ]
    try:
        done = subprocess.run(
            ["bash", "-c", "\n".join(script)],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
            timeout=600,
        )
        for index, command in enumerate(readme_commands()):
            if (state / f"time-{index}").exists():
                outputs[command] = (state / f"out-{index}").read_text()
                begin, end = map(float, (state / f"time-{index}").read_text().split())
                seconds[command] = end - begin
        assert done.returncode == 0, f"the quick start failed:\n{done.stderr[-3000:]}"
        # From now on, should this process die, the watchdog stops the cluster (`make cluster` starts none).
        cluster.start()
        yield QuickStart(cluster, outputs, seconds)
    finally:
        cluster.stop()


def test_readme_quick_start_on_a_real_node(quick_start: QuickStart) -> None:
    out = quick_start.outputs
    # `helm test`: the chart's test Pod ran on the node and found the CRDs and the webhook working.
    tested = out["helm test outbound-relay --namespace outbound-relay-system"]
    assert re.search(r"TEST SUITE:\s+outbound-relay-test\n.*\n.*\nPhase:\s+Succeeded", tested), tested
    pod = out["kubectl get pod mailer -n mail"].splitlines()
    assert pod[0].split()[:3] == ["NAME", "READY", "STATUS"]
    assert pod[1].split()[:3] == ["mailer", "2/2", "Running"]  # the app and the relay sidecar
    oap = out["kubectl get oap -n mail"].splitlines()
    ready = oap[0].split().index("READY")
    assert [line.split()[ready] for line in oap[1:]] == ["True"]
    mailer = json.loads(quick_start.cluster.kubectl("get", "pod", "mailer", "-n", "mail", "-o", "json"))
    (sidecar,) = mailer["spec"]["initContainers"]
    assert (sidecar["name"], sidecar["restartPolicy"]) == ("outbound-relay", "Always")  # a native sidecar
    assert sidecar["image"] == f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    # The operator's Pod, from the image built here, on the real node.
    operator = json.loads(
        quick_start.cluster.kubectl(
            "get",
            "pods",
            "-n",
            "outbound-relay-system",
            "-l",
            "app.kubernetes.io/component=operator",
            "-o",
            "json",
        )
    )["items"][0]
    assert operator["spec"]["nodeName"] == "outbound-relay-node"
    assert all(c["ready"] for c in operator["status"]["containerStatuses"])
    print(
        "\nREADME quick start on a real node, seconds per command: "
        + json.dumps(
            {command.split(" --")[0][:60]: round(took, 1) for command, took in quick_start.seconds.items()}
        )
    )


@pytest.fixture(scope="module")
def installed(quick_start: QuickStart) -> Iterator[Installed]:
    """The quick start's release; the seed's policies, with Dovecot as their upstream, in a namespace of
    their own."""
    cluster = quick_start.cluster
    timings = {
        "make cluster NODE=kubelet": quick_start.seconds["make cluster NODE=kubelet"],
        "helm install --wait (operator Pod Ready)": next(
            took for command, took in quick_start.seconds.items() if command.startswith("helm install")
        ),
    }
    with shared_workdir("outbound-relay-e2e-") as work, cluster.api_client() as api:
        tls = make_tls_files(work / "tls")
        dovecot = DovecotSubmission(work, tls, users=dict(USERS), port=DOVECOT_PORT, startup_timeout=30)
        namespace = f"seed-{os.urandom(3).hex()}"
        setup = Installed(cluster, api, "outbound-relay-system", namespace, dovecot, tls.ca_file, timings, {})
        try:
            _apply_seed_policies(setup, work)
            yield setup
        finally:
            dovecot.stop()
            print("\nreal node timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))


def _apply_seed_policies(setup: Installed, work: Path) -> None:
    """What `make demo` does on Kubernetes: the seed's ecelerity.conf through import-momentum, a real
    JWT for bird.com, and a global policy with the gateway (Dovecot) and its CA."""
    kubectl, mail = setup.kubectl, setup.mail
    kubectl("create", "namespace", mail)
    kubectl("label", "namespace", mail, "outboundrelay.io/inject=enabled")
    conf = work / "ecelerity.conf"
    conf.write_text(SEED_CONF)
    relay = Path(REPO / ".venv" / "bin" / "outbound-relay")
    imported = setup.cluster.run(str(relay), "import-momentum", str(conf), "--namespace", mail).stdout
    kubectl("apply", "-f", "-", input=imported)
    for document in yaml.safe_load_all(imported):
        if document and document["kind"] == "OutboundAuthPolicy":
            domain = document["spec"]["scope"]["domain"]
            setup.password_secrets[domain] = document["spec"]["passwordSecretRef"]["name"]
    # The seed's bird.com token is an example string; Dovecot validates a signed JWT.
    _set_secret(setup, setup.password_secrets["bird.com"], password=setup.dovecot.make_token(SEED_USER))
    ca = f"--from-file=ca.crt={setup.upstream_ca}"
    kubectl("create", "secret", "generic", "upstream-ca", "-n", mail, ca)
    upstream = {
        "apiVersion": "outboundrelay.io/v1alpha1",
        "kind": "OutboundAuthPolicy",
        "metadata": {"name": "upstream", "namespace": mail},
        "spec": {
            "gateway": {"host": setup.dovecot.host, "port": setup.dovecot.port},
            "tls": {"mode": "starttls", "caSecretRef": {"name": "upstream-ca", "key": "ca.crt"}},
        },
    }
    kubectl("apply", "-f", "-", input=json.dumps(upstream))
    # The operator in its Pod renders them: READY is what `kubectl get oap` shows.
    kubectl("wait", "oap", "--all", "-n", mail, "--for=condition=Ready", "--timeout=90s")


def _set_secret(setup: Installed, name: str, **data: str) -> None:
    encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
    setup.core.patch_namespaced_secret(name, setup.mail, {"data": encoded})


def _app_pod(name: str, dovecot: DovecotSubmission, rcpts: tuple[str, ...] = RCPTS) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"outboundrelay.io/inject": "true"}},
        "spec": {
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": "app",
                    "image": f"{IMAGE_REPOSITORY}:{IMAGE_TAG}",  # the same image: it has a python
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", APP, dovecot.host, str(dovecot.port), *rcpts],
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                }
            ],
        },
    }


def _read_pod(setup: Installed, name: str) -> dict[str, Any]:
    return read_json(setup.core.read_namespaced_pod, name, setup.mail)


@dataclass(frozen=True)
class AppPod:
    name: str
    uid: str
    netns: Path


@pytest.fixture(scope="module")
def app_pod(installed: Installed) -> AppPod:
    """The annotated app Pod, admitted with the sidecar, and Dovecot started in its network namespace."""
    setup = installed
    started = time.monotonic()
    setup.kubectl("apply", "-n", setup.mail, "-f", "-", input=json.dumps(_app_pod("app", setup.dovecot)))
    pod = _read_pod(setup, "app")
    (sidecar,) = pod["spec"]["initContainers"]
    assert sidecar["name"] == "outbound-relay"
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["image"] == f"{IMAGE_REPOSITORY}:{IMAGE_TAG}"
    netns = pod_netns(setup.cluster, pod["metadata"]["uid"])
    in_netns(netns, setup.dovecot.start)
    wait_for(lambda: _read_pod(setup, "app")["status"].get("phase") == "Running", 120, "the app Pod runs")
    setup.timings["app Pod created -> Running"] = time.monotonic() - started
    return AppPod("app", pod["metadata"]["uid"], netns)


def test_app_mail_reaches_dovecot_through_the_injected_sidecar(installed: Installed, app_pod: AppPod) -> None:
    setup = installed
    deadline = time.monotonic() + 120
    while "app done" not in (log := container_log(setup.cluster, setup.mail, app_pod.name, "app")):
        assert time.monotonic() < deadline, f"the app did not finish sending; its log:\n{log}"
        time.sleep(0.5)
    assert [line for line in log.splitlines() if line.startswith("sent")] == [
        f"sent {rcpt} 250" for rcpt in RCPTS
    ], log
    arrived = setup.dovecot.sink.wait_for(3, timeout=30)
    assert sorted(rcpt for message in arrived for rcpt in message.rcpt_tos) == sorted(RCPTS)
    for user, mechanism in MECHANISMS.items():
        setup.dovecot.wait_for_log(f"Login: user=<{user}>, method={mechanism}")
    # The sidecar in its container, on the rendered Secret the kubelet projected.
    relay_yaml = volume_file(setup.cluster, app_pod.uid, VOLUME_NAME, "relay.yaml")
    assert len(yaml.safe_load(relay_yaml.read_text())["policies"]) == 4


def _send_from_pod(app: AppPod, rcpt: str) -> str:
    """One message to the sidecar from inside the app Pod's network, as the app sends it."""

    def send() -> str:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.org", rcpt, "after the rotation"
        msg.set_content("hello\n")
        try:
            with smtplib.SMTP("127.0.0.1", 2525, timeout=30) as smtp:
                smtp.send_message(msg)
            return "250"
        except smtplib.SMTPResponseException as error:
            return f"{error.smtp_code} {error.smtp_error!r}"
        except (smtplib.SMTPException, OSError) as error:
            return f"error {error}"

    return in_netns(app.netns, send)


def test_rotated_password_reaches_the_pod_through_the_kubelet(installed: Installed, app_pod: AppPod) -> None:
    """Secret -> operator -> outbound-relay-config -> the kubelet's projected volume -> the relay's reload
    -> a new upstream session authenticated with the new password."""
    setup = installed
    new_password = "rotated-" + os.urandom(6).hex()
    relay_yaml = volume_file(setup.cluster, app_pod.uid, VOLUME_NAME, "relay.yaml")
    assert new_password not in relay_yaml.read_text()

    def reloads() -> int:
        return container_log(setup.cluster, setup.mail, app_pod.name, "outbound-relay").count(
            "config reloaded"
        )

    def logins() -> int:
        return setup.dovecot.log_file.read_text().count("Login: user=<sparkpost>, method=PLAIN")

    reloaded_before, logins_before = reloads(), logins()
    # The upstream first (Dovecot re-reads its passwd-file): the old password is refused from now on.
    users = setup.dovecot.dir / "users"
    users.write_text(
        users.read_text().replace("sparkpost:{PLAIN}sparkpost:", f"sparkpost:{{PLAIN}}{new_password}:")
    )
    started = time.monotonic()
    _set_secret(setup, setup.password_secrets["sparkpost.com"], password=new_password)
    wait_for(lambda: new_password in relay_yaml.read_text(), 150, "the kubelet updates the projected Secret")
    projected = time.monotonic() - started
    wait_for(lambda: reloads() > reloaded_before, 30, "the relay reloads the projected relay.yaml", 0.5)
    reloaded = time.monotonic() - started
    reply = _send_from_pod(app_pod, "someone@sparkpost.com")
    assert reply == "250", reply
    # A new session (the credentials are part of the pool's key), authenticated with the new password.
    assert logins() == logins_before + 1
    setup.timings["rotation: Secret patched -> new relay.yaml in the Pod's volume"] = projected
    setup.timings["rotation: Secret patched -> the relay reloaded it"] = reloaded
    setup.timings["rotation: Secret patched -> message sent with the new password"] = (
        time.monotonic() - started
    )


BROKEN_LUA = "local mod = {}\nfunction mod:outbound_smtp_auth_config(msg\nend\n"
TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def test_lua_hooks_are_checked_in_a_container_without_the_token(installed: Installed) -> None:
    """The operator asks its hook-checker container to load an OutboundRelaySettings' hooks: that container
    runs on the node with no ServiceAccount token (it would refuse to start with one), and its verdicts
    reach the settings' status."""
    setup = installed
    namespace = f"hooks-{os.urandom(3).hex()}"
    setup.kubectl("create", "namespace", namespace)
    setup.kubectl("label", "namespace", namespace, "outboundrelay.io/inject=enabled")
    hooks = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "relay-hooks", "namespace": namespace},
    }
    settings = {
        "apiVersion": "outboundrelay.io/v1alpha1",
        "kind": "OutboundRelaySettings",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": {"hooks": {"lua": [{"configMapRef": {"name": "relay-hooks", "key": "auth.lua"}}]}},
    }
    setup.kubectl("apply", "-f", "-", input=json.dumps({**hooks, "data": {"auth.lua": BROKEN_LUA}}))
    setup.kubectl("apply", "-f", "-", input=json.dumps(settings))
    ors = ("outboundrelaysettings/default", "-n", namespace)
    setup.kubectl("wait", *ors, "--for=condition=Invalid", "--timeout=90s")
    message = setup.kubectl("get", *ors, "-o", "jsonpath={.status.conditions[?(@.type=='Invalid')].message}")
    assert "Lua syntax error: relay-hooks/auth.lua" in message, message
    setup.kubectl("apply", "-f", "-", input=json.dumps({**hooks, "data": {"auth.lua": SEED_LUA}}))
    setup.kubectl("wait", *ors, "--for=condition=Ready", "--timeout=90s")

    pods = json.loads(
        setup.kubectl(
            "get", "pods", "-n", setup.system, "-l", "app.kubernetes.io/component=operator", "-o", "json"
        )
    )["items"]
    checked = ""
    for pod in pods:
        assert pod["spec"]["automountServiceAccountToken"] is False
        containers = {c["name"]: c for c in pod["spec"]["containers"]}
        assert TOKEN_DIR not in [m["mountPath"] for m in containers["hook-checker"]["volumeMounts"]]
        assert TOKEN_DIR in [m["mountPath"] for m in containers["operator"]["volumeMounts"]]
        assert all(status["ready"] for status in pod["status"]["containerStatuses"]), pod["status"]
        checked += container_log(setup.cluster, setup.system, pod["metadata"]["name"], "hook-checker")
    # The checks ran there: a refusal, then a hook that loads.
    assert "hooks ['relay-hooks/auth.lua'] refused: hooks.lua[0]" in checked, checked
    assert "hooks ['relay-hooks/auth.lua'] load" in checked, checked


def test_pods_created_while_the_operator_is_down(installed: Installed, app_pod: AppPod) -> None:
    """failurePolicy Ignore: an opted-in Pod admitted while no webhook answers starts without the sidecar."""
    setup = installed
    selector = "app.kubernetes.io/component=operator"
    old = setup.kubectl(
        "get", "pod", "-n", setup.system, "-l", selector, "-o", "jsonpath={.items[0].metadata.name}"
    )
    setup.kubectl("delete", "pod", "-n", setup.system, old, "--wait=false")
    created: dict[str, bool] = {}
    started = time.monotonic()
    index = 0
    # New app Pods, one a second, until one gets the sidecar again (the new operator Pod answers).
    while time.monotonic() - started < 120:
        name = f"during-restart-{index}"
        index += 1
        setup.kubectl(
            "apply", "-n", setup.mail, "-f", "-", input=json.dumps(_app_pod(name, setup.dovecot, ()))
        )
        created[name] = bool(_read_pod(setup, name)["spec"].get("initContainers"))
        if created[name] and not all(created.values()):
            break
        time.sleep(1)
    without = [name for name, injected in created.items() if not injected]
    setup.timings["operator deleted -> webhook injects again"] = time.monotonic() - started
    print(f"\nPods created while the operator restarted: {json.dumps(created)}")
    assert without, f"every Pod got the sidecar: {created}"
    assert created[name], f"no Pod got the sidecar within 120 s: {created}"
    # Visible afterwards: the operator reports each opted-in Pod that runs without the sidecar.
    for pod in without:
        wait_for(partial(_not_injected_event, setup, pod), 60, f"an Event on Pod {pod}")


def _not_injected_event(setup: Installed, pod: str) -> bool:
    events = setup.core.list_namespaced_event(setup.mail, field_selector=f"involvedObject.name={pod}").items
    return any(e.reason == "SidecarNotInjected" for e in events)
