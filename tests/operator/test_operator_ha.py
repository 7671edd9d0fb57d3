"""Two operators with one Lease on the real API server: one writes, the other takes over when it dies.

The Lease lasts 3 s here (renew deadline 2 s, retry 0.4 s: client-go's proportions), so a takeover takes
seconds; the chart's default is 15 s.
"""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from outbound_operator import cli
from outbound_operator.leader import LeaderElector, LeaseSettings
from tests.operator.cluster import Objects, OperatorProcess, call_json, wait_for
from tests.operator.test_operator_reconcile import spec

LEASE = "outbound-operator"
LEASE_SECONDS = 3.0
RETRY_SECONDS = LEASE_SECONDS * 2 / 15


@dataclass
class Replicas:
    kubeconfig: Path
    namespace: str
    directory: Path
    api: client.ApiClient
    started: dict[str, OperatorProcess] = field(default_factory=dict)

    def start(self, identity: str) -> OperatorProcess:
        process = OperatorProcess(
            self.kubeconfig,
            [self.namespace],
            self.directory / f"operator-{identity}.log",
            "--leader-elect",
            f"--lease-namespace={self.namespace}",
            f"--lease-identity={identity}",
            f"--lease-duration={LEASE_SECONDS}",
        )
        self.started[identity] = process
        return process

    def lease(self) -> dict[str, Any]:
        try:
            lease = call_json(client.CoordinationV1Api(self.api).read_namespaced_lease, LEASE, self.namespace)
            found: dict[str, Any] = lease["spec"]
            return found
        except ApiException as error:
            if error.status == 404:
                return {}
            raise

    def holder(self) -> str:
        return str(self.lease().get("holderIdentity") or "")

    def stop(self) -> None:
        for process in self.started.values():
            process.stop()


@pytest.fixture
def replicas(
    crds: None, kubeconfig: Path, namespace: str, tmp_path: Path, k8s_client: client.ApiClient
) -> Iterator[Replicas]:
    made = Replicas(kubeconfig, namespace, tmp_path, k8s_client)
    try:
        yield made
    finally:
        made.stop()
        for identity, process in made.started.items():
            print(f"--- operator {identity} ---\n{process.logs()[-15000:]}")  # shown when a test fails


def rendered_passwords(objects: Objects) -> dict[str, str | None]:
    return {name: p.get("password") for name, p in objects.rendered_policies().items()}


def reconciliations(process: OperatorProcess) -> float:
    return sum(
        process.metric("outbound_operator_reconcile_total", result=r)
        for r in ("written", "unchanged", "error")
    )


def serving_lines(log: str) -> list[str]:
    """What a replica logs when it serves a namespace, renders it, or tries to write and is fenced off."""
    return re.findall(r"namespace \S+: (?:served|written |unchanged |not the leader).*", log)


def test_one_replica_writes_the_other_only_follows(objects: Objects, replicas: Replicas) -> None:
    """Neither is killed: exactly one holds the Lease and does every write (its identity is on every
    Event); the other reconciles nothing. Then the leader is stopped: the other takes over and renders."""
    ns = objects.namespace
    a = replicas.start("replica-a")
    wait_for(lambda: replicas.holder() == "replica-a", what="replica-a holds the Lease")
    b = replicas.start("replica-b")
    for i in range(5):
        objects.put_secret(f"s{i}", {"password": f"pw-{i}"})
        objects.apply_policy(f"p{i}", spec(f"d{i}.example", f"s{i}"))
    expected = {f"{ns}/p{i}": f"pw-{i}" for i in range(5)}
    wait_for(lambda: rendered_passwords(objects) == expected, what="all policies rendered")
    for i in range(5):
        objects.wait_condition(f"p{i}", "Ready", "True")
    objects.put_secret("s0", {"password": "pw-0b"})
    wait_for(lambda: rendered_passwords(objects)[f"{ns}/p0"] == "pw-0b", what="a change rendered")

    assert replicas.holder() == "replica-a"
    assert a.metric("outbound_operator_leader") == 1 and b.metric("outbound_operator_leader") == 0
    assert reconciliations(a) > 0 and reconciliations(b) == 0
    assert serving_lines(a.logs()) and not serving_lines(b.logs())
    events = call_json(client.CoreV1Api(replicas.api).list_namespaced_event, ns)["items"]
    instances = {
        e.get("reportingInstance") for e in events if e["source"].get("component") == "outbound-operator"
    }
    assert instances == {"replica-a"}

    a.stop()  # SIGTERM: stops writing, frees the Lease (the elector's test checks the record), exits
    assert "outbound-operator released by replica-a" in a.logs()
    wait_for(lambda: replicas.holder() == "replica-b", timeout=LEASE_SECONDS * 3, what="replica-b leads")
    wait_for(lambda: b.metric("outbound_operator_leader") == 1, what="replica-b's gauge")
    objects.put_secret("s1", {"password": "pw-1b"})
    wait_for(lambda: rendered_passwords(objects)[f"{ns}/p1"] == "pw-1b", what="replica-b renders")


