"""The validating admission check of OutboundAuthPolicy: a policy may name only Secrets its author may read.

A policy sends the value of each Secret it names (user, password) to the gateway it names, and puts
each CA it names in the relay's config. Without this check, anyone who may create a policy could name a
Secret they may not read and their own server as gateway, and receive the value in AUTH. So, as the API
server does for the Secrets a Pod mounts or a ServiceAccount lists, the author's own rights decide: for
each Secret a created or changed policy names, a SubjectAccessReview asks whether the requesting user
(user, groups, uid, extra, as the API server authenticated them) may `get` that Secret in the policy's
namespace. An update by another user is checked for that user, whatever the creator could read: the
updater could point the policy at their own gateway. And no policy may name `outbound-relay-config`, the
Secret the operator renders from every policy of the namespace.

Answers say which policy, which Secret and why; they tell nothing about the Secret (not whether it
exists) beyond what the requester's own rights let them learn.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

from outbound_operator.render import PolicySource
from outbound_operator.resources import POLICY_KIND, RENDERED_SECRET

VALIDATE_POLICIES_PATH: Final = "/validate-policies"

MayGet = Callable[[Mapping[str, Any], str, str], Awaitable[bool]]
"""(userInfo, namespace, Secret name) -> may that user `get` that Secret (a SubjectAccessReview)."""


class ReviewCheckError(RuntimeError):
    """The author's rights could not be checked (the API server did not answer the review)."""


def _denied(uid: str, code: int, message: str) -> dict[str, Any]:
    reason = "Forbidden" if code == 403 else "InternalError"
    return {"uid": uid, "allowed": False, "status": {"code": code, "reason": reason, "message": message}}


def _policy_name(request: Mapping[str, Any], policy: Mapping[str, Any]) -> str:
    metadata = policy.get("metadata") if isinstance(policy.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    name = request.get("name") or metadata.get("name") or f"{metadata.get('generateName', '')}*"
    return f"{request.get('namespace', '')}/{name}"


def _user(user_info: Mapping[str, Any]) -> str:
    return str(user_info.get("username") or "(anonymous)")


async def review_policy(request: Mapping[str, Any], may_get: MayGet) -> dict[str, Any]:
    """The AdmissionResponse for one AdmissionRequest of an OutboundAuthPolicy. `request` has been checked
    for shape (webhook.py): its fields have the types the API server sends."""
    uid = str(request["uid"])
    if (request.get("kind") or {}).get("kind") != POLICY_KIND or request.get("operation") not in (
        "CREATE",
        "UPDATE",
    ):
        return {"uid": uid, "allowed": True}
    policy = request.get("object") or {}
    spec = policy.get("spec")
    if not isinstance(spec, Mapping):
        return {"uid": uid, "allowed": True}  # the CRD's schema refuses it with its own message
    old = request.get("oldObject") or {}
    if request["operation"] == "UPDATE" and old.get("spec") == spec:
        return {"uid": uid, "allowed": True}  # labels, annotations: no Secret is named anew
    where = _policy_name(request, policy)
    namespace = str(request.get("namespace") or "")
    # A spec the operator cannot parse names no Secret it would read (render.py renders it suspended).
    refs = PolicySource.from_body(policy).secret_refs()
    for field, ref in refs.items():
        if ref.name == RENDERED_SECRET:
            return _denied(
                uid,
                403,
                f"OutboundAuthPolicy {where}: spec.{field} names Secret {namespace}/{RENDERED_SECRET}, which "
                "the operator renders from every policy of the namespace (with their passwords); no policy "
                "may read it",
            )
    user_info = request.get("userInfo") or {}
    for name in sorted({ref.name for ref in refs.values()}):
        fields = ", ".join(f"spec.{f}" for f, r in refs.items() if r.name == name)
        try:
            allowed = await may_get(user_info, namespace, name)
        except ReviewCheckError as error:
            return _denied(
                uid,
                500,
                f"OutboundAuthPolicy {where}: could not check whether {_user(user_info)} may get Secret "
                f"{namespace}/{name} ({error}); try again",
            )
        if not allowed:
            return _denied(
                uid,
                403,
                f"OutboundAuthPolicy {where}: {fields} names Secret {namespace}/{name}, which "
                f"{_user(user_info)} may not get; a policy sends that Secret's value to its gateway, so only "
                "a user who may read a Secret may name it",
            )
    return {"uid": uid, "allowed": True}


def access_review(user_info: Mapping[str, Any], namespace: str, name: str) -> dict[str, Any]:
    """The SubjectAccessReview (authorization.k8s.io/v1) of `get` on Secret namespace/name for the user
    the API server authenticated."""
    spec: dict[str, Any] = {
        "resourceAttributes": {
            "namespace": namespace,
            "verb": "get",
            "group": "",
            "version": "v1",
            "resource": "secrets",
            "name": name,
        },
        "user": str(user_info.get("username") or ""),
        "groups": [str(g) for g in user_info.get("groups") or ()],
    }
    if user_info.get("uid"):
        spec["uid"] = str(user_info["uid"])
    extra = user_info.get("extra")
    if isinstance(extra, Mapping) and extra:
        spec["extra"] = {str(k): [str(v) for v in values] for k, values in extra.items()}
    return {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "spec": spec}
