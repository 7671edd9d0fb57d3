"""An OutboundRelaySettings as its part of the rendered Secret: relay.yaml's keys outside policies, and
each Lua hook from its ConfigMap key as a file beside relay.yaml.

The hook files and the relay.yaml that names them travel in one Secret, so one write changes both at
once: a sidecar never runs new hooks with an old relay.yaml or the reverse. relay.yaml names each file
relative to itself, and the relay reads them from the same mounted directory.

Last good settings: when the spec cannot be rendered (a ConfigMap or key missing, a hook that fails to
load, a spec the relay refuses), the settings part of the Secret in place is kept as it is (its keys of
relay.yaml and the hook files they name), so the relays keep the hooks they run. The Secret in place is
the record of what was last good: an operator restart changes nothing.

Pure, as render.py: the Lua check (hook_check.py) runs before, and its outcome comes in as problems.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from outbound_operator.crd_models import (
    SETTINGS_NAME_RULE,
    ConfigMapKeyRef,
    InvalidSpec,
    SettingsSpec,
    parse_settings_spec,
)
from outbound_operator.render import (
    ConditionType,
    ObjectMeta,
    Problem,
    SettingsPart,
    make_verdict,
    owner_reference,
)
from outbound_operator.resources import CONFIG_KEY, RENDERED_SECRET, SETTINGS_KIND, SETTINGS_NAME
from outbound_relay.config import Hooks, Limits, UpstreamSettings, format_validation_error

SETTINGS_CONDITIONS = (ConditionType.READY, ConditionType.CONFIG_MAP_MISSING, ConditionType.INVALID)

# The keys of relay.yaml an OutboundRelaySettings sets, in the order they are written.
SETTINGS_KEYS = ("defaultBinding", "bindingHeader", "hooks", "upstream", "limits")
HOOK_KEY_PREFIX = "hook-"
MAX_HOOK_KEY = 253  # a Secret key's limit


@dataclass(frozen=True, kw_only=True)
class SettingsSource(ObjectMeta):
    """An OutboundRelaySettings as rendering reads it."""

    spec: SettingsSpec | InvalidSpec
    named_default: bool

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> SettingsSource:
        return cls(
            **cls.fields_of(body),
            spec=parse_settings_spec(body.get("spec")),
            named_default=SETTINGS_NAME_RULE.holds(body),
        )

    def config_maps(self) -> frozenset[str]:
        """Names of the ConfigMaps this object reads: those whose events matter."""
        if not self.named_default or isinstance(self.spec, InvalidSpec):
            return frozenset()
        return frozenset(ref.name for ref in lua_refs(self.spec))


def lua_refs(spec: SettingsSpec) -> tuple[ConfigMapKeyRef, ...]:
    hooks = spec.hooks
    return tuple(item.config_map_ref for item in (hooks.lua or ())) if hooks is not None else ()


def hook_key(ref: ConfigMapKeyRef, *, hashed: bool = False) -> str:
    """The rendered Secret's key for a hook: `hook-<ConfigMap>-<key>`, with `.lua` added when the key
    lacks it (ConfigMap names and keys are valid Secret-key characters already). `hashed`, or past a
    Secret key's 253 characters: `hook-<digest of the reference>.lua` (two references can spell the
    same name: ConfigMap a-b key c, ConfigMap a key b-c)."""
    key = f"{HOOK_KEY_PREFIX}{ref.name}-{ref.key}"
    key = key if key.endswith(".lua") else f"{key}.lua"
    if hashed or len(key) > MAX_HOOK_KEY:
        digest = hashlib.sha256(f"{ref.name}\0{ref.key}".encode()).hexdigest()[:16]
        key = f"{HOOK_KEY_PREFIX}{digest}.lua"
    return key


def describe_ref(namespace: str, ref: ConfigMapKeyRef) -> str:
    return f"ConfigMap {namespace}/{ref.name} key {ref.key!r}"


@dataclass(frozen=True, kw_only=True)
class HookFile:
    """One Lua hook as it will be rendered."""

    ref: ConfigMapKeyRef
    key: str  # the rendered Secret's key, relay.yaml's hooks.lua entry
    source: str

    @property
    def script_name(self) -> str:
        """The name the Lua check gives the file, so that Lua's positions read `<ConfigMap>/<key>:<line>`."""
        return f"{self.ref.name}/{self.ref.key}"


def collect_hooks(
    namespace: str, source: SettingsSource, config_maps: Mapping[str, Mapping[str, str]]
) -> tuple[tuple[HookFile, ...], list[Problem]]:
    """Each Lua hook's source from its ConfigMap (`config_maps`: name -> key -> text, for those that
    exist), or the problems: a ConfigMap or key missing, a key that is not UTF-8 text, a duplicate."""
    spec = source.spec
    if isinstance(spec, InvalidSpec) or not source.named_default:
        return (), []
    files: list[HookFile] = []
    problems: list[Problem] = []
    seen: dict[str, ConfigMapKeyRef] = {}
    for i, ref in enumerate(lua_refs(spec)):
        where = f"spec.hooks.lua[{i}]"
        key = hook_key(ref)
        if key in seen and seen[key] != ref:
            key = hook_key(ref, hashed=True)
        if key in seen:
            problems.append(
                Problem(
                    type=ConditionType.INVALID,
                    reason="DuplicateHook",
                    message=f"{where}: {describe_ref(namespace, ref)} is already listed "
                    f"(as {describe_ref(namespace, seen[key])})",
                )
            )
            continue
        seen[key] = ref
        values = config_maps.get(ref.name)
        if values is None:
            problems.append(
                Problem(
                    type=ConditionType.CONFIG_MAP_MISSING,
                    reason="ConfigMapNotFound",
                    message=f"{where}: ConfigMap {namespace}/{ref.name} not found",
                )
            )
        elif ref.key not in values:
            problems.append(
                Problem(
                    type=ConditionType.CONFIG_MAP_MISSING,
                    reason="ConfigMapKeyNotFound",
                    message=f"{where}: ConfigMap {namespace}/{ref.name} has no key {ref.key!r}",
                )
            )
        else:
            files.append(HookFile(ref=ref, key=key, source=values[ref.key]))
    return tuple(files), problems