@dataclass
class Timeline:
    """What the test saw, in seconds of time.monotonic()."""

    changes: list[float] = field(default_factory=list)  # the test's own writes
    rendered: list[tuple[float, str]] = field(default_factory=list)  # (seen at, resourceVersion)
    holders: list[tuple[float, str]] = field(default_factory=list)  # (seen at, holderIdentity)


def test_the_follower_takes_over_when_the_leader_is_killed(objects: Objects, replicas: Replicas) -> None:
    """kill -9 of the leader while policies and Secrets keep changing: the follower takes the Lease within
    the lease duration (plus one retry) of the leader's last renewal, and the rendered Secret ends with
    every policy and every last password: nothing changed meanwhile is missed."""
    ns = objects.namespace
    a = replicas.start("replica-a")
    wait_for(lambda: replicas.holder() == "replica-a", what="replica-a holds the Lease")
    b = replicas.start("replica-b")
    passwords: dict[str, str] = {}
    for i in range(3):
        objects.put_secret(f"s{i}", {"password": f"pw-{i}-0"})
        objects.apply_policy(f"p{i}", spec(f"d{i}.example", f"s{i}"))
        passwords[f"{ns}/p{i}"] = f"pw-{i}-0"
    wait_for(lambda: rendered_passwords(objects) == passwords, what="first render")

    timeline = Timeline()
    stop = threading.Event()
    watch_api = client.ApiClient(replicas.api.configuration)

    def observe() -> None:
        """Every change of the rendered Secret and of the Lease holder, as the test sees them."""
        core, coordination = client.CoreV1Api(watch_api), client.CoordinationV1Api(watch_api)
        while not stop.is_set():
            version = call_json(core.read_namespaced_secret, "outbound-relay-config", ns)["metadata"][
                "resourceVersion"
            ]
            if not timeline.rendered or timeline.rendered[-1][1] != version:
                timeline.rendered.append((time.monotonic(), version))
            holder = call_json(coordination.read_namespaced_lease, LEASE, ns)["spec"].get("holderIdentity")
            if not timeline.holders or timeline.holders[-1][1] != holder:
                timeline.holders.append((time.monotonic(), str(holder)))
            time.sleep(0.05)

    observer = threading.Thread(target=observe, daemon=True)
    observer.start()
    step = 0

    def change() -> None:
        """One change: a new policy with its Secret, or a new password for an existing Secret."""
        nonlocal step
        step += 1
        if step % 3 == 0:
            i = len(passwords)
            objects.put_secret(f"s{i}", {"password": f"pw-{i}-0"})
            objects.apply_policy(f"p{i}", spec(f"d{i}.example", f"s{i}"))
            passwords[f"{ns}/p{i}"] = f"pw-{i}-0"
        else:
            i = step % len(passwords)
            objects.put_secret(f"s{i}", {"password": f"pw-{i}-{step}"})
            passwords[f"{ns}/p{i}"] = f"pw-{i}-{step}"
        timeline.changes.append(time.monotonic())

    try:
        until = time.monotonic() + 1.5
        while time.monotonic() < until:
            change()
            time.sleep(0.1)
        follower_log_before = b.logs()
        follower_reconciles_before = reconciliations(b)
        a.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.proc.wait()
        deadline = killed + LEASE_SECONDS + 3 * RETRY_SECONDS + 2
        while replicas.holder() != "replica-b":
            assert time.monotonic() < deadline, "replica-b did not take over"
            change()
            time.sleep(0.1)
        until = time.monotonic() + 2
        while time.monotonic() < until:
            change()
            time.sleep(0.1)
        last_change = timeline.changes[-1]
        wait_for(lambda: rendered_passwords(objects) == passwords, what="every change rendered")
        converged = time.monotonic()
    finally:
        stop.set()
        observer.join(5)
        watch_api.close()  # type: ignore[no-untyped-call]

    took_over = next(t for t, holder in timeline.holders if holder == "replica-b")
    written_by_a = [t for t, _ in timeline.rendered if t < killed]
    written_by_b = [t for t, _ in timeline.rendered if t > took_over]
    # The follower did nothing while the leader lived: no reconciliation, no write logged.
    assert follower_reconciles_before == 0 and not serving_lines(follower_log_before)
    # The leader renewed every 0.4 s until killed: the follower waits at most a lease duration after it
    # last saw a renewal, and notices at its next attempt.
    assert took_over - killed < LEASE_SECONDS + 2 * RETRY_SECONDS + 1.5  # slack: a loaded test machine
    # Nothing was written between the kill and the takeover: the dead leader could not, the follower may
    # not (a write the leader sent just before it died may be seen a moment later).
    assert not [t for t, _ in timeline.rendered if killed + 1 < t < took_over]
    for i in range(len(passwords)):
        objects.wait_condition(f"p{i}", "Ready", "True")
    assert b.metric("outbound_operator_leader") == 1
    print(
        "HA transcript (seconds after the kill of the leader replica-a; lease 3 s, renew deadline 2 s, "
        f"retry 0.4 s):\n"
        f"  replica-a's last write of the rendered Secret seen {written_by_a[-1] - killed:+.2f}\n"
        f"  kill -9 of replica-a                            +0.00\n"
        f"  replica-b holds the Lease                       {took_over - killed:+.2f}\n"
        f"  replica-b's first write seen                    {written_by_b[0] - killed:+.2f}\n"
        f"  the test's last change                          {last_change - killed:+.2f}\n"
        f"  every change rendered (checked)                 {converged - killed:+.2f}\n"
        f"  {len(timeline.changes)} changes, {len(passwords)} policies; replica-b reconciled nothing "
        "before the kill"
    )


