"""Keep each namespace's rendered Secret and its policies' status in line with the cluster.

kopf's watch events only say *which namespace* changed (and keep the Secret and ConfigMap caches and the
indexes of referenced Secrets and ConfigMaps current); a reconciliation then lists that namespace's
policies, binding groups and OutboundRelaySettings, checks the settings' Lua hooks (hook_check.py),
renders them all (render.py, relay_settings.py) and writes what differs. Bursts of events (a
`kubectl apply` of many objects, an operator start) are coalesced into one reconciliation per namespace,
and namespaces reconcile concurrently.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from outbound_operator.crd_models import SettingsSpec
from outbound_operator.hook_check import HOOK_CHECK_FAILED, HookChecker
from outbound_operator.kubeapi import ConflictError, KubeApi, RenderedSecret, decode_secret_data, now_rfc3339
from outbound_operator.metrics import OperatorMetrics, ReconcileResult
from outbound_operator.relay_settings import SettingsSource, collect_hooks, render_settings
from outbound_operator.render import (
    BindingGroupSource,
    PolicySource,
    Rendering,
    SettingsPart,
    Verdict,
    not_written,
    render_namespace,
)
from outbound_operator.resources import (
    API_VERSION,
    CONFIG_KEY,
    GROUP_KIND,
    GROUP_PLURAL,
    MANAGED_BY_LABEL,
    MANAGER,
    POLICY_KIND,
    POLICY_PLURAL,
    RENDERED_LABELS,
    RENDERED_SECRET,
    REVISION_ANNOTATION,
    SETTINGS_KIND,
    SETTINGS_PLURAL,
)
from outbound_operator.status import readiness_event, status_of, status_patch
from outbound_relay.config import Hooks

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ControllerSettings:
    debounce_seconds: float = 0.2
    """Seconds to wait after a change before rendering, so that a burst of changes renders once."""

    retry_seconds: float = 1.0
    """First delay before retrying a failed reconciliation; doubles on each failure in a row."""

    retry_max_seconds: float = 60.0
    """Longest delay between retries of a failing namespace."""

    secret_list_threshold: int = 8
    """Above this many uncached referenced Secrets, list the namespace's Secrets once instead of reading
    each (an operator start with many policies)."""

    secret_resync_seconds: float = 300.0
    """Re-read every referenced Secret this often (0: never). The watch is not enough on its own: after a
    410 Gone relist, kopf sends no DELETED for a Secret that vanished meanwhile, so without this a deleted
    password could stay rendered for as long as the operator runs."""

    hook_checker_socket: Path | None = None
    """Where the hook checker listens (hook_check_service.py); None: Lua hooks are checked in a child
    process of the operator."""


DEFAULT_HOOK_TIMEOUT_MS = Hooks().timeout_ms
"""relay.yaml's hooks.timeoutMs when an OutboundRelaySettings sets none: the Lua check uses the same."""

MAX_SECRET_BYTES = 1024 * 1024
"""The API server refuses a Secret whose values add up to more than 1 MiB."""

# Logs show a digest of relay.yaml to tell versions apart, but relay.yaml holds passwords inline: a plain
# hash would let anyone with the logs test password guesses offline. Keyed with a random per-process key,
# the digest tells "same or different within this run" and nothing else.
_LOG_DIGEST_KEY = secrets.token_bytes(32)


def log_digest(data: Mapping[str, bytes]) -> str:
    """A short digest of the rendered Secret's content for logs: HMAC-SHA256 with a per-process key."""
    mac = hmac.new(_LOG_DIGEST_KEY, digestmod=hashlib.sha256)
    for key in sorted(data):
        mac.update(key.encode() + b"\0" + len(data[key]).to_bytes(8, "big") + data[key])
    return mac.hexdigest()[:12]


class NotManagedError(RuntimeError):
    """A Secret named outbound-relay-config exists that the operator did not create; it is left alone."""


class SecretTooLargeError(RuntimeError):
    """The rendered Secret would exceed the API server's 1 MiB limit."""


class NotLeadingError(RuntimeError):
    """This replica does not hold the leader Lease (leader.py): it writes nothing."""


