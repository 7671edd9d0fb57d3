"""The operator's check of Lua hooks (hook_check.py), without a cluster: the relay's worker runs it."""

from __future__ import annotations

from outbound_operator.crd_models import ConfigMapKeyRef
from outbound_operator.hook_check import HookChecker
from outbound_operator.hook_check_service import MAX_HOOK_BYTES
from outbound_operator.relay_settings import HookFile

BROKEN = "function outbound_smtp_auth_config(msg\n"


def hook(source: str, name: str = "hooks") -> HookFile:
    return HookFile(
        ref=ConfigMapKeyRef(name=name, key="auth.lua"), key=f"hook-{name}-auth.lua", source=source
    )


async def test_a_problem_names_the_namespace_that_asked_even_for_the_same_source() -> None:
    checker = HookChecker()
    first = await checker.check("team-a", (hook(BROKEN),), 100)
    second = await checker.check("team-b", (hook(BROKEN),), 100)
    assert first is not None and second is not None
    assert "team-a/hooks" in first.message and "team-a" not in second.message, (first, second)
    assert "team-b/hooks" in second.message


async def test_hooks_larger_than_the_secret_can_hold_are_refused_unchecked() -> None:
    checker = HookChecker()
    half = "-- " + "x" * (MAX_HOOK_BYTES // 2) + "\n"
    problem = await checker.check("team-a", (hook(half, "one"), hook(half, "two")), 100)
    assert problem is not None and problem.reason == "HookTooLarge", problem
    assert str(MAX_HOOK_BYTES) in problem.message