def _block(spec: SettingsSpec, hooks: tuple[HookFile, ...]) -> dict[str, Any]:
    """relay.yaml's keys for this spec, in SETTINGS_KEYS order; unset fields are left out (the relay's
    defaults apply)."""
    block: dict[str, Any] = {}
    if spec.default_binding is not None:
        block["defaultBinding"] = spec.default_binding
    if spec.binding_header is not None:
        block["bindingHeader"] = spec.binding_header
    if spec.hooks is not None:
        rendered: dict[str, Any] = {}
        if hooks:
            rendered["lua"] = [hook.key for hook in hooks]
        if spec.hooks.python:
            rendered["python"] = list(spec.hooks.python)
        if spec.hooks.timeout_ms is not None:
            rendered["timeoutMs"] = spec.hooks.timeout_ms
        if rendered:
            block["hooks"] = rendered
    for key, part in (("upstream", spec.upstream), ("limits", spec.limits)):
        if part is not None:
            values = part.model_dump(by_alias=True, exclude_none=True)
            if values:
                block[key] = values
    return block


def _relay_problems(block: Mapping[str, Any]) -> list[Problem]:
    """What the relay's own models refuse in the block (a check of the same rules as the CRD's, made
    with the code that will read the file)."""
    problems = []
    for key, model in (("hooks", Hooks), ("upstream", UpstreamSettings), ("limits", Limits)):
        if key in block:
            try:
                model.model_validate(block[key])
            except ValidationError as error:
                reason = format_validation_error(error, block[key]).replace("\n", "; ")
                problems.append(
                    Problem(
                        type=ConditionType.INVALID, reason="RejectedByRelay", message=f"spec.{key}: {reason}"
                    )
                )
    return problems


def last_good(previous: Mapping[str, bytes] | None) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The settings part of the rendered Secret in place: its relay.yaml keys and the hook files they
    name. Nothing when there is none, or when its hooks name a file it lacks (never half a set)."""
    if not previous or CONFIG_KEY not in previous:
        return {}, {}
    try:
        data = yaml.safe_load(previous[CONFIG_KEY])
    except yaml.YAMLError:
        return {}, {}
    if not isinstance(data, Mapping):
        return {}, {}
    block = {key: data[key] for key in SETTINGS_KEYS if key in data}
    hooks = block.get("hooks")
    files: dict[str, bytes] = {}
    if isinstance(hooks, Mapping):
        for name in hooks.get("lua") or ():
            if not isinstance(name, str) or name not in previous:
                del block["hooks"]
                return block, {}
            files[name] = previous[name]
    return block, files


def render_settings(
    namespace: str,
    sources: list[SettingsSource],
    hooks: tuple[HookFile, ...],
    problems: list[Problem],
    previous: Mapping[str, bytes] | None,
) -> SettingsPart | None:
    """The settings part of the rendered Secret. `hooks` and `problems`: collect_hooks' result for the
    object named default, with the Lua check's problems added; `previous`: the rendered Secret in place."""
    if not sources:
        return None
    verdicts = {}
    for other in sources:
        if not other.named_default:
            verdicts[other.name] = make_verdict(
                SETTINGS_CONDITIONS,
                generation=other.generation,
                problems=[
                    Problem(
                        type=ConditionType.INVALID, reason="NotDefault", message=SETTINGS_NAME_RULE.message
                    )
                ],
                ready_message="",
                outcome=f"It is not rendered; only {SETTINGS_KIND} {SETTINGS_NAME!r} is.",
            )
    source = next((s for s in sources if s.named_default), None)
    if source is None:
        return SettingsPart(block={}, files={}, owner=None, verdicts=verdicts)
    problems = list(problems)
    block: dict[str, Any] = {}
    if isinstance(source.spec, InvalidSpec):
        problems.insert(
            0,
            Problem(type=ConditionType.INVALID, reason="InvalidSpec", message="; ".join(source.spec.errors)),
        )
    else:
        block = _block(source.spec, hooks)
        problems.extend(_relay_problems(block))
    files = {hook.key: hook.source.encode() for hook in hooks}
    outcome = ""
    if problems:
        block, files = last_good(previous)
        kept = list(block.get("hooks", {}).get("lua") or ())
        outcome = (
            f"Secret {RENDERED_SECRET} keeps the settings last rendered (hooks in force: "
            f"{', '.join(kept) or 'none'})."
        )
    in_force = tuple(block.get("hooks", {}).get("lua") or ())
    verdicts[source.name] = make_verdict(
        SETTINGS_CONDITIONS,
        generation=source.generation,
        problems=problems,
        ready_message=f"rendered into Secret {RENDERED_SECRET} ({CONFIG_KEY} and {len(files)} hook file(s))",
        outcome=outcome,
        hooks=in_force or None,
    )
    return SettingsPart(
        block=block, files=files, owner=owner_reference(SETTINGS_KIND, source), verdicts=verdicts
    )
