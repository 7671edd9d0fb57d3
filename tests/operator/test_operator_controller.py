"""The Controller in the test's own loop against the real API server, fed watch events by hand: the cases
a kopf-driven operator only meets by bad luck (a missed watch event, a CRD uninstalled under it, a Secret
write the API server refuses)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException
from prometheus_client import generate_latest

from outbound_operator import controller as controller_module
from outbound_operator.controller import Controller, ControllerSettings, NamespaceState
from outbound_operator.kubeapi import KubeApi
from outbound_operator.metrics import OperatorMetrics, ReconcileResult
from outbound_operator.namespaces import ServeSettings
from outbound_operator.resources import RENDERED_LABELS, REVISION_ANNOTATION
from outbound_relay.config import parse_config
from tests.operator.cluster import Objects
from tests.operator.test_operator_reconcile import spec

PEM = b"-----BEGIN CERTIFICATE-----\n"

MakeController = Callable[..., Controller]


@pytest.fixture
async def make_controller(k8s_client: client.ApiClient) -> AsyncIterator[MakeController]:
    made: list[Controller] = []

    def make(**settings: Any) -> Controller:
        # No automatic reconciliation unless a test asks for it: it calls reconcile() itself.
        settings.setdefault("debounce_seconds", 3600.0)
        settings.setdefault("secret_resync_seconds", 0.0)
        controller = Controller(KubeApi(k8s_client), OperatorMetrics(), ControllerSettings(**settings))
        made.append(controller)
        return controller

    yield make
    for controller in made:
        await controller.close()


async def until(check: Callable[[], Any], timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(check):
            await asyncio.sleep(0.1)


async def test_policy_list_404_is_an_error_and_deletes_nothing(
    objects: Objects, make_controller: MakeController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CRD uninstalled (or not yet served): listing policies answers 404. That is not "no policies":
    taking it so would delete every namespace's rendered Secret, and with it every relay's config."""
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_policy("global", spec(None, "a"))
    controller = make_controller()
    assert await controller.reconcile(objects.namespace) is ReconcileResult.WRITTEN
    before = objects.rendered()
    assert before is not None

    monkeypatch.setattr(controller_module, "POLICY_PLURAL", "outboundnosuchpolicies")
    with pytest.raises(ApiException) as raised:
        await controller.reconcile(objects.namespace)
    assert raised.value.status == 404
    after = objects.rendered()
    assert after is not None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_foreign_secret_in_a_namespace_without_policies_is_no_error(
    objects: Objects, make_controller: MakeController
) -> None:
    """A relay run by hand with its own outbound-relay-config, and no policy: nothing to do, no error
    (before: NotManagedError on every event, logged and retried forever)."""
    objects.put_secret("outbound-relay-config", {"relay.yaml": "policies: []\n"})
    controller = make_controller()
    assert await controller.reconcile(objects.namespace) is ReconcileResult.UNCHANGED
    assert objects.rendered_data() == {"relay.yaml": b"policies: []\n"}


async def test_a_secret_no_longer_referenced_is_forgotten(
    objects: Objects, make_controller: MakeController
) -> None:
    """Policy P reads Secret A; P is edited to read B (A's events are dropped from then on), A is
    deleted, P is edited back to read A: A must not be rendered from the cache."""
    ns = objects.namespace
    objects.put_secret("a", {"password": "pw-a"})
    objects.put_secret("b", {"password": "pw-b"})
    body = objects.apply_policy("p", spec(None, "a"))
    controller = make_controller()
    await controller.reconcile(ns)
    assert objects.rendered_policies()[f"{ns}/p"]["password"] == "pw-a"

    controller.policy_changed(ns, {**body, "spec": spec(None, "b")}, deleted=False)
    objects.delete_secret("a")
    assert not controller.watches_secret(ns, "a")  # so the watch drops the event of its deletion
    controller.policy_changed(ns, body, deleted=False)
    await controller.reconcile(ns)
    rendered = objects.rendered_policies()[f"{ns}/p"]
    assert "password" not in rendered and rendered["suspended"] == f"Secret {ns}/a not found"


