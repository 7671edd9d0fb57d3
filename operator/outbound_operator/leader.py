"""Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection package does it.

Every replica runs the whole operator (watches and admission webhooks); only the holder of the Lease
writes (rendered Secrets, status, Events, RoleBindings). The rules, with client-go's defaults of
15 s / 10 s / 2 s:

- A candidate takes the Lease when it is free (no holder: released at shutdown) or when its record
  (holder, renewTime) has not changed for `lease_duration`, timed by the candidate's own clock from
  when it *saw* the record change: clocks of different machines are never compared.
- The leader renews every `retry_period`. It counts as leading only until `renew_deadline` after the
  start of its last successful renewal: `leading()` is checked before every write, so a leader that can
  no longer renew (API server unreachable, a partition, a stalled process) stops writing before any other
  replica can take over, `lease_duration - renew_deadline` (5 s) earlier at the least.
- A renewal and a takeover are both an update with the resourceVersion read: of two writers one wins.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import kopf
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from outbound_operator.kubeapi import read_or_none

log = logging.getLogger(__name__)

DEFAULT_LEASE_NAME = "outbound-operator"


def _micro_time(moment: datetime) -> str:
    """A MicroTime as the API server stores it: RFC 3339 with microseconds."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, kw_only=True)
class LeaseSettings:
    namespace: str
    """The Lease's namespace: the operator's own ($POD_NAMESPACE)."""
    identity: str
    """This replica's name in holderIdentity: its Pod name (unique among the replicas)."""
    name: str = DEFAULT_LEASE_NAME
    lease_duration: float = 15.0
    """Seconds a candidate waits, after the record last changed, before taking the Lease over."""
    renew_deadline: float = 10.0
    """Seconds after the start of its last successful renewal that a leader stops writing."""
    retry_period: float = 2.0
    """Seconds between attempts to acquire or renew."""

    def __post_init__(self) -> None:
        if not self.namespace:
            raise ValueError(
                "leader election needs the Lease's namespace (--lease-namespace or $POD_NAMESPACE)"
            )
        if not self.identity:
            raise ValueError("leader election needs an identity (--lease-identity or $POD_NAME)")
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError(
                "leader election needs 0 < retry period < renew deadline < lease duration, got "
                f"{self.retry_period:g} s, {self.renew_deadline:g} s, {self.lease_duration:g} s"
            )

    @classmethod
    def scaled(cls, *, namespace: str, identity: str, name: str, lease_duration: float) -> LeaseSettings:
        """Renew deadline and retry period in client-go's proportions to the lease duration (10/15, 2/15)."""
        return cls(
            namespace=namespace,
            identity=identity,
            name=name,
            lease_duration=lease_duration,
            renew_deadline=lease_duration * 2 / 3,
            retry_period=lease_duration * 2 / 15,
        )