async def test_a_leader_that_cannot_renew_stops_before_another_can_take_over(
    crds: None, k8s_client: client.ApiClient, namespace: str
) -> None:
    """Split brain: the leader's API calls fail (a partition); it stops writing at its renew deadline,
    and the other elector acquires only after the lease duration: never both at once."""
    settings = {"namespace": namespace, "name": LEASE, "lease_duration": 3.0}
    log: list[tuple[float, str]] = []

    def elector(identity: str) -> LeaderElector:
        made = LeaderElector(
            k8s_client,
            LeaseSettings.scaled(identity=identity, **settings),  # type: ignore[arg-type]
            on_lead=lambda: log.append((time.monotonic(), f"{identity} leads")),
            on_follow=lambda: log.append((time.monotonic(), f"{identity} follows")),
        )
        return made

    first, second = elector("first"), elector("second")
    first.start()
    async with asyncio.timeout(10):
        while not first.leading():
            await asyncio.sleep(0.05)
    second.start()
    await asyncio.sleep(2)
    assert first.leading() and not second.leading()

    def partitioned(*_: Any, **__: Any) -> Any:
        raise ApiException(status=503, reason="Service Unavailable")

    first.coordination.read_namespaced_lease = partitioned  # type: ignore[method-assign]
    cut = time.monotonic()
    async with asyncio.timeout(15):
        while not second.leading():
            assert not (first.leading() and second.leading())
            await asyncio.sleep(0.01)
    assert not first.leading()
    stopped = next(t for t, what in log if what == "first follows")
    took_over = next(t for t, what in log if what == "second leads")
    assert stopped < took_over
    assert stopped - cut <= 2.0 + 0.1  # the renew deadline after the last renewal, at the latest
    assert took_over - stopped >= 3.0 - 2.0 - 0.1  # lease duration minus renew deadline, at the least
    await second.stop()
    await first.stop(release=False)
    lease = call_json(client.CoordinationV1Api(k8s_client).read_namespaced_lease, LEASE, namespace)
    assert lease["spec"]["holderIdentity"] == ""  # released by the leader's stop
    # So a newcomer need not wait out the lease duration.
    third = elector("third")
    begun = time.monotonic()
    third.start()
    async with asyncio.timeout(10):
        while not third.leading():
            await asyncio.sleep(0.01)
    assert time.monotonic() - begun < 1.0
    await third.stop()


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["-A", "--leader-elect"], "needs the Lease's namespace"),
        (["-A", "--leader-elect", "--lease-namespace=ops", "--lease-duration=0"], "retry period < renew"),
        (["-A", "--leader-elect", "--lease-namespace=ops", "--lease-duration=-15"], "retry period < renew"),
    ],
)
def test_leader_election_options_are_checked(
    argv: list[str], error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    with pytest.raises(SystemExit, match=error):
        cli.lease_settings(cli.build_parser().parse_args(argv))
    with pytest.raises(ValueError, match="needs an identity"):
        LeaseSettings(namespace="ops", identity="")


def test_lease_timing_follows_client_go(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAMESPACE", "ops")  # as the Deployment sets them
    monkeypatch.setenv("POD_NAME", "operator-7d9f-abcde")
    lease = cli.lease_settings(cli.build_parser().parse_args(["-A", "--leader-elect"]))
    assert lease is not None and (lease.namespace, lease.identity) == ("ops", "operator-7d9f-abcde")
    assert (lease.lease_duration, lease.renew_deadline, lease.retry_period) == (15, 10, 2)
    assert cli.lease_settings(cli.build_parser().parse_args(["-A"])) is None  # off unless asked