async def test_referenced_secrets_are_reread_periodically(
    objects: Objects, make_controller: MakeController
) -> None:
    """A Secret deleted while the watch was down (a 410 Gone relist sends no DELETED): the periodic
    re-read notices, and its password leaves the rendered config."""
    ns = objects.namespace
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_policy("p", spec(None, "a"))
    controller = make_controller(debounce_seconds=0.01, secret_resync_seconds=0.3)
    await controller.reconcile(ns)
    assert objects.rendered_policies()[f"{ns}/p"]["password"] == "pw-a"

    objects.delete_secret("a")  # no watch event reaches the controller
    controller.start()
    await until(lambda: "password" not in objects.rendered_policies()[f"{ns}/p"])
    objects.wait_condition("p", "SecretMissing", "True")


async def test_the_revision_grows_with_the_content_and_is_the_same_in_secret_config_and_metric(
    objects: Objects, make_controller: MakeController
) -> None:
    ns = objects.namespace
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_policy("p", spec(None, "a"))
    controller = make_controller()

    def revision() -> tuple[str, str, float | None]:
        secret = objects.rendered()
        assert secret is not None
        config = parse_config(objects.relay_yaml())  # the relay's own reading
        exported = controller.metrics.registry.get_sample_value(
            "outbound_operator_config_revision_info",
            {"config_namespace": ns, "revision": config.revision or ""},
        )
        return secret["metadata"]["annotations"][REVISION_ANNOTATION], config.revision or "", exported

    assert await controller.reconcile(ns) is ReconcileResult.WRITTEN
    assert revision() == ("1", "1", 1.0)
    assert await controller.reconcile(ns) is ReconcileResult.UNCHANGED  # same content: same revision
    assert revision() == ("1", "1", 1.0)
    objects.put_secret("a", {"password": "pw-a2"})
    controller.secret_changed(ns, "a", {"data": {"password": "cHctYTI="}}, deleted=False)
    assert await controller.reconcile(ns) is ReconcileResult.WRITTEN
    assert revision() == ("2", "2", 1.0)
    text = generate_latest(controller.metrics.registry).decode()
    assert text.count("outbound_operator_config_revision_info{") == 1  # the old revision's series is gone
    # A new operator (a restart, another replica) continues from the Secret in place.
    again = make_controller()
    assert await again.reconcile(ns) is ReconcileResult.UNCHANGED
    assert (
        again.metrics.registry.get_sample_value(
            "outbound_operator_config_revision_info", {"config_namespace": ns, "revision": "2"}
        )
        == 1.0
    )
    again.forget(ns)
    assert "outbound_operator_config_revision_info{" not in generate_latest(again.metrics.registry).decode()


async def test_pods_without_sidecar_show_in_the_policies_status_their_column_and_a_metric(
    objects: Objects, make_controller: MakeController, control_plane: Any
) -> None:
    ns = objects.namespace
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_policy("p", spec(None, "a"))
    controller = make_controller()
    await controller.reconcile(ns)
    assert "podsWithoutSidecar" not in objects.policy("p")["status"]
    controller.set_pods_without_sidecar({ns: 3, "other": 0})  # as the periodic scan reports them
    await controller.reconcile(ns)
    assert objects.policy("p")["status"]["podsWithoutSidecar"] == 3
    table = control_plane.kubectl("get", "oap", "-n", ns).splitlines()
    assert table[0].split()[5:8] == ["PODS", "WITHOUT", "SIDECAR"] and table[1].split()[5] == "3", table
    sample = controller.metrics.registry.get_sample_value
    assert sample("outbound_operator_pods_without_sidecar", {"config_namespace": ns}) == 3.0
    assert sample("outbound_operator_pods_without_sidecar", {"config_namespace": "other"}) == 0.0
    controller.set_pods_without_sidecar({ns: 0})  # recreated with the sidecar; "other" no longer labelled
    await controller.reconcile(ns)
    assert "podsWithoutSidecar" not in objects.policy("p")["status"]
    assert sample("outbound_operator_pods_without_sidecar", {"config_namespace": "other"}) is None


def test_resync_is_a_setting_of_the_cli() -> None:
    from outbound_operator import cli

    args = cli.build_parser().parse_args(["-A", "--secret-resync", "60"])
    assert args.secret_resync == 60
    assert cli.build_parser().parse_args(["-A"]).secret_resync == 300
    assert dataclasses.fields(ControllerSettings)  # the default lives in one place