class LeaderElector:
    """Acquires and renews the Lease; calls `on_lead` on becoming leader and `on_follow` on losing it."""

    def __init__(
        self,
        api: client.ApiClient,
        settings: LeaseSettings,
        *,
        on_lead: Callable[[], None],
        on_follow: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.coordination = client.CoordinationV1Api(api)
        self.on_lead = on_lead
        self.on_follow = on_follow
        self.clock = clock
        self._renewed_at: float | None = None  # start of the last successful acquire or renewal
        self._is_leader = False  # on_lead called and on_follow not since
        self._deadline: asyncio.TimerHandle | None = None
        self._observed: tuple[str, str] | None = None  # (holder, renewTime) last seen
        self._observed_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.transitions = 0
        """Times this replica became leader."""

    def leading(self) -> bool:
        """True while this replica may write: the last renewal started less than renew_deadline ago."""
        return self._renewed_at is not None and self.clock() < self._renewed_at + self.settings.renew_deadline

    def health(self) -> dict[str, Any]:
        if self._task is not None and self._task.done():
            raise RuntimeError("the leader election task has stopped")
        return {"leading": self.leading(), "identity": self.settings.identity}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leader election")

    async def stop(self, *, release: bool = True) -> None:
        """Stop electing; a leader stops writing at once and then frees the Lease, so another replica
        takes over at its next attempt instead of after lease_duration."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        was_leading = self.leading()
        self._lose("shutting down")
        if release and was_leading:
            try:
                await asyncio.to_thread(self._release)
            except Exception as error:
                log.warning("Lease %s not released (%s); it expires by itself", self._where(), _brief(error))

    def _where(self) -> str:
        return f"{self.settings.namespace}/{self.settings.name}"

    async def _run(self) -> None:
        while True:
            started = self.clock()
            try:
                acquired = await asyncio.to_thread(self._try_acquire_or_renew)
            except Exception as error:
                acquired = False
                log.warning("Lease %s: acquire or renew failed (%s)", self._where(), _brief(error))
            if acquired:
                self._renewed(started)
            elif self._is_leader and not self.leading():
                self._lose("not renewed within the renew deadline")
            await asyncio.sleep(self.settings.retry_period)

    def _renewed(self, started: float) -> None:
        if self.clock() >= started + self.settings.renew_deadline:
            return  # a request that took past the deadline proves nothing: the next attempt decides
        self._renewed_at = started
        if self._deadline is not None:
            self._deadline.cancel()
        # Stop at the deadline even if the next renewal hangs: the loop may be waiting on the request.
        delay = started + self.settings.renew_deadline - self.clock()
        self._deadline = asyncio.get_running_loop().call_later(max(delay, 0.0), self._check_deadline)
        if not self._is_leader:
            self._is_leader = True
            self.transitions += 1
            log.info("Lease %s acquired by %s: leading", self._where(), self.settings.identity)
            self.on_lead()

    def _check_deadline(self) -> None:
        if self._is_leader and not self.leading():
            self._lose("not renewed within the renew deadline")

    def _lose(self, why: str) -> None:
        self._renewed_at = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._is_leader:
            self._is_leader = False
            log.warning("Lease %s lost by %s (%s): following", self._where(), self.settings.identity, why)
            self.on_follow()

    # --- the API calls, in a worker thread ------------------------------------------------------------

    def _read(self) -> dict[str, Any] | None:
        return read_or_none(
            self.coordination.read_namespaced_lease,
            self.settings.name,
            self.settings.namespace,
            _request_timeout=self.settings.retry_period * 2,
        )

    def _spec(self, *, acquired: datetime, renewed: datetime, transitions: int) -> dict[str, Any]:
        return {
            "holderIdentity": self.settings.identity,
            "leaseDurationSeconds": max(1, round(self.settings.lease_duration)),
            "acquireTime": _micro_time(acquired),
            "renewTime": _micro_time(renewed),
            "leaseTransitions": transitions,
        }

    def _try_acquire_or_renew(self) -> bool:
        """One attempt (client-go's tryAcquireOrRenew); True if this replica holds the Lease now."""
        now = datetime.now(UTC)
        lease = self._read()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.settings.name, "namespace": self.settings.namespace},
                "spec": self._spec(acquired=now, renewed=now, transitions=0),
            }
            return self._write(self.coordination.create_namespaced_lease, self.settings.namespace, body)
        spec = lease.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        record = (holder, str(spec.get("renewTime") or ""))
        if record != self._observed:
            # Timed from now, after the read: the later, the safer (the holder may have renewed just
            # before the read was answered).
            self._observed, self._observed_at = record, self.clock()
        ours = holder == self.settings.identity
        duration = float(spec.get("leaseDurationSeconds") or self.settings.lease_duration)
        if holder and not ours and self.clock() < self._observed_at + duration:
            return False  # held by another replica, and renewed within its lease duration
        acquire_time = now
        if ours and spec.get("acquireTime"):
            acquire_time = datetime.fromisoformat(str(spec["acquireTime"]).replace("Z", "+00:00"))
        transitions = int(spec.get("leaseTransitions") or 0) + (0 if ours else 1)
        lease["spec"] = self._spec(acquired=acquire_time, renewed=now, transitions=transitions)
        # The resourceVersion read stays in metadata: a concurrent writer makes this a 409.
        return self._write(
            self.coordination.replace_namespaced_lease, self.settings.name, self.settings.namespace, lease
        )

    def _write(self, call: Callable[..., Any], *args: Any) -> bool:
        try:
            response = call(*args, _preload_content=False, _request_timeout=self.settings.retry_period * 2)
        except ApiException as error:
            if error.status == 409:
                return False  # another replica wrote first
            raise
        spec = json.loads(response.data).get("spec") or {}
        self._observed = (str(spec.get("holderIdentity") or ""), str(spec.get("renewTime") or ""))
        return True

    def _release(self) -> None:
        lease = self._read()
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.settings.identity:
            return
        # client-go's ReleaseOnCancel: no holder, so the next candidate need not wait out the duration.
        lease["spec"] = {**lease["spec"], "holderIdentity": "", "leaseDurationSeconds": 1}
        with contextlib.suppress(ApiException):  # 409: someone else holds it now; nothing to release
            self.coordination.replace_namespaced_lease(
                self.settings.name,
                self.settings.namespace,
                cast(Any, lease),
                _preload_content=False,
                _request_timeout=self.settings.retry_period * 2,
            )
        log.info("Lease %s released by %s", self._where(), self.settings.identity)


def _brief(error: BaseException) -> str:
    if isinstance(error, ApiException):
        return f"Kubernetes API error {error.status} {error.reason}"
    return type(error).__name__


def register(registry: kopf.OperatorRegistry, elector: LeaderElector) -> None:
    """Elect while the operator runs; at shutdown stop writing, then free the Lease."""

    @kopf.on.startup(id="leader-election", registry=registry)
    async def start_electing(**_: Any) -> None:
        elector.start()

    @kopf.on.probe(id="leader", registry=registry)
    def leader_health(**_: Any) -> dict[str, Any]:
        try:
            return elector.health()
        except RuntimeError as error:
            raise kopf.PermanentError(str(error)) from None

    @kopf.on.cleanup(id="leader-release", registry=registry)
    async def stop_electing(**_: Any) -> None:
        await elector.stop()
