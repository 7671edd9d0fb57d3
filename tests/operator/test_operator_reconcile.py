"""The operator against the real API server: status, Events, the rendered Secret, restarts."""

from __future__ import annotations

import hashlib
import re
import time
from typing import Any

from outbound_operator.resources import MANAGED_BY_LABEL, MANAGER
from tests.operator.cluster import Objects, call_json, wait_for
from tests.operator.conftest import StartOperator


def spec(domain: str | None, secret: str, **extra: Any) -> dict[str, Any]:
    return {
        **({"scope": {"domain": domain}} if domain else {}),
        "type": "PLAIN",
        "user": secret,
        "passwordSecretRef": {"name": secret, "key": "password"},
        **extra,
    }


def assert_no_secret_in(text: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in text, "a Secret value leaked"


def test_missing_secret_then_ready_without_restart(objects: Objects, start_operator: StartOperator) -> None:
    ns = objects.namespace
    objects.put_secret("global", {"password": "Gl0bal-pw"})
    objects.apply_policy("global", spec(None, "global"))
    objects.apply_policy("sparkpost", spec("sparkpost.com", "sparkpost-smtp"))
    operator = start_operator()

    missing = objects.wait_condition("sparkpost", "SecretMissing", "True")
    assert missing["reason"] == "SecretNotFound"
    assert missing["message"] == f"Secret {ns}/sparkpost-smtp not found"
    ready = objects.condition("sparkpost", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "SecretNotFound"
    assert "deferred with a temporary failure (4xx)" in ready["message"]
    assert "not sent with a wider scope's credentials" in ready["message"]
    assert objects.policy("sparkpost")["status"]["resolvedScope"] == "domain=sparkpost.com"
    objects.wait_condition("global", "Ready", "True")
    rendered = objects.rendered_policies()
    assert rendered[f"{ns}/sparkpost"] == {
        "name": f"{ns}/sparkpost",
        "scope": {"domain": "sparkpost.com"},
        "suspended": f"Secret {ns}/sparkpost-smtp not found",
    }
    assert rendered[f"{ns}/global"]["password"] == "Gl0bal-pw"
    # The Event is posted after the status patch that the test saw: wait for it too.
    wait_for(
        lambda: ("Warning", "SecretNotFound") in [e[:2] for e in objects.events("sparkpost")],
        what="the SecretNotFound Event",
    )
    wait_for(lambda: operator.metric("outbound_operator_policies", condition="SecretMissing") == 1)

    objects.put_secret("sparkpost-smtp", {"password": "Sp4rk-pw"})
    objects.wait_condition("sparkpost", "Ready", "True")
    assert objects.condition("sparkpost", "SecretMissing")["status"] == "False"
    wait_for(lambda: objects.rendered_policies()[f"{ns}/sparkpost"].get("password") == "Sp4rk-pw")
    # The Event is posted after the status patch that the test saw: wait for it too.
    wait_for(
        lambda: ("Normal", "Rendered") in [e[:2] for e in objects.events("sparkpost")],
        what="the Rendered Event",
    )
    wait_for(lambda: operator.metric("outbound_operator_policies", condition="Ready") == 2)

    # A key that goes away: the last value is not kept in the config.
    objects.put_secret("sparkpost-smtp", {"other": "x"})
    missing = objects.wait_condition("sparkpost", "SecretMissing", "True")
    assert missing["message"] == f"Secret {ns}/sparkpost-smtp has no key 'password'"
    wait_for(lambda: "suspended" in objects.rendered_policies()[f"{ns}/sparkpost"])
    assert "password" not in objects.rendered_policies()[f"{ns}/sparkpost"]

    # A deleted Secret: the same.
    objects.put_secret("sparkpost-smtp", {"password": "Sp4rk-pw2"})
    objects.wait_condition("sparkpost", "Ready", "True")
    objects.delete_secret("sparkpost-smtp")
    objects.wait_condition("sparkpost", "SecretMissing", "True")
    wait_for(lambda: "password" not in objects.rendered_policies()[f"{ns}/sparkpost"])
    policy = objects.policy("sparkpost")
    assert_no_secret_in(str(policy["status"]) + str(objects.events("sparkpost")), "Sp4rk-pw", "Gl0bal-pw")
    assert_no_secret_in(operator.logs() + operator.metrics(), "Sp4rk-pw", "Gl0bal-pw")


def test_conflict_older_policy_wins_and_deletion_removes(
    objects: Objects, start_operator: StartOperator
) -> None:
    ns = objects.namespace
    objects.put_secret("a", {"password": "pw-a"})
    objects.put_secret("b", {"password": "pw-b"})
    objects.apply_policy("zz-older", spec("example.com", "a"))
    time.sleep(1.1)  # creationTimestamp has a one-second resolution
    objects.apply_policy("aa-younger", spec("EXAMPLE.com", "b"))
    start_operator()

    conflict = objects.wait_condition("aa-younger", "Conflict", "True")
    assert conflict["reason"] == "ScopeTaken"
    assert conflict["message"] == f"scope domain=example.com is held by the older policy {ns}/zz-older"
    assert objects.condition("aa-younger", "Ready")["status"] == "False"
    objects.wait_condition("zz-older", "Ready", "True")
    assert list(objects.rendered_policies()) == [f"{ns}/zz-older"]
    rendered = objects.rendered()
    assert rendered is not None
    assert sorted(o["name"] for o in rendered["metadata"]["ownerReferences"]) == ["aa-younger", "zz-older"]
    # The Event is posted after the status patch that the test saw: wait for it too.
    wait_for(
        lambda: ("Warning", "ScopeTaken") in [e[:2] for e in objects.events("aa-younger")],
        what="the ScopeTaken Event",
    )

    objects.delete_policy("zz-older")
    objects.wait_condition("aa-younger", "Ready", "True")
    assert objects.condition("aa-younger", "Conflict")["status"] == "False"
    wait_for(lambda: list(objects.rendered_policies()) == [f"{ns}/aa-younger"])
    assert objects.rendered_policies()[f"{ns}/aa-younger"]["password"] == "pw-b"

    objects.delete_policy("aa-younger")
    wait_for(lambda: objects.rendered() is None, what="the rendered Secret to go with the last policy")


def test_binding_groups(objects: Objects, start_operator: StartOperator) -> None:
    ns = objects.namespace
    objects.put_secret("m", {"password": "pw-m"})
    objects.apply_group("marketing", ["bulk-a", "bulk-b"])
    objects.apply_policy("marketing", spec(None, "m", scope={"bindingGroup": "marketing"}))
    objects.apply_policy("promo", spec(None, "m", scope={"bindingGroup": "promo"}))
    start_operator()

    objects.wait_condition("marketing", "Ready", "True")
    invalid = objects.wait_condition("promo", "Invalid", "True")
    assert invalid["reason"] == "UnknownBindingGroup"
    objects.wait_condition("marketing", "Ready", "True", plural="outboundbindinggroups")
    assert objects.relay_yaml()["bindingGroups"] == {"marketing": ["bulk-a", "bulk-b"]}

    objects.apply_group("promo", ["bulk-b", "promo-a"])  # bulk-b is taken by the older group
    objects.wait_condition("promo", "Ready", "True")
    conflict = objects.wait_condition("promo", "Conflict", "True", plural="outboundbindinggroups")
    assert conflict["message"] == "binding 'bulk-b' is in the older group marketing"
    wait_for(
        lambda: (
            objects.relay_yaml()["bindingGroups"] == {"marketing": ["bulk-a", "bulk-b"], "promo": ["promo-a"]}
        )
    )
    assert sorted(objects.rendered_policies()) == [f"{ns}/marketing", f"{ns}/promo"]


def test_oauth2_is_rendered_and_rotation_re_renders(objects: Objects, start_operator: StartOperator) -> None:
    ns = objects.namespace
    objects.put_secret(
        "bird", {"client-id": "relay", "client-secret": "Cl1ent-s3cret", "refresh": "R3fresh-1"}
    )
    objects.apply_policy(
        "bird",
        {
            "scope": {"domain": "bird.com"},
            "type": "XOAUTH2",
            "user": "test@contoso.onmicrosoft.com",
            "oauth2": {
                "tokenURL": "https://login.example/token",
                "clientIdSecretRef": {"name": "bird", "key": "client-id"},
                "clientSecretSecretRef": {"name": "bird", "key": "client-secret"},
                "refreshTokenSecretRef": {"name": "bird", "key": "refresh"},
                "scopes": ["https://outlook.office365.com/SMTP.Send", "offline_access"],
            },
        },
    )
    operator = start_operator()
    objects.wait_condition("bird", "Ready", "True")
    assert objects.rendered_policies()[f"{ns}/bird"]["oauth2"] == {
        "tokenUrl": "https://login.example/token",
        "clientId": "relay",
        "clientSecret": "Cl1ent-s3cret",
        "refreshToken": "R3fresh-1",
        "scopes": ["https://outlook.office365.com/SMTP.Send", "offline_access"],
    }

    # The provider rotates the refresh token and the client secret; the Secret follows, the config too.
    objects.put_secret(
        "bird", {"client-id": "relay", "client-secret": "Cl1ent-s3cret2", "refresh": "R3fresh-2"}
    )
    wait_for(lambda: objects.rendered_policies()[f"{ns}/bird"]["oauth2"].get("refreshToken") == "R3fresh-2")
    assert objects.rendered_policies()[f"{ns}/bird"]["oauth2"]["clientSecret"] == "Cl1ent-s3cret2"

    # A key that goes away: suspended, the old value not kept.
    objects.put_secret("bird", {"client-id": "relay", "client-secret": "Cl1ent-s3cret2"})
    missing = objects.wait_condition("bird", "SecretMissing", "True")
    assert missing["message"] == f"Secret {ns}/bird has no key 'refresh'"
    wait_for(lambda: "suspended" in objects.rendered_policies()[f"{ns}/bird"])
    assert "oauth2" not in objects.rendered_policies()[f"{ns}/bird"]
    values = ("Cl1ent-s3cret", "R3fresh-1", "R3fresh-2")
    assert_no_secret_in(str(objects.policy("bird")["status"]) + str(objects.events("bird")), *values)
    assert_no_secret_in(operator.logs() + operator.metrics(), *values)


def test_restart_converges_byte_for_byte(objects: Objects, start_operator: StartOperator) -> None:
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_group("marketing", ["bulk-a"])
    objects.apply_policy("global", spec(None, "a"))
    objects.apply_policy("marketing", spec(None, "a", scope={"bindingGroup": "marketing"}))
    objects.apply_policy("missing", spec("example.com", "nope"))
    objects.apply_policy("zz-dup", spec(None, "a"))
    first = start_operator()
    objects.wait_condition("global", "Ready", "True")
    objects.wait_condition("missing", "SecretMissing", "True")
    objects.wait_condition("zz-dup", "Conflict", "True")
    wait_for(lambda: first.metric("outbound_operator_reconcile_total", result="written") >= 1)
    time.sleep(0.5)  # let any late status write land before comparing
    before = objects.rendered()
    assert before is not None
    assert before["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGER
    versions = {
        name: objects.policy(name)["metadata"]["resourceVersion"] for name in ("global", "missing", "zz-dup")
    }
    events = len(objects.events("missing"))
    first.stop()

    second = start_operator()
    wait_for(lambda: second.metric("outbound_operator_reconcile_total", result="unchanged") >= 1)
    after = objects.rendered()
    assert after is not None
    assert after["data"] == before["data"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]  # not rewritten
    assert second.metric("outbound_operator_reconcile_total", result="written") == 0
    assert {name: objects.policy(name)["metadata"]["resourceVersion"] for name in versions} == versions
    assert len(objects.events("missing")) == events


def test_rendered_secret_is_repaired_and_garbage_collected(
    objects: Objects, start_operator: StartOperator
) -> None:
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_policy("global", spec(None, "a"))
    operator = start_operator()
    objects.wait_condition("global", "Ready", "True")
    good = objects.rendered_data()

    secret = objects.rendered()
    assert secret is not None
    secret["data"] = {"relay.yaml": "aGFja2Vk"}
    call_json(objects.core.replace_namespaced_secret, secret["metadata"]["name"], objects.namespace, secret)
    wait_for(lambda: objects.rendered_data() == good, what="the operator to undo a manual edit")

    operator.stop()
    objects.delete_policy("global")
    # The garbage collector deletes the Secret once no owner is left, with no operator running.
    wait_for(lambda: objects.rendered() is None, timeout=60, what="garbage collection of the rendered Secret")


def test_foreign_secret_of_that_name_is_left_alone(objects: Objects, start_operator: StartOperator) -> None:
    objects.put_secret("outbound-relay-config", {"relay.yaml": "policies: []\n"})
    objects.put_secret("a", {"password": "pw-a"})
    objects.apply_policy("global", spec(None, "a"))
    operator = start_operator()
    wait_for(lambda: operator.metric("outbound_operator_reconcile_total", result="error") >= 1)
    assert objects.rendered_data() == {"relay.yaml": b"policies: []\n"}
    assert "is not labelled app.kubernetes.io/managed-by=outbound-operator" in operator.logs()


def test_logs_carry_no_plain_hash_of_the_config(objects: Objects, start_operator: StartOperator) -> None:
    """relay.yaml holds passwords inline: a plain hash of it in the logs lets anyone who reads them test
    password guesses offline. The log shows a keyed digest, different in each operator process."""
    objects.put_secret("a", {"password": "guessable"})
    objects.apply_policy("global", spec(None, "a"))
    first = start_operator()
    objects.wait_condition("global", "Ready", "True")
    data = objects.rendered_data()
    # The reconcile log line may follow the status patch that made the policy Ready.
    wait_for(lambda: re.search(r"content ([0-9a-f]{12})\)", first.logs()), what="a content digest in the log")
    logs = first.logs()
    shown = re.findall(r"content ([0-9a-f]{12})\)", logs)
    for value in (data["relay.yaml"], b"guessable"):
        for digest in (hashlib.sha256(value).hexdigest(), hashlib.sha1(value).hexdigest()):  # noqa: S324
            assert digest[:12] not in logs
    first.stop()
    second = start_operator()
    wait_for(lambda: second.metric("outbound_operator_reconcile_total", result="unchanged") >= 1)
    wait_for(lambda: re.search(r"content ([0-9a-f]{12})\)", second.logs()[len(logs) :]), what="a new digest")
    again = re.findall(r"content ([0-9a-f]{12})\)", second.logs()[len(logs) :])
    assert again and again[-1] != shown[-1]  # keyed per process: not a stable fingerprint of the content
