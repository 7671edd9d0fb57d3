"""Which namespaces the operator renders, its access to their Secrets, and the watch of those Secrets.

A namespace is served when its name matches `--namespace` (or `--all-namespaces`) and, with
`--namespace-label`, when it carries that label: a platform team opts a namespace in, and a policy author
(who cannot label Namespaces) cannot. For each served namespace:

- with `--bind-cluster-role`, the operator first binds that ClusterRole (its Secret and status rights) to
  its own ServiceAccount with a RoleBinding of the same name, and deletes it when the namespace stops
  being served: it never holds Secret rights cluster-wide (docs/security.md);
- it watches that namespace's Secrets, and only those: no cluster-wide list or watch of Secrets, so the
  Secrets of other namespaces never pass through its memory. Events of Secrets no policy references are
  dropped on arrival. The same for ConfigMaps: only those the namespace's OutboundRelaySettings names
  (its Lua hooks) are kept.

With leader election (leader.py) only the leader serves: a follower only keeps the set of namespaces it
would serve, and starts serving them all afresh (RoleBinding, full reconciliation, new watch) when it
becomes leader; a leader that loses the Lease stops serving every namespace at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from outbound_operator.controller import Controller, NotLeadingError, describe_error
from outbound_operator.kubeapi import KubeApi, WatchError, WatchExpiredError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    patterns: tuple[str, ...] = ()
    """Namespace names or glob patterns ('mail-*'); empty: every namespace."""
    label: tuple[str, str] | None = None
    """(key, value): only namespaces with this label are served."""
    bind_cluster_role: str | None = None
    """Bind this ClusterRole in each served namespace (a RoleBinding of the same name)."""
    service_account: tuple[str, str] | None = None
    """(namespace, name) of the operator's own ServiceAccount: the RoleBinding's only subject."""
    retry_seconds: float = 1.0
    retry_max_seconds: float = 60.0

    def serves(self, name: str, labels: Mapping[str, str]) -> bool:
        if self.patterns and not any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
            return False
        return self.label is None or labels.get(self.label[0]) == self.label[1]


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` of --namespace-label; ValueError names what is wrong."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(
            f"--namespace-label {text!r}: expected KEY=VALUE, e.g. outboundrelay.io/inject=enabled"
        )
    return key.strip(), value.strip()


class Namespaces:
    """Starts and stops serving namespaces as their Namespace objects come and go and change labels."""

    def __init__(
        self,
        api: KubeApi,
        controller: Controller,
        settings: ServeSettings,
        *,
        leading: bool = True,
        may_write: Callable[[], bool] = lambda: True,
    ) -> None:
        self.api = api
        self.controller = controller
        self.settings = settings
        self._served: dict[str, asyncio.Task[None]] = {}
        self._unbinding: set[asyncio.Task[None]] = set()
        self._wanted: set[str] = set()  # what would be served, kept by followers too
        self._leading = leading  # serving (lead()) or only keeping _wanted (follow())
        self._may_write = may_write  # checked before each RoleBinding write
        controller.gate(self.served)

    def served(self, namespace: str) -> bool:
        return namespace in self._served

    def lead(self) -> None:
        """Became leader: serve every wanted namespace from scratch. Nothing learned while following is
        trusted: the RoleBinding is checked, the namespace fully reconciled, its Secrets watched anew."""
        self._leading = True
        for name in sorted(self._wanted):
            self._stop_serving(name)
            self._start_serving(name)

    def follow(self) -> None:
        """Lost the Lease: stop serving everything at once (pending reconciliations are cancelled)."""
        self._leading = False
        for name in list(self._served):
            self._stop_serving(name)
        for task in self._unbinding:
            task.cancel()

    def _start_serving(self, name: str) -> None:
        self._served[name] = asyncio.get_running_loop().create_task(self._serve(name), name=f"serve {name}")

    def _stop_serving(self, name: str) -> None:
        task = self._served.pop(name, None)
        if task is not None:
            task.cancel()
        self.controller.forget(name)

    def namespace_changed(self, name: str, labels: Mapping[str, str], *, deleted: bool) -> None:
        wanted = not deleted and self.settings.serves(name, labels)
        if wanted:
            self._wanted.add(name)
        else:
            self._wanted.discard(name)
        if not self._leading:
            return
        if wanted and name not in self._served:
            log.info("namespace %s: served", name)
            self._start_serving(name)
        elif not wanted and name in self._served:
            log.info("namespace %s: no longer served%s", name, " (deleted)" if deleted else "")
            self._stop_serving(name)
            if not deleted and self.settings.bind_cluster_role:
                task = asyncio.get_running_loop().create_task(self._unbind(name), name=f"unbind {name}")
                self._unbinding.add(task)
                task.add_done_callback(self._unbinding.discard)

    async def _serve(self, namespace: str) -> None:
        delay = self.settings.retry_seconds
        role, account = self.settings.bind_cluster_role, self.settings.service_account
        while role is not None and account is not None:
            try:
                if not self._may_write():
                    raise NotLeadingError(f"namespace {namespace}: not the leader, no RoleBinding written")
                if await self.api.ensure_role_binding(namespace, role, cluster_role=role, subject=account):
                    log.info("namespace %s: RoleBinding %s to ClusterRole %s written", namespace, role, role)
                break
            except Exception as error:
                log.error(
                    "namespace %s: RoleBinding %s not written (%s); retrying in %.1fs",
                    namespace,
                    role,
                    describe_error(error),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_seconds)
        self.controller.touch(namespace)
        await asyncio.gather(self._watch(namespace), self._watch(namespace, "configmaps"))

    async def _watch(self, namespace: str, resource: str = "secrets") -> None:
        delay = self.settings.retry_seconds
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self.api.list_version(namespace, resource)
                    # Changes before `version` may have been missed (a first start, a 410, a broken
                    # connection): read the referenced Secrets afresh.
                    self.controller.resync(namespace)
                async for kind, body in self.api.watch_secrets(namespace, version, resource):
                    metadata = body.get("metadata") or {}
                    version = str(metadata.get("resourceVersion") or version)
                    name = str(metadata.get("name", ""))
                    if kind == "BOOKMARK":
                        pass
                    elif resource == "configmaps":
                        if self.controller.watches_config_map(namespace, name):
                            self.controller.config_map_changed(
                                namespace, name, body, deleted=kind == "DELETED"
                            )
                    elif self.controller.watches_secret(namespace, name):
                        self.controller.secret_changed(namespace, name, body, deleted=kind == "DELETED")
                    delay = self.settings.retry_seconds
            except WatchExpiredError:
                version = None
            except (WatchError, Exception) as error:
                log.warning(
                    "namespace %s: watch of %s failed (%s); retrying in %.1fs",
                    namespace,
                    resource,
                    error if isinstance(error, WatchError) else describe_error(error),
                    delay,
                )
                version = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_seconds)

    async def _unbind(self, namespace: str) -> None:
        role = self.settings.bind_cluster_role
        assert role is not None
        try:
            if not self._may_write():
                raise NotLeadingError(f"namespace {namespace}: not the leader, RoleBinding {role} kept")
            if await self.api.delete_role_binding(namespace, role):
                log.info("namespace %s: RoleBinding %s deleted", namespace, role)
        except Exception as error:
            log.error("namespace %s: RoleBinding %s not deleted (%s)", namespace, role, describe_error(error))

    async def close(self) -> None:
        tasks = [*self._served.values(), *self._unbinding]
        self._served.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
