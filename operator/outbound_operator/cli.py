"""`outbound-operator`: render OutboundAuthPolicy objects into each namespace's relay config Secret.

Options come in groups (one `_add_*_options` each), so a feature such as the sidecar-injection webhook
adds its own group and registers its handlers beside handlers.register() without reshaping this file.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

import kopf

from outbound_operator import handlers, leader, uninjected, webhook
from outbound_operator.controller import Controller, ControllerSettings
from outbound_operator.kubeapi import KubeApi, load_api_client
from outbound_operator.leader import LeaderElector, LeaseSettings
from outbound_operator.metrics import OperatorMetrics
from outbound_operator.namespaces import Namespaces, ServeSettings, parse_label
from outbound_operator.resources import MANAGER
from outbound_relay.hardening import disable_core_dumps

log = logging.getLogger(__name__)

LOG_FORMATS = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}


def _add_scope_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("what to watch")
    where = group.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--namespace",
        "-n",
        dest="namespaces",
        action="append",
        metavar="NAMESPACE",
        help="serve this namespace (repeat for several; kopf's glob patterns such as 'mail-*' work too)",
    )
    where.add_argument("--all-namespaces", "-A", action="store_true", help="serve every namespace")
    group.add_argument(
        "--namespace-label",
        metavar="KEY=VALUE",
        help="serve only namespaces with this label (e.g. outboundrelay.io/inject=enabled)",
    )
    group.add_argument(
        "--bind-cluster-role",
        metavar="CLUSTERROLE",
        help="in each served namespace, bind this ClusterRole (Secret and status rights) to the operator's "
        "ServiceAccount with a RoleBinding of the same name, deleted when the namespace is no longer served",
    )
    group.add_argument(
        "--service-account",
        metavar="NAME",
        help="the operator's ServiceAccount (in $POD_NAMESPACE): the subject of those RoleBindings",
    )


def _add_serving_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("endpoints and logs")
    group.add_argument("--metrics-host", default="0.0.0.0", help="address of /metrics (0.0.0.0)")
    group.add_argument("--metrics-port", type=int, default=9426, help="port of /metrics; 0 disables (9426)")
    group.add_argument(
        "--liveness",
        metavar="URL",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint for probes, served by kopf (http://0.0.0.0:8080/healthz); '' disables",
    )
    group.add_argument("--log-format", choices=sorted(LOG_FORMATS), default="json", help="log format (json)")
    group.add_argument("--verbose", "-v", action="store_true", help="debug logs (never with Secret values)")


def _add_rendering_options(parser: argparse.ArgumentParser) -> None:
    defaults = ControllerSettings()
    group = parser.add_argument_group("rendering")
    group.add_argument(
        "--debounce",
        type=float,
        default=defaults.debounce_seconds,
        metavar="SECONDS",
        help=f"wait this long after a change so a burst renders once ({defaults.debounce_seconds})",
    )
    group.add_argument(
        "--secret-resync",
        type=float,
        default=defaults.secret_resync_seconds,
        metavar="SECONDS",
        help="re-read every referenced Secret this often, in case a watch event was missed; 0 never "
        f"({defaults.secret_resync_seconds:g})",
    )
    group.add_argument(
        "--hook-checker-socket",
        type=Path,
        metavar="PATH",
        help="check Lua hooks in the outbound-hook-checker listening on this Unix socket (a container "
        "without the operator's credentials, docs/security.md); unset: in a child process of the operator",
    )


def _add_leader_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("high availability (docs/operator.md)")
    group.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run as one of several replicas: only the holder of a Lease writes, every replica serves the "
        "webhooks (off: this process always writes)",
    )
    group.add_argument(
        "--lease-name", default=leader.DEFAULT_LEASE_NAME, help=f"the Lease ({leader.DEFAULT_LEASE_NAME})"
    )
    group.add_argument(
        "--lease-namespace",
        help="the Lease's namespace (default: env POD_NAMESPACE, the operator's)",
    )
    group.add_argument(
        "--lease-identity",
        help="this replica's holderIdentity, unique among replicas (default: env POD_NAME, else the host "
        "name)",
    )
    group.add_argument(
        "--lease-duration",
        type=float,
        default=LeaseSettings.lease_duration,
        metavar="SECONDS",
        help="how long a silent leader keeps the Lease; it stops writing after 2/3 of it without a renewal, "
        f"and tries every 2/15 of it ({LeaseSettings.lease_duration:g})",
    )


def lease_settings(args: argparse.Namespace) -> LeaseSettings | None:
    """None without --leader-elect; SystemExit (argparse's) for bad options."""
    if not args.leader_elect:
        return None
    try:
        return LeaseSettings.scaled(
            namespace=args.lease_namespace or os.environ.get("POD_NAMESPACE", ""),
            identity=args.lease_identity or os.environ.get("POD_NAME") or socket.gethostname(),
            name=args.lease_name,
            lease_duration=args.lease_duration,
        )
    except ValueError as error:
        raise SystemExit(f"outbound-operator: {error}") from None


def serve_settings(args: argparse.Namespace) -> ServeSettings:
    """Which namespaces to serve and how to get rights there; SystemExit (argparse's) for bad options."""
    if args.bind_cluster_role and not args.service_account:
        raise SystemExit("outbound-operator: --bind-cluster-role needs --service-account")
    if args.bind_cluster_role and not args.namespace_label:
        # Binding itself in every namespace would amount to cluster-wide Secret rights.
        raise SystemExit("outbound-operator: --bind-cluster-role needs --namespace-label")
    try:
        label = parse_label(args.namespace_label) if args.namespace_label else None
    except ValueError as error:
        raise SystemExit(f"outbound-operator: {error}") from None
    own_namespace = os.environ.get("POD_NAMESPACE", "")
    if args.service_account and not own_namespace:
        raise SystemExit(
            "outbound-operator: --service-account needs $POD_NAMESPACE (the operator's namespace)"
        )
    return ServeSettings(
        patterns=tuple(args.namespaces or ()),
        label=label,
        bind_cluster_role=args.bind_cluster_role,
        service_account=(own_namespace, args.service_account) if args.service_account else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="outbound-operator",
        description="Render OutboundAuthPolicy and OutboundBindingGroup objects into the Secret "
        "outbound-relay-config (relay.yaml) of each namespace, with status and Events.",
    )
    _add_scope_options(parser)
    _add_serving_options(parser)
    _add_rendering_options(parser)
    _add_leader_options(parser)
    webhook.add_arguments(parser)
    return parser


async def run(args: argparse.Namespace) -> None:
    lease = lease_settings(args)
    metrics = OperatorMetrics()
    metrics_server = metrics.serve(args.metrics_host, args.metrics_port) if args.metrics_port else None
    api_client = load_api_client()
    kube = KubeApi(api_client, instance=lease.identity if lease is not None else MANAGER)
    controller = Controller(
        kube,
        metrics,
        ControllerSettings(
            debounce_seconds=args.debounce,
            secret_resync_seconds=args.secret_resync,
            hook_checker_socket=args.hook_checker_socket,
        ),
    )
    elector: LeaderElector | None = None
    if lease is not None:

        def lead() -> None:
            metrics.leader.set(1)
            namespaces.lead()

        def follow() -> None:
            metrics.leader.set(0)
            namespaces.follow()
            # What only the leader knows: another replica may change it from now on.
            metrics.clear_revisions()
            metrics.set_pods_without_sidecar({})

        elector = LeaderElector(api_client, lease, on_lead=lead, on_follow=follow)
    else:
        metrics.leader.set(1)
    may_write = elector.leading if elector is not None else lambda: True
    controller.fence(may_write)
    namespaces = Namespaces(
        controller.api, controller, serve_settings(args), leading=elector is None, may_write=may_write
    )
    registry = kopf.OperatorRegistry()
    handlers.register(registry, controller, namespaces)
    if elector is not None:
        leader.register(registry, elector)
    webhook_settings = webhook.settings_from_args(args)  # None unless --webhook-port is given
    if webhook_settings is not None:
        webhook.register(webhook_settings, registry, api=api_client, metrics=metrics, may_write=may_write)
        uninjected.register(
            registry, kube, webhook_settings.never_injected, may_write, controller.set_pods_without_sidecar
        )
    log.info(
        "outbound-operator starting: %s, metrics on %s",
        "all namespaces" if args.all_namespaces else f"namespaces {', '.join(args.namespaces)}",
        f"{args.metrics_host}:{args.metrics_port}" if metrics_server else "(off)",
    )
    try:
        await kopf.operator(
            registry=registry,
            # kopf's peering would need its own CRDs, and pauses watches rather than writes: the Lease
            # (leader.py) decides who writes, and every replica keeps its watches and webhooks.
            standalone=True,
            clusterwide=args.all_namespaces,
            namespaces=args.namespaces or (),
            liveness_endpoint=args.liveness or None,
        )
    finally:
        await namespaces.close()
        await controller.close()
        await controller.api.close()
        api_client.close()  # type: ignore[no-untyped-call]
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()


def main(argv: Sequence[str] | None = None) -> int:
    disable_core_dumps()  # before any Secret is read: no core dump, no same-user ptrace of this process
    args = build_parser().parse_args(argv)
    kopf.configure(verbose=args.verbose, log_format=LOG_FORMATS[args.log_format])
    if not args.verbose:
        # kopf logs every handled watch event ("Handler 'secret' succeeded."): thousands at a start.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
