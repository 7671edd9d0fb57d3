"""A verdict as the `status` of its object, and the Event that tells a change of readiness.

Status and Events carry names of Secrets and keys, never their values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from outbound_operator.render import Verdict


def status_of(
    verdict: Verdict, current: Mapping[str, Any] | None, *, now: str, pods_without_sidecar: int = 0
) -> dict[str, Any]:
    """The full status; a condition keeps its lastTransitionTime while its status stays the same."""
    old: dict[str, Mapping[str, Any]] = {}
    for item in (current or {}).get("conditions") or ():
        if isinstance(item, Mapping) and "type" in item:
            old[str(item["type"])] = item
    conditions = []
    for condition in verdict.conditions:
        status = "True" if condition.status else "False"
        previous = old.get(condition.type.value, {})
        since = previous.get("lastTransitionTime") if previous.get("status") == status else None
        conditions.append(
            {
                "type": condition.type.value,
                "status": status,
                "reason": condition.reason,
                "message": condition.message,
                "observedGeneration": verdict.generation,
                "lastTransitionTime": since or now,
            }
        )
    result: dict[str, Any] = {"observedGeneration": verdict.generation, "conditions": conditions}
    if verdict.resolved_scope is not None:
        result["resolvedScope"] = verdict.resolved_scope
    if pods_without_sidecar:
        result["podsWithoutSidecar"] = pods_without_sidecar
    if verdict.hooks is not None:
        result["hooks"] = list(verdict.hooks)
    return result


def status_patch(new: Mapping[str, Any], current: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A JSON merge patch taking `current` to `new`, or None when they are equal (no write, no churn)."""
    current = current or {}
    if dict(current) == dict(new):
        return None
    patch: dict[str, Any] = dict(new)
    for key in current:
        if key not in new:
            patch[key] = None  # merge patch: null deletes
    return {"status": patch}


@dataclass(frozen=True, kw_only=True)
class EventNote:
    type: str  # Normal | Warning
    reason: str
    message: str


def readiness_event(verdict: Verdict, current: Mapping[str, Any] | None) -> EventNote | None:
    """An Event when Ready changes (status, reason or message); nothing when it stays as it was."""
    ready = verdict.ready
    new = ("True" if ready.status else "False", ready.reason, ready.message)
    for item in (current or {}).get("conditions") or ():
        if isinstance(item, Mapping) and item.get("type") == "Ready":
            if (item.get("status"), item.get("reason"), item.get("message")) == new:
                return None
            break
    return EventNote(type="Normal" if ready.status else "Warning", reason=ready.reason, message=ready.message)