def _write_failure(namespace: str, error: BaseException) -> tuple[str, str]:
    """Reason and message of Ready=False when the rendered Secret could not be written."""
    if isinstance(error, NotManagedError):
        return "SecretNotManaged", str(error)
    if isinstance(error, SecretTooLargeError):
        return "SecretTooLarge", str(error)
    return (
        "SecretWriteFailed",
        f"Secret {namespace}/{RENDERED_SECRET} could not be written ({describe_error(error)}); the one in "
        "place is kept and the write retried",
    )


def describe_error(error: BaseException) -> str:
    """For logs: an API error's status line only (a response body could echo submitted data)."""
    if isinstance(error, ApiException):
        return f"Kubernetes API error {error.status} {error.reason}"
    return f"{type(error).__name__}: {error}"


def _read_secrets(policy: PolicySource) -> frozenset[str]:
    """The Secrets to read for a policy: those it names, except the rendered one (never an input: the
    policy is suspended for naming it, render.py)."""
    return frozenset(r.name for r in policy.secret_refs().values() if r.name != RENDERED_SECRET)


def _content_digest(data: Mapping[str, bytes], owners: Iterable[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for key in sorted(data):
        digest.update(key.encode() + b"\0" + hashlib.sha256(data[key]).digest())
    for owner in owners:
        digest.update(str(owner.get("uid")).encode() + b"\0")
    return digest.hexdigest()


_REVISION_LINE = re.compile(rb'^revision: "(\d{1,18})"\n\Z', re.MULTILINE)


def revision_of(current: RenderedSecret | None) -> int:
    """The revision of the rendered Secret in place: from its relay.yaml, which the sidecars read (the
    annotation is for people); 0 when there is none."""
    if current is None:
        return 0
    found = _REVISION_LINE.search(current.data.get(CONFIG_KEY, b""))
    return int(found.group(1)) if found else 0


def stamped(data: Mapping[str, bytes], revision: int) -> dict[str, bytes]:
    """`data` with relay.yaml's `revision` as its last line. Added here, not by render.py: the revision
    follows from the Secret in place, known only at write time."""
    return {**data, CONFIG_KEY: data[CONFIG_KEY] + f'revision: "{revision}"\n'.encode()}


def _config_map_data(body: Mapping[str, Any]) -> dict[str, str]:
    """A ConfigMap's text keys (`data`); a hook must be text, so `binaryData` is not read."""
    return {str(key): str(value) for key, value in (body.get("data") or {}).items()}


def _ours(current: RenderedSecret) -> bool:
    return current.labels.get(MANAGED_BY_LABEL) == MANAGER


def _live(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects being deleted no longer count: their scope and bindings are released at once."""
    return [item for item in items if not (item.get("metadata") or {}).get("deletionTimestamp")]


@dataclass
class NamespaceState:
    refs: dict[str, frozenset[str]] = field(default_factory=dict)  # policy name -> Secret names it reads
    referenced: frozenset[str] = frozenset()
    secrets: dict[str, dict[str, bytes] | None] = field(default_factory=dict)  # None: known to be missing
    # uid -> (generation, status) last written or confirmed: the watch events our own writes cause.
    confirmed: dict[str, tuple[int, dict[str, Any]]] = field(default_factory=dict)
    config_map_refs: frozenset[str] = frozenset()  # ConfigMaps the OutboundRelaySettings reads
    config_maps: dict[str, dict[str, str] | None] = field(default_factory=dict)  # None: known missing
    written_digest: str | None = None  # content of the rendered Secret as last written or confirmed
    pods_without_sidecar: int = 0  # opted-in Pods running without the sidecar (uninjected.py): in status
    dirty: bool = False
    failures: int = 0
    task: asyncio.Task[None] | None = None
    retry: asyncio.TimerHandle | None = None
    check_again: bool = False  # the hook checker could not be asked at the last reconciliation

    def set_refs(self, policy: str, names: frozenset[str] | None) -> None:
        if names:
            self.refs[policy] = names
        else:
            self.refs.pop(policy, None)
        self._refs_changed()

    def replace_refs(self, refs: Mapping[str, frozenset[str]]) -> None:
        """All policies' references at once (a reconciliation's fresh list)."""
        self.refs = {policy: names for policy, names in refs.items() if names}
        self._refs_changed()

    def set_config_map_refs(self, names: frozenset[str]) -> None:
        self.config_map_refs = names
        for name in [name for name in self.config_maps if name not in names]:
            del self.config_maps[name]  # its events are dropped from now on: the cached value would go stale

    def _refs_changed(self) -> None:
        self.referenced = frozenset().union(*self.refs.values())
        # A Secret no policy reads any more: its watch events are dropped from now on, so its cached value
        # would go stale; forget it (it is read afresh if some policy references it again).
        for name in [name for name in self.secrets if name not in self.referenced]:
            del self.secrets[name]


class Controller:
    def __init__(
        self, api: KubeApi, metrics: OperatorMetrics, settings: ControllerSettings | None = None
    ) -> None:
        self.api = api
        self.metrics = metrics
        self.settings = settings or ControllerSettings()
        self._states: dict[str, NamespaceState] = {}
        self._closed = False
        self._resync: asyncio.Task[None] | None = None
        self._serves: Callable[[str], bool] = lambda _namespace: True
        self.hooks = HookChecker(self.settings.hook_checker_socket)
        self._settings_crd_missing_logged = False
        self._may_write: Callable[[], bool] = lambda: True

    def fence(self, may_write: Callable[[], bool]) -> None:
        """Check `may_write` (the leader election's `leading`) before every write: a replica that lost the
        Lease stops at its next write, even before it was told (docs/operator.md, "High availability")."""
        self._may_write = may_write

    def _check_writable(self, namespace: str) -> None:
        if not self._may_write():
            raise NotLeadingError(f"namespace {namespace}: not the leader, nothing written")

    def gate(self, serves: Callable[[str], bool]) -> None:
        """Render only the namespaces for which `serves` is true (namespaces.py decides); events of any
        other namespace are dropped: the operator may have no rights there."""
        self._serves = serves

    def forget(self, namespace: str) -> None:
        """Stop rendering `namespace`: its pending work is cancelled and its cached Secrets dropped. The
        rendered Secret in place is left as it is (its policies own it)."""
        state = self._states.pop(namespace, None)
        if state is None:
            return
        if state.retry is not None:
            state.retry.cancel()
        if state.task is not None:
            state.task.cancel()
        self.metrics.set_policies(namespace, {})
        self.metrics.set_revision(namespace, None)

    def start(self) -> None:
        """Start the periodic re-read of referenced Secrets (in the running loop); close() stops it."""
        if self.settings.secret_resync_seconds > 0 and self._resync is None and not self._closed:
            self._resync = asyncio.get_running_loop().create_task(
                self._resync_secrets(), name="resync referenced Secrets"
            )

    async def _resync_secrets(self) -> None:
        while True:
            await asyncio.sleep(self.settings.secret_resync_seconds)
            for namespace in list(self._states):
                self.resync(namespace)

    def resync(self, namespace: str) -> None:
        """Forget the cached referenced Secrets of `namespace` and reconcile: they are read anew, so one
        deleted or changed without a watch event (missed across a relist) is seen."""
        state = self._states.get(namespace)
        if state is None or not (state.referenced or state.config_map_refs):
            return
        state.secrets.clear()
        state.config_maps.clear()
        self.touch(namespace)

    def _state(self, namespace: str) -> NamespaceState:
        return self._states.setdefault(namespace, NamespaceState())

    # --- what the watch events tell -------------------------------------------------------------------

    def watches_secret(self, namespace: str, name: str) -> bool:
        """The Secret index: only the Secrets some policy reads, and the rendered one, are of interest."""
        if name == RENDERED_SECRET:
            return True
        state = self._states.get(namespace)
        return state is not None and name in state.referenced

    def watches_config_map(self, namespace: str, name: str) -> bool:
        """The ConfigMap index: only those the namespace's OutboundRelaySettings reads are of interest."""
        state = self._states.get(namespace)
        return state is not None and name in state.config_map_refs

    def config_map_changed(
        self, namespace: str, name: str, body: Mapping[str, Any], *, deleted: bool
    ) -> None:
        if not self._serves(namespace):
            return
        state = self._state(namespace)
        if name in state.config_map_refs:
            state.config_maps[name] = None if deleted else _config_map_data(body)
            self.touch(namespace)

    def settings_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool) -> None:
        if not self._serves(namespace):
            return
        state = self._state(namespace)
        source = SettingsSource.from_body(body)
        if source.named_default:
            state.set_config_map_refs(frozenset() if deleted else source.config_maps())
        if not deleted and self._caused_by_us(state, body):
            return
        self.touch(namespace)

    def policy_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool) -> None:
        if not self._serves(namespace):
            return
        state = self._state(namespace)
        source = PolicySource.from_body(body)
        state.set_refs(source.name, None if deleted else _read_secrets(source))
        if not deleted and self._caused_by_us(state, body):
            return
        self.touch(namespace)

    def group_changed(self, namespace: str, body: Mapping[str, Any], *, deleted: bool) -> None:
        if not self._serves(namespace):
            return
        state = self._state(namespace)
        if not deleted and self._caused_by_us(state, body):
            return
        self.touch(namespace)

    def secret_changed(self, namespace: str, name: str, body: Mapping[str, Any], *, deleted: bool) -> None:
        if not self._serves(namespace):
            return
        state = self._state(namespace)
        if name == RENDERED_SECRET:
            metadata = body.get("metadata") or {}
            seen = _content_digest(
                decode_secret_data(body.get("data")), metadata.get("ownerReferences") or ()
            )
            if deleted or seen != state.written_digest:
                self.touch(namespace)  # edited or deleted by someone else: put it back
            return
        if name in state.referenced:
            state.secrets[name] = None if deleted else decode_secret_data(body.get("data"))
            self.touch(namespace)

    @staticmethod
    def _caused_by_us(state: NamespaceState, body: Mapping[str, Any]) -> bool:
        metadata = body.get("metadata") or {}
        seen = state.confirmed.get(str(metadata.get("uid")))
        return seen is not None and seen == (int(metadata.get("generation", 0)), body.get("status") or {})

    def set_pods_without_sidecar(self, counts: Mapping[str, int]) -> None:
        """From the periodic scan (uninjected.py): how many opted-in Pods run without the sidecar in each
        namespace labelled for injection. Shown in the metric and, for namespaces served, in the status of
        their policies (a namespace whose count changed is reconciled)."""
        self.metrics.set_pods_without_sidecar(counts)
        for namespace, count in counts.items():
            state = self._states.get(namespace)
            if state is not None and state.pods_without_sidecar != count:
                state.pods_without_sidecar = count
                self.touch(namespace)

    # --- scheduling -------------------------------------------------------------------------------------

    def touch(self, namespace: str) -> None:
        """Mark the namespace for a reconciliation soon; one runs at a time per namespace."""
        if self._closed or not self._serves(namespace):
            return
        state = self._state(namespace)
        state.dirty = True
        if state.task is None or state.task.done():
            state.task = asyncio.get_running_loop().create_task(
                self._run(namespace, state), name=f"reconcile {namespace}"
            )

    async def _run(self, namespace: str, state: NamespaceState) -> None:
        while state.dirty:
            await asyncio.sleep(self.settings.debounce_seconds)
            state.dirty = False
            try:
                await self.reconcile(namespace)
            except NotLeadingError as error:
                log.info("%s", error)  # the new leader reconciles; this replica no longer does
                return
            except ConflictError:
                log.info("namespace %s changed while being written; reconciling again", namespace)
                self.metrics.reconciles.labels(result=ReconcileResult.ERROR.value).inc()
                state.dirty = True
            except Exception as error:
                self.metrics.reconciles.labels(result=ReconcileResult.ERROR.value).inc()
                delay = min(self.settings.retry_seconds * 2**state.failures, self.settings.retry_max_seconds)
                state.failures += 1
                log.error(
                    "namespace %s: reconciliation failed (%s); the rendered Secret in place is kept, "
                    "retrying in %.1fs",
                    namespace,
                    describe_error(error),
                    delay,
                )
                if state.retry is not None:
                    state.retry.cancel()
                state.retry = asyncio.get_running_loop().call_later(delay, self.touch, namespace)
            else:
                if state.check_again:
                    state.check_again = False
                    delay = min(
                        self.settings.retry_seconds * 2**state.failures, self.settings.retry_max_seconds
                    )
                    state.failures += 1
                    log.warning(
                        "namespace %s: its Lua hooks could not be checked; again in %.1fs", namespace, delay
                    )
                    if state.retry is not None:
                        state.retry.cancel()
                    state.retry = asyncio.get_running_loop().call_later(delay, self.touch, namespace)
                else:
                    state.failures = 0

    async def close(self) -> None:
        self._closed = True
        tasks = []
        if self._resync is not None:
            self._resync.cancel()
            tasks.append(self._resync)
            self._resync = None
        for state in self._states.values():
            if state.retry is not None:
                state.retry.cancel()
            if state.task is not None:
                state.task.cancel()
                tasks.append(state.task)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def health(self) -> dict[str, int]:
        return {
            "namespaces": len(self._states),
            "failing": sum(1 for s in self._states.values() if s.failures),
        }

    # --- one reconciliation -----------------------------------------------------------------------------

    async def reconcile(self, namespace: str) -> ReconcileResult:
        started = time.perf_counter()
        state = self._state(namespace)
        policy_bodies, group_bodies, settings_bodies, current = await asyncio.gather(
            self.api.list_custom(namespace, POLICY_PLURAL),
            self.api.list_custom(namespace, GROUP_PLURAL),
            self._list_settings(namespace),
            self.api.read_rendered(namespace),
        )
        policy_bodies, group_bodies = _live(policy_bodies), _live(group_bodies)
        settings_bodies = _live(settings_bodies)
        policies = [PolicySource.from_body(body) for body in policy_bodies]
        state.replace_refs({policy.name: _read_secrets(policy) for policy in policies})
        await self._load_secrets(namespace, state)
        values = {name: data for name, data in state.secrets.items() if data is not None}
        groups = [BindingGroupSource.from_body(body) for body in group_bodies]
        settings = await self._render_settings(namespace, state, settings_bodies, current)
        rendering = render_namespace(namespace, policies, groups, values, settings)
        try:
            result = await self._write_rendered(
                namespace, state, rendering, current, has_sources=bool(policies or settings_bodies)
            )
        except (ConflictError, NotLeadingError):
            raise  # reconciled again at once (the statuses follow from that), or by the leader
        except Exception as error:
            # The relay keeps the Secret in place, so no object may say Ready=True for what it never got.
            reason, message = _write_failure(namespace, error)
            await self._write_statuses(
                namespace,
                state,
                POLICY_PLURAL,
                POLICY_KIND,
                policy_bodies,
                not_written(rendering.policies, reason=reason, message=message),
            )
            await self._write_statuses(
                namespace,
                state,
                GROUP_PLURAL,
                GROUP_KIND,
                group_bodies,
                not_written(rendering.groups, reason=reason, message=message),
            )
            await self._write_statuses(
                namespace,
                state,
                SETTINGS_PLURAL,
                SETTINGS_KIND,
                settings_bodies,
                not_written(rendering.settings, reason=reason, message=message),
            )
            raise
        await self._write_statuses(
            namespace, state, POLICY_PLURAL, POLICY_KIND, policy_bodies, rendering.policies
        )
        await self._write_statuses(namespace, state, GROUP_PLURAL, GROUP_KIND, group_bodies, rendering.groups)
        await self._write_statuses(
            namespace, state, SETTINGS_PLURAL, SETTINGS_KIND, settings_bodies, rendering.settings
        )
        live = {
            str((b.get("metadata") or {}).get("uid"))
            for b in (*policy_bodies, *group_bodies, *settings_bodies)
        }
        state.confirmed = {uid: seen for uid, seen in state.confirmed.items() if uid in live}
        self.metrics.set_policies(namespace, rendering.policies)
        self.metrics.reconciles.labels(result=result.value).inc()
        elapsed = time.perf_counter() - started
        self.metrics.duration.observe(elapsed)
        ready = sum(1 for v in rendering.policies.values() if v.ready.status)
        log.info(
            "namespace %s: %s %s (%d policies, %d ready, %d binding groups, content %s) in %.3fs",
            namespace,
            result.value,
            RENDERED_SECRET,
            len(policies),
            ready,
            len(group_bodies),
            log_digest(rendering.data),
            elapsed,
        )
        return result

    async def _list_settings(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's OutboundRelaySettings; none while that CRD is not installed (a chart upgrade
        does not update CRDs: until `kubectl apply -f crds/`, policies keep rendering without settings)."""
        try:
            return await self.api.list_custom(namespace, SETTINGS_PLURAL)
        except ApiException as error:
            if error.status != 404:
                raise
            if not self._settings_crd_missing_logged:
                self._settings_crd_missing_logged = True
                log.warning(
                    "the %s CRD is not installed (apply crds/); rendering without relay settings",
                    SETTINGS_KIND,
                )
            return []

    async def _render_settings(
        self,
        namespace: str,
        state: NamespaceState,
        bodies: list[dict[str, Any]],
        current: RenderedSecret | None,
    ) -> SettingsPart | None:
        """The OutboundRelaySettings' part of the Secret: its hooks read from their ConfigMaps and loaded
        by the relay's loader first; the part in place is kept while they fail (relay_settings.py)."""
        sources = [SettingsSource.from_body(body) for body in bodies]
        chosen = next((s for s in sources if s.named_default), None)
        state.set_config_map_refs(chosen.config_maps() if chosen is not None else frozenset())
        for name in sorted(state.config_map_refs - state.config_maps.keys()):
            body = await self.api.read_config_map(namespace, name)
            # A watch event that landed meanwhile wins over this read (as for Secrets).
            state.config_maps.setdefault(name, None if body is None else _config_map_data(body))
        if chosen is None:
            return render_settings(namespace, sources, (), [], None)
        found = {name: data for name, data in state.config_maps.items() if data is not None}
        hooks, problems = collect_hooks(namespace, chosen, found)
        state.check_again = False
        if not problems and hooks and isinstance(chosen.spec, SettingsSpec):
            timeout = chosen.spec.hooks.timeout_ms if chosen.spec.hooks is not None else None
            problem = await self.hooks.check(namespace, hooks, timeout or DEFAULT_HOOK_TIMEOUT_MS)
            if problem is not None:
                problems.append(problem)
                # Not the hooks' fault (the checker could not be asked): try again, as after a failure.
                state.check_again = problem.reason == HOOK_CHECK_FAILED
        previous = current.data if current is not None and _ours(current) else None
        return render_settings(namespace, sources, hooks, problems, previous)

    async def _load_secrets(self, namespace: str, state: NamespaceState) -> None:
        """Fill the cache for every referenced Secret. A watch event that lands meanwhile wins over what a
        read returns (setdefault), so an older read never replaces a newer event."""
        for name in list(state.secrets):
            if name not in state.referenced:
                del state.secrets[name]  # no longer read by any policy: its events are no longer seen
        unknown = sorted(state.referenced - state.secrets.keys())
        if len(unknown) > self.settings.secret_list_threshold:
            found = {
                str(item["metadata"]["name"]): decode_secret_data(item.get("data"))
                for item in await self.api.list_secrets(namespace)
                if item["metadata"]["name"] in state.referenced
            }
            for name in unknown:
                state.secrets.setdefault(name, found.get(name))
        elif unknown:
            bodies = await asyncio.gather(*(self.api.read_secret(namespace, name) for name in unknown))
            for name, body in zip(unknown, bodies, strict=True):
                state.secrets.setdefault(name, None if body is None else decode_secret_data(body.get("data")))

    async def _write_rendered(
        self,
        namespace: str,
        state: NamespaceState,
        rendering: Rendering,
        current: RenderedSecret | None,
        *,
        has_sources: bool,
    ) -> ReconcileResult:
        if not has_sources and (current is None or current.labels.get(MANAGED_BY_LABEL) != MANAGER):
            # Nothing to render, and nothing of ours to delete: a hand-written Secret of that name in a
            # namespace without policies (a relay run by hand) is simply not our business.
            return ReconcileResult.UNCHANGED
        if current is not None and current.labels.get(MANAGED_BY_LABEL) != MANAGER:
            raise NotManagedError(
                f"Secret {namespace}/{RENDERED_SECRET} exists but is not labelled "
                f"{MANAGED_BY_LABEL}={MANAGER}; delete it (or add the label) to let the operator write it"
            )
        if not has_sources:
            # The garbage collector would delete it too (no owner left); deleting now is quicker.
            if current is None:
                return ReconcileResult.UNCHANGED
            self._check_writable(namespace)
            await self.api.delete_rendered(namespace, current)
            self.metrics.set_revision(namespace, None)
            return ReconcileResult.WRITTEN
        # The revision grows by one each time the content changes, so sidecars can be compared with the
        # operator (docs/metrics.md, "Stale sidecars"); an unchanged rendering keeps the one in place.
        revision = revision_of(current)
        data = stamped(rendering.data, revision)
        # Set before writing: the watch event of our own write may arrive before the write returns.
        state.written_digest = _content_digest(data, rendering.owners)
        if current is not None and self._same(current, data, rendering.owners):
            self.metrics.set_revision(namespace, revision)
            return ReconcileResult.UNCHANGED
        revision += 1
        data = stamped(rendering.data, revision)
        state.written_digest = _content_digest(data, rendering.owners)
        size = sum(len(value) for value in data.values())
        if size > MAX_SECRET_BYTES:
            raise SecretTooLargeError(
                f"the rendered Secret {namespace}/{RENDERED_SECRET} would hold {size} bytes, more than the "
                f"{MAX_SECRET_BYTES} the API server accepts; the one in place is kept"
            )
        self._check_writable(namespace)
        await self.api.write_rendered(
            namespace,
            data=data,
            owners=rendering.owners,
            labels=RENDERED_LABELS,
            current=current,
            annotations={REVISION_ANNOTATION: str(revision)},
        )
        self.metrics.set_revision(namespace, revision)
        return ReconcileResult.WRITTEN

    @staticmethod
    def _same(current: RenderedSecret, data: Mapping[str, bytes], owners: tuple[dict[str, Any], ...]) -> bool:
        return (
            current.data == data
            and list(current.owners) == list(owners)
            and current.labels == RENDERED_LABELS
            and current.annotations.get(REVISION_ANNOTATION) == str(revision_of(current))
        )

    async def _write_statuses(
        self,
        namespace: str,
        state: NamespaceState,
        plural: str,
        kind: str,
        bodies: list[dict[str, Any]],
        verdicts: Mapping[str, Verdict],
    ) -> None:
        now = now_rfc3339()

        async def one(body: dict[str, Any]) -> None:
            metadata = body["metadata"]
            verdict = verdicts[metadata["name"]]
            current = body.get("status") or {}
            uninjected = state.pods_without_sidecar if plural == POLICY_PLURAL else 0
            new = status_of(verdict, current, now=now, pods_without_sidecar=uninjected)
            patch = status_patch(new, current)
            # Recorded before patching: the watch event of the patch may arrive before the patch returns.
            state.confirmed[str(metadata.get("uid"))] = (int(metadata.get("generation", 0)), new)
            if patch is not None:
                self._check_writable(namespace)
            if patch is not None and not await self.api.patch_status(
                plural, namespace, metadata["name"], patch
            ):
                return  # deleted meanwhile
            note = readiness_event(verdict, current)
            if note is not None:
                self._check_writable(namespace)
                involved = {
                    "apiVersion": API_VERSION,
                    "kind": kind,
                    "name": metadata["name"],
                    "namespace": namespace,
                    "uid": str(metadata.get("uid", "")),
                }
                try:
                    await self.api.post_event(
                        involved, type=note.type, reason=note.reason, message=note.message
                    )
                except ApiException as error:  # an Event is best effort; the status says it all
                    log.warning("namespace %s: Event not posted (%s)", namespace, describe_error(error))

        await asyncio.gather(*(one(body) for body in bodies))