async def test_a_refused_write_turns_ready_false(objects: Objects, make_controller: MakeController) -> None:
    """The rendered Secret cannot be written (here: over the API server's 1 MiB): every policy says so
    instead of keeping a Ready=True for a config the relay never gets."""
    ns = objects.namespace
    objects.put_secret("a", {"password": "pw-a"})
    objects.put_secret("ca1", {"ca.crt": PEM + b"A" * 600_000})
    objects.put_secret("ca2", {"ca.crt": PEM + b"B" * 600_000})
    objects.apply_policy("p", spec("one.example", "a"))
    objects.apply_policy("q", spec("two.example", "a"))
    controller = make_controller()
    await controller.reconcile(ns)
    objects.wait_condition("p", "Ready", "True")
    before = objects.rendered()
    assert before is not None

    for name, ca in (("p", "ca1"), ("q", "ca2")):
        objects.custom.patch_namespaced_custom_object(
            "outboundrelay.io",
            "v1alpha1",
            ns,
            "outboundauthpolicies",
            name,
            {"spec": {"tls": {"caSecretRef": {"name": ca, "key": "ca.crt"}}}},
        )
    with pytest.raises(controller_module.SecretTooLargeError):
        await controller.reconcile(ns)
    for name in ("p", "q"):
        ready = objects.condition(name, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "SecretTooLarge")
        assert "1048576" in ready["message"]
    after = objects.rendered()
    assert after is not None and after["data"] == before["data"]  # the config in place is kept


async def test_statuses_say_when_the_secret_is_not_ours(
    objects: Objects, make_controller: MakeController
) -> None:
    objects.put_secret("outbound-relay-config", {"relay.yaml": "policies: []\n"})
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_policy("p", spec(None, "a"))
    controller = make_controller()
    with pytest.raises(controller_module.NotManagedError):
        await controller.reconcile(objects.namespace)
    ready = objects.condition("p", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotManaged")
    assert RENDERED_LABELS  # the label that would make it ours is named in the message
    assert "app.kubernetes.io/managed-by=outbound-operator" in ready["message"]


def test_the_secret_cache_keeps_what_is_referenced_and_only_that() -> None:
    state = NamespaceState()
    state.secrets = {"a": {"password": b"1"}, "b": {"password": b"2"}, "c": None}
    state.replace_refs({"p1": frozenset({"a"}), "p2": frozenset({"b"}), "p3": frozenset()})
    assert set(state.secrets) == {"a", "b"}  # a reconciliation's refresh evicts nothing still read
    state.set_refs("p1", frozenset({"c"}))
    assert set(state.secrets) == {"b"} and state.referenced == {"b", "c"}
    state.set_refs("p2", None)
    assert state.secrets == {}


def test_served_namespaces_need_the_name_and_the_label() -> None:
    settings = ServeSettings(patterns=("mail-*", "billing"), label=("outboundrelay.io/inject", "enabled"))
    labelled = {"outboundrelay.io/inject": "enabled"}
    assert settings.serves("mail-eu", labelled) and settings.serves("billing", labelled)
    assert not settings.serves("mail-eu", {})
    assert not settings.serves("mail-eu", {"outboundrelay.io/inject": "disabled"})
    assert not settings.serves("kube-system", labelled)
    assert ServeSettings().serves("anything", {})
    assert ServeSettings(label=("a", "b")).serves("x", {"a": "b"})


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["-A", "--bind-cluster-role=r", "--namespace-label=a=b"], "needs --service-account"),
        (["-A", "--bind-cluster-role=r", "--service-account=sa"], "needs --namespace-label"),
        (["-A", "--namespace-label=nolabel"], "expected KEY=VALUE"),
    ],
)
def test_self_binding_needs_a_label_and_an_identity(
    argv: list[str], error: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binding itself in every namespace would amount to cluster-wide Secret rights: the CLI refuses it."""
    from outbound_operator import cli

    monkeypatch.setenv("POD_NAMESPACE", "outbound-relay-system")
    with pytest.raises(SystemExit, match=error):
        cli.serve_settings(cli.build_parser().parse_args(argv))
