"""Operator benchmark on a real control plane (hack/control-plane): how long rendering takes at scale.

    .venv/bin/python -m bench.operator_bench [--policies 1000] [--changes 5]

1. Cold start: N policies (one domain and one Secret each) exist before the operator starts; time from
   starting `outbound-operator` until the rendered Secret holds all N policies (and until every policy
   shows Ready).
2. Secret change: patch one referenced Secret; time until the rendered relay.yaml carries the new value
   (median of several changes).
Reference, in the same process: the pure render function on the same N policies, so the ratios say how
much of the time is the cluster round trips rather than the rendering itself.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client

from outbound_operator.render import PolicySource, render_namespace
from outbound_operator.resources import CONFIG_KEY, GROUP, POLICY_PLURAL, RENDERED_SECRET, VERSION
from tests.cluster.controlplane import ControlPlane, build
from tests.operator.cluster import CRD_DIR, OperatorProcess, call_json

NAMESPACE = "bench"
LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def spec(i: int) -> dict[str, Any]:
    return {
        "scope": {"domain": f"d{i:05d}.example.com"},
        "type": "PLAIN",
        "user": f"user{i}",
        "passwordSecretRef": {"name": f"smtp-{i:05d}", "key": "password"},
        "gateway": {"host": "smtp.example.com", "port": 587},
    }


def password(i: int, version: int = 0) -> str:
    return f"pw-{i}-v{version}"


def create_objects(api: client.ApiClient, count: int) -> None:
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)

    def one(i: int) -> None:
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"smtp-{i:05d}"},
            "data": {"password": base64.b64encode(password(i).encode()).decode()},
        }
        call_json(core.create_namespaced_secret, NAMESPACE, secret)
        policy = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "OutboundAuthPolicy",
            "metadata": {"name": f"p{i:05d}"},
            "spec": spec(i),
        }
        call_json(custom.create_namespaced_custom_object, GROUP, VERSION, NAMESPACE, POLICY_PLURAL, policy)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def rendered_bytes(api: client.ApiClient) -> bytes | None:
    try:
        secret = call_json(client.CoreV1Api(api).read_namespaced_secret, RENDERED_SECRET, NAMESPACE)
    except client.exceptions.ApiException as error:
        if error.status == 404:
            return None
        raise
    return base64.b64decode(secret["data"][CONFIG_KEY])


def rendered_config(api: client.ApiClient) -> dict[str, Any] | None:
    raw = rendered_bytes(api)
    # libyaml: the polling must not eat the CPU that the operator and the API server need.
    loaded: dict[str, Any] | None = None if raw is None else yaml.load(raw, Loader=LOADER)  # noqa: S506
    return loaded


def ready_count(api: client.ApiClient) -> int:
    found = call_json(
        client.CustomObjectsApi(api).list_namespaced_custom_object, GROUP, VERSION, NAMESPACE, POLICY_PLURAL
    )
    return sum(
        1
        for item in found["items"]
        for c in (item.get("status") or {}).get("conditions") or ()
        if c["type"] == "Ready" and c["status"] == "True"
    )


def wait(check: Callable[[], bool], timeout: float, interval: float = 0.02) -> float:
    """Seconds until `check` holds (from the call)."""
    started = time.perf_counter()
    while not check():
        if time.perf_counter() - started > timeout:
            raise TimeoutError(f"not done after {timeout}s")
        time.sleep(interval)
    return time.perf_counter() - started


def reference_render(count: int, rounds: int = 5) -> float:
    policies = [
        PolicySource.from_body(
            {
                "metadata": {
                    "name": f"p{i:05d}",
                    "uid": f"u{i}",
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                },
                "spec": spec(i),
            }
        )
        for i in range(count)
    ]
    secrets = {f"smtp-{i:05d}": {"password": password(i).encode()} for i in range(count)}
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        rendering = render_namespace(NAMESPACE, policies, [], secrets)
        times.append(time.perf_counter() - started)
        assert len(rendering.config.policies) == count
    return statistics.median(times)


def run(count: int, changes: int) -> dict[str, float]:
    build()
    with tempfile.TemporaryDirectory(prefix="operator-bench-") as tmp:
        state = Path(tmp)
        cluster = ControlPlane(state / "cluster")
        cluster.start()
        api = cluster.api_client()
        operator: OperatorProcess | None = None
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
            cluster.kubectl("create", "namespace", NAMESPACE)
            started = time.perf_counter()
            create_objects(api, count)
            print(f"created {count} policies and {count} Secrets in {time.perf_counter() - started:.1f}s")

            started = time.perf_counter()
            operator = OperatorProcess(cluster.kubeconfig, [NAMESPACE], state / "operator.log")
            healthy = time.perf_counter() - started

            def all_rendered() -> bool:
                config = rendered_config(api)
                return config is not None and len(config.get("policies") or ()) == count

            wait(all_rendered, timeout=300)
            rendered = time.perf_counter() - started
            wait(lambda: ready_count(api) == count, timeout=300, interval=0.2)
            all_ready = time.perf_counter() - started

            core = client.CoreV1Api(api)
            latencies = []
            for version in range(1, changes + 1):
                i = (version * 397) % count
                value = password(i, version)
                patch = {"data": {"password": base64.b64encode(value.encode()).decode()}}
                started = time.perf_counter()
                call_json(core.patch_namespaced_secret, f"smtp-{i:05d}", NAMESPACE, patch)

                def reflected(value: str = value) -> bool:
                    raw = rendered_bytes(api)  # each password is unique: finding it is enough
                    return raw is not None and f"password: {value}\n".encode() in raw

                wait(reflected, timeout=60, interval=0.005)
                latencies.append(time.perf_counter() - started)
                time.sleep(0.5)  # let the status writes of this change settle before the next
            reconcile_p = operator.metric(
                "outbound_operator_reconcile_duration_seconds_sum"
            ) / operator.metric("outbound_operator_reconcile_duration_seconds_count")
            reconciles = {
                result: operator.metric("outbound_operator_reconcile_total", result=result)
                for result in ("written", "unchanged", "error")
            }
            print(f"reconciliations: {reconciles}")
        finally:
            if operator is not None:
                operator.stop()
            api.close()  # type: ignore[no-untyped-call]
            cluster.stop()
    return {
        "operator_healthy_s": healthy,
        "cold_render_s": rendered,
        "cold_all_ready_s": all_ready,
        "secret_change_median_s": statistics.median(latencies),
        "secret_change_max_s": max(latencies),
        "mean_reconcile_s": reconcile_p,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.operator_bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--policies", type=int, default=1000, help="policies (and Secrets) in the namespace (1000)"
    )
    parser.add_argument("--changes", type=int, default=5, help="Secret changes to time (5)")
    args = parser.parse_args(argv)
    reference = reference_render(args.policies)
    results = run(args.policies, args.changes)
    print()
    print(f"reference: render_namespace() of {args.policies} policies, in process: {reference * 1000:.1f} ms")
    print(f"operator healthy after start:                      {results['operator_healthy_s']:.2f} s")
    print(
        f"cold start until the Secret holds {args.policies} policies:     {results['cold_render_s']:.2f} s"
        f"  ({results['cold_render_s'] / reference:.0f}x the reference)"
    )
    print(
        f"cold start until all {args.policies} policies are Ready:      {results['cold_all_ready_s']:.2f} s"
    )
    median, worst = results["secret_change_median_s"], results["secret_change_max_s"]
    print(
        f"one Secret change until relay.yaml reflects it:   median {median * 1000:.0f} ms, "
        f"max {worst * 1000:.0f} ms  ({median / reference:.1f}x the reference)"
    )
    print(f"mean reconciliation (list, render, write):        {results['mean_reconcile_s'] * 1000:.0f} ms")
    print(json.dumps({"policies": args.policies, "reference_render_s": reference, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
