"""Render one namespace's policies, binding groups and Secret values into the relay's `relay.yaml`.

Pure: no cluster access, no clock. The same inputs give the same bytes, so the operator writes the
rendered Secret only when its content changes and a restarted operator converges byte for byte.

Rules (docs/operator.md):
- Two policies with one scope: the older (creationTimestamp, then name) holds it; the other is not
  rendered and gets `Conflict`. The same for a binding claimed by two binding groups.
- A policy whose Secrets are missing, or whose settings cannot be had, is rendered `suspended` with no
  settings at all, so the relay defers its scope's mail instead of falling back to a wider scope's
  credentials (outbound_relay.scopes.ScopeIndex). One broken policy never touches another's settings.
- Specs are read through the typed models of crd_models.py, parsed once per object (`from_body`); one the
  models refuse is `Invalid` (reason InvalidSpec, the message names each field), and suspended when its
  scope is still known.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import yaml
from pydantic import ValidationError

from outbound_operator.crd_models import (
    GroupSpec,
    InvalidSpec,
    PolicySpec,
    SecretKeyRef,
    parse_group_spec,
    parse_policy_spec,
)
from outbound_operator.resources import API_VERSION, CONFIG_KEY, POLICY_KIND, RENDERED_SECRET
from outbound_relay.config import (
    ConfigError,
    Policy,
    RelayConfig,
    Scope,
    format_validation_error,
    parse_config,
)

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"

# libyaml's emitter when PyYAML has it (5x faster at 1,000 policies); both emit the same bytes for this
# data (tests/operator/test_operator_render.py checks), so a rebuilt image does not rewrite every Secret.
YAML_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
YAML_STYLE: dict[str, Any] = {
    "sort_keys": False,
    "allow_unicode": True,
    "default_flow_style": False,
    "width": 1 << 16,
}


class ConditionType(StrEnum):
    READY = "Ready"
    SECRET_MISSING = "SecretMissing"  # noqa: S105 (a condition type, not a password)
    INVALID = "Invalid"
    CONFLICT = "Conflict"
    CONFIG_MAP_MISSING = "ConfigMapMissing"


POLICY_CONDITIONS = (
    ConditionType.READY,
    ConditionType.SECRET_MISSING,
    ConditionType.INVALID,
    ConditionType.CONFLICT,
)
GROUP_CONDITIONS = (ConditionType.READY, ConditionType.INVALID, ConditionType.CONFLICT)

# Reason of a problem condition when it is False.
_CLEAR_REASONS = {
    ConditionType.SECRET_MISSING: "SecretsFound",
    ConditionType.INVALID: "Valid",
    ConditionType.CONFLICT: "NoConflict",
    ConditionType.CONFIG_MAP_MISSING: "ConfigMapsFound",
}


@dataclass(frozen=True, kw_only=True)
class SettingsPart:
    """What an OutboundRelaySettings adds to the rendered Secret (built by relay_settings.py)."""

    block: dict[str, Any]  # relay.yaml's keys outside policies: hooks, defaultBinding, upstream, limits...
    files: dict[str, bytes]  # the hook files, by Secret key
    owner: dict[str, Any] | None  # its ownerReference
    verdicts: dict[str, Verdict]  # by object name


class RenderError(RuntimeError):
    """The namespace's config could not be assembled; the rendered Secret in place is kept."""


@dataclass(frozen=True, kw_only=True)
class ObjectMeta:
    """The metadata rendering reads."""

    name: str
    uid: str
    created: str  # metadata.creationTimestamp (RFC 3339, UTC: sorts in time order)
    generation: int

    @staticmethod
    def fields_of(body: Mapping[str, Any]) -> dict[str, Any]:
        """These fields from an object as the API returns it, as keyword arguments."""
        metadata = body.get("metadata") or {}
        return {
            "name": str(metadata["name"]),
            "uid": str(metadata.get("uid", "")),
            "created": str(metadata.get("creationTimestamp", "")),
            "generation": int(metadata.get("generation", 0)),
        }

    @property
    def age_key(self) -> tuple[str, str]:
        return (self.created, self.name)


@dataclass(frozen=True, kw_only=True)
class PolicySource(ObjectMeta):
    """An OutboundAuthPolicy as rendering reads it: its spec parsed once, or why it could not be."""

    spec: PolicySpec | InvalidSpec

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> PolicySource:
        return cls(**cls.fields_of(body), spec=parse_policy_spec(body.get("spec")))

    def secret_refs(self) -> dict[str, SecretKeyRef]:
        """The Secret keys this policy reads, by the field that names them (none for an invalid spec:
        it renders no settings)."""
        spec = self.spec
        if isinstance(spec, InvalidSpec):
            return {}
        refs = {"userSecretRef": spec.user_secret_ref, "passwordSecretRef": spec.password_secret_ref}
        refs["tls.caSecretRef"] = spec.tls.ca_secret_ref if spec.tls is not None else None
        if spec.oauth2 is not None:
            refs["oauth2.clientIdSecretRef"] = spec.oauth2.client_id_secret_ref
            refs["oauth2.clientSecretSecretRef"] = spec.oauth2.client_secret_secret_ref
            refs["oauth2.refreshTokenSecretRef"] = spec.oauth2.refresh_token_secret_ref
            refs["oauth2.caSecretRef"] = spec.oauth2.ca_secret_ref
        return {path: ref for path, ref in refs.items() if ref is not None}


@dataclass(frozen=True, kw_only=True)
class BindingGroupSource(ObjectMeta):
    spec: GroupSpec | InvalidSpec

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> BindingGroupSource:
        return cls(**cls.fields_of(body), spec=parse_group_spec(body.get("spec")))


def referenced_secrets(policies: Iterable[PolicySource]) -> frozenset[str]:
    """Names of the Secrets the policies read: the index that decides which Secret events matter."""
    return frozenset(ref.name for policy in policies for ref in policy.secret_refs().values())


@dataclass(frozen=True, kw_only=True)
class Condition:
    type: ConditionType
    status: bool
    reason: str
    message: str


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """What rendering concluded about one object: its conditions, in a fixed order."""

    generation: int
    conditions: tuple[Condition, ...]
    resolved_scope: str | None = None
    hooks: tuple[str, ...] | None = None  # OutboundRelaySettings: the hook files in force

    @property
    def ready(self) -> Condition:
        return self.conditions[0]

    def condition(self, kind: ConditionType) -> Condition:
        return next(c for c in self.conditions if c.type is kind)


@dataclass(frozen=True, kw_only=True)
class Problem:
    type: ConditionType
    reason: str
    message: str


def make_verdict(
    kinds: tuple[ConditionType, ...],
    *,
    generation: int,
    problems: list[Problem],
    ready_message: str,
    outcome: str = "",
    resolved_scope: str | None = None,
    hooks: tuple[str, ...] | None = None,
) -> Verdict:
    """Ready is True without problems; otherwise it carries the first problem's reason and every message,
    followed by `outcome` (what the relay does about it)."""
    if problems:
        summary = "; ".join(p.message for p in problems)
        ready = Condition(
            type=ConditionType.READY,
            status=False,
            reason=problems[0].reason,
            message=f"{summary}. {outcome}".strip(),
        )
    else:
        ready = Condition(type=ConditionType.READY, status=True, reason="Rendered", message=ready_message)
    conditions = [ready]
    for kind in kinds[1:]:
        mine = [p for p in problems if p.type is kind]
        if mine:
            message = "; ".join(p.message for p in mine)
            conditions.append(Condition(type=kind, status=True, reason=mine[0].reason, message=message))
        else:
            conditions.append(Condition(type=kind, status=False, reason=_CLEAR_REASONS[kind], message=""))
    return Verdict(
        generation=generation, conditions=tuple(conditions), resolved_scope=resolved_scope, hooks=hooks
    )


def not_written(verdicts: Mapping[str, Verdict], *, reason: str, message: str) -> dict[str, Verdict]:
    """The verdicts as they stand when the rendered Secret could not be written: Ready is False with
    `reason` for every object (the relay still has the old config), the other conditions as rendered."""
    result = {}
    for name, verdict in verdicts.items():
        ready = Condition(type=ConditionType.READY, status=False, reason=reason, message=message)
        result[name] = replace(verdict, conditions=(ready, *verdict.conditions[1:]))
    return result


@dataclass(frozen=True, kw_only=True)
class Rendering:
    """The rendered Secret's content and owners, and a verdict for every policy, binding group and
    OutboundRelaySettings."""

    data: dict[str, bytes]  # Secret keys: relay.yaml, ca-<sha256 prefix>.pem (one per CA), hook-*.lua; sorted
    owners: tuple[dict[str, Any], ...]  # ownerReferences: every policy, and the settings, of the namespace
    policies: dict[str, Verdict]  # by object name
    groups: dict[str, Verdict]
    config: RelayConfig = field(repr=False)
    settings: dict[str, Verdict] = field(default_factory=dict)


def _secret_value(
    namespace: str, ref: SecretKeyRef, secrets: Mapping[str, Mapping[str, bytes]]
) -> tuple[bytes | None, Problem | None]:
    if ref.name == RENDERED_SECRET:
        # It holds every policy's password: naming it would send them all to this policy's gateway (and
        # nest the file in itself at each resync). The admission check refuses it; a policy stored before
        # that check existed is suspended here.
        return None, Problem(
            type=ConditionType.INVALID,
            reason="RenderedSecretReferenced",
            message=f"Secret {namespace}/{RENDERED_SECRET} is the one the operator renders; no policy may "
            "name it",
        )
    values = secrets.get(ref.name)
    if values is None:
        return None, Problem(
            type=ConditionType.SECRET_MISSING,
            reason="SecretNotFound",
            message=f"Secret {namespace}/{ref.name} not found",
        )
    if ref.key not in values:
        return None, Problem(
            type=ConditionType.SECRET_MISSING,
            reason="SecretKeyNotFound",
            message=f"Secret {namespace}/{ref.name} has no key {ref.key!r}",
        )
    return values[ref.key], None


def _text(namespace: str, ref: SecretKeyRef, raw: bytes) -> tuple[str | None, Problem | None]:
    """A user or password from a Secret; one trailing newline ("\n" or "\r\n") is dropped, as the relay
    does with passwordFile (`kubectl create secret --from-file` keeps the file's newline); any other
    whitespace is part of the value."""
    where = f"Secret {namespace}/{ref.name} key {ref.key!r}"
    try:
        text = raw.decode("utf-8")
        text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    except UnicodeDecodeError:
        return None, Problem(
            type=ConditionType.INVALID, reason="InvalidSecretValue", message=f"{where} is not UTF-8"
        )
    if not text:
        return None, Problem(
            type=ConditionType.INVALID, reason="InvalidSecretValue", message=f"{where} is empty"
        )
    return text, None


def ca_key(pem: bytes) -> str:
    """The rendered Secret's key for a CA bundle; relay.yaml names it relative to itself. Keyed by content
    (a CA certificate is public), so policies that share a CA share one copy: the Secret's 1 MiB limit
    would otherwise be reached with a few dozen policies of one big bundle."""
    return f"ca-{hashlib.sha256(pem).hexdigest()[:16]}.pem"


def _text_of(
    namespace: str,
    ref: SecretKeyRef,
    secrets: Mapping[str, Mapping[str, bytes]],
    problems: list[Problem],
) -> str | None:
    """The text of a Secret key (see `_text`), or None with the reason added to `problems`."""
    raw, missing = _secret_value(namespace, ref, secrets)
    if missing is not None:
        problems.append(missing)
        return None
    assert raw is not None
    text, bad = _text(namespace, ref, raw)
    if bad is not None:
        problems.append(bad)
    return text


def _add_ca(
    namespace: str,
    ref: SecretKeyRef | None,
    secrets: Mapping[str, Mapping[str, bytes]],
    block: dict[str, Any],
    files: dict[str, bytes],
    problems: list[Problem],
) -> None:
    """A CA bundle from a Secret: a file of the rendered Secret, named in `block` as `caFile` relative to
    relay.yaml (the relay reads it from the same mounted directory)."""
    if ref is None:
        return
    raw, missing = _secret_value(namespace, ref, secrets)
    if missing is not None:
        problems.append(missing)
    elif raw is None or PEM_CERTIFICATE not in raw:
        problems.append(
            Problem(
                type=ConditionType.INVALID,
                reason="InvalidSecretValue",
                message=f"Secret {namespace}/{ref.name} key {ref.key!r} holds no PEM certificate",
            )
        )
    else:
        key = ca_key(raw)
        files[key] = raw
        block["caFile"] = key


@dataclass
class _PolicyOutcome:
    entry: dict[str, Any] | None = None  # the relay.yaml policy, if rendered
    files: dict[str, bytes] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    outcome: str = ""
    scope: Scope | None = None


def _invalid_spec(spec: InvalidSpec) -> Problem:
    return Problem(type=ConditionType.INVALID, reason="InvalidSpec", message="; ".join(spec.errors))


def _settings(
    namespace: str, source: PolicySource, secrets: Mapping[str, Mapping[str, bytes]]
) -> tuple[dict[str, Any], dict[str, bytes], list[Problem]]:
    """The policy's relay.yaml settings (after name and scope), the extra files, and what is wrong."""
    spec = source.spec
    if isinstance(spec, InvalidSpec):
        return {}, {}, [_invalid_spec(spec)]
    problems: list[Problem] = []
    settings: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    refs = source.secret_refs()
    if spec.type is not None:
        settings["type"] = spec.type.value
    if spec.user is not None:
        settings["user"] = spec.user
    for path, setting in (("userSecretRef", "user"), ("passwordSecretRef", "password")):
        if path in refs:
            text = _text_of(namespace, refs[path], secrets, problems)
            if text is not None:
                settings[setting] = text
    if spec.gateway is not None:
        settings["gateway"] = {"host": spec.gateway.host, "port": spec.gateway.port}
    if spec.tls is not None:
        rendered_tls: dict[str, Any] = {"mode": spec.tls.mode.value, "verify": spec.tls.verify}
        _add_ca(namespace, refs.get("tls.caSecretRef"), secrets, rendered_tls, files, problems)
        settings["tls"] = rendered_tls
    if spec.max_connections is not None:
        settings["maxConnections"] = spec.max_connections
    if spec.oauth2 is not None:
        # The relay's oauth2 block, the client id, secret and refresh token inline as the password is:
        # the rendered Secret is as confidential as the Secrets they come from.
        oauth2: dict[str, Any] = {"tokenUrl": spec.oauth2.token_url}
        for path, setting in (
            ("oauth2.clientIdSecretRef", "clientId"),
            ("oauth2.clientSecretSecretRef", "clientSecret"),
            ("oauth2.refreshTokenSecretRef", "refreshToken"),
        ):
            if path in refs:
                text = _text_of(namespace, refs[path], secrets, problems)
                if text is not None:
                    oauth2[setting] = text
        if spec.oauth2.scopes is not None:
            oauth2["scopes"] = list(spec.oauth2.scopes)
        _add_ca(namespace, refs.get("oauth2.caSecretRef"), secrets, oauth2, files, problems)
        settings["oauth2"] = oauth2
    return settings, files, problems


def _scope_data(scope: Scope) -> dict[str, str]:
    data = {"domain": scope.domain, "binding": scope.binding, "bindingGroup": scope.binding_group}
    return {k: v for k, v in data.items() if v is not None}


def _render_policy(
    namespace: str,
    source: PolicySource,
    secrets: Mapping[str, Mapping[str, bytes]],
    groups: Mapping[str, tuple[str, ...]],
    holders: dict[Scope, str],
) -> _PolicyOutcome:
    result = _PolicyOutcome()
    name = f"{namespace}/{source.name}"
    typed_scope = source.spec.scope
    if typed_scope is None and isinstance(source.spec, InvalidSpec):
        message = "; ".join(source.spec.errors)
        result.problems.append(Problem(type=ConditionType.INVALID, reason="InvalidScope", message=message))
        result.outcome = "The policy is not rendered."
        return result
    raw_scope = typed_scope.model_dump(by_alias=True, exclude_none=True) if typed_scope is not None else {}
    try:
        scope = Scope.model_validate(raw_scope)  # the relay's reading: normalised, as relay.yaml has it
    except ValidationError as error:
        reason = format_validation_error(error, raw_scope).replace("\n", "; ")
        result.problems.append(
            Problem(type=ConditionType.INVALID, reason="InvalidScope", message=f"spec.scope: {reason}")
        )
        result.outcome = "The policy is not rendered."
        return result
    result.scope = scope
    settings, files, problems = _settings(namespace, source, secrets)
    result.problems.extend(problems)
    if scope.binding_group is not None and scope.binding_group not in groups:
        result.problems.insert(
            0,
            Problem(
                type=ConditionType.INVALID,
                reason="UnknownBindingGroup",
                message=f"scope.bindingGroup {scope.binding_group!r} is not declared by an "
                f"OutboundBindingGroup in namespace {namespace}",
            ),
        )
        result.outcome = (
            "The policy is not rendered: no binding is in that group, so no mail uses this scope."
        )
        return result
    holder = holders.get(scope)
    if holder is not None:
        result.problems.insert(
            0,
            Problem(
                type=ConditionType.CONFLICT,
                reason="ScopeTaken",
                message=f"scope {scope.describe()} is held by the older policy {holder}",
            ),
        )
        result.outcome = f"The policy is not rendered; {holder} applies to this scope."
        return result
    holders[scope] = name
    entry: dict[str, Any] = {"name": name, "scope": _scope_data(scope)}
    if not result.problems:
        candidate = {**entry, **settings}
        try:
            Policy.model_validate(candidate)
        except ValidationError as error:
            reason = format_validation_error(error, candidate).replace("\n", "; ")
            result.problems.append(
                Problem(type=ConditionType.INVALID, reason="RejectedByRelay", message=reason)
            )
        else:
            result.entry, result.files = candidate, files
            return result
    # Suspended: the relay defers this scope's mail (4xx) and falls back to no other policy's settings.
    reason = "; ".join(p.message for p in result.problems)
    result.entry = {**entry, "suspended": reason}
    result.outcome = (
        f"The policy is rendered suspended: mail in scope {scope.describe()} is deferred with a temporary "
        "failure (4xx) until this is fixed; it is not sent with a wider scope's credentials."
    )
    return result


def _render_groups(
    groups: Iterable[BindingGroupSource],
) -> tuple[dict[str, tuple[str, ...]], dict[str, Verdict]]:
    group_of: dict[str, str] = {}
    rendered: dict[str, tuple[str, ...]] = {}
    verdicts: dict[str, Verdict] = {}
    for group in sorted(groups, key=lambda g: g.age_key):
        if isinstance(group.spec, InvalidSpec):
            verdicts[group.name] = make_verdict(
                GROUP_CONDITIONS,
                generation=group.generation,
                problems=[_invalid_spec(group.spec)],
                ready_message="",
                outcome="The group is not rendered: its bindings belong to no group.",
            )
            continue
        problems = []
        kept = []
        for binding in sorted(set(group.spec.bindings)):
            if binding in group_of:
                problems.append(
                    Problem(
                        type=ConditionType.CONFLICT,
                        reason="BindingTaken",
                        message=f"binding {binding!r} is in the older group {group_of[binding]}",
                    )
                )
            else:
                group_of[binding] = group.name
                kept.append(binding)
        rendered[group.name] = tuple(kept)
        verdicts[group.name] = make_verdict(
            GROUP_CONDITIONS,
            generation=group.generation,
            problems=problems,
            ready_message=f"rendered into Secret {RENDERED_SECRET} with {len(kept)} binding(s)",
            outcome="Those bindings stay in the older group.",
        )
    return dict(sorted(rendered.items())), verdicts


def owner_reference(kind: str, source: ObjectMeta) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": source.name,
        "uid": source.uid,
        "controller": False,
        "blockOwnerDeletion": False,
    }


def owner_references(policies: Iterable[PolicySource]) -> tuple[dict[str, Any], ...]:
    """Every policy owns the rendered Secret: it lives while any policy does, whichever is deleted."""
    return tuple(owner_reference(POLICY_KIND, p) for p in sorted(policies, key=lambda p: p.name))


def dump_yaml(namespace: str, data: Mapping[str, Any]) -> bytes:
    header = (
        f"# Rendered by outbound-operator from the OutboundAuthPolicy, OutboundBindingGroup and\n"
        f"# OutboundRelaySettings objects of namespace {namespace}. Do not edit: the operator rewrites it.\n"
    )
    body: str = yaml.dump(dict(data), Dumper=YAML_DUMPER, **YAML_STYLE)
    return (header + body).encode()


def render_namespace(
    namespace: str,
    policies: Iterable[PolicySource],
    groups: Iterable[BindingGroupSource],
    secrets: Mapping[str, Mapping[str, bytes]],
    settings: SettingsPart | None = None,
) -> Rendering:
    """`secrets`: Secret name -> key -> value, for the Secrets that exist; a name absent is missing.
    `settings`: the OutboundRelaySettings' part of relay.yaml and its hook files (relay_settings.py)."""
    policies = sorted(policies, key=lambda p: p.age_key)
    binding_groups, group_verdicts = _render_groups(groups)
    holders: dict[Scope, str] = {}
    entries: list[dict[str, Any]] = []
    files: dict[str, bytes] = {}
    verdicts: dict[str, Verdict] = {}
    for source in policies:
        outcome = _render_policy(namespace, source, secrets, binding_groups, holders)
        if outcome.entry is not None:
            entries.append(outcome.entry)
            files.update(outcome.files)
        verdicts[source.name] = make_verdict(
            POLICY_CONDITIONS,
            generation=source.generation,
            problems=outcome.problems,
            ready_message=f"rendered into Secret {RENDERED_SECRET} ({CONFIG_KEY}) as policy "
            f"{namespace}/{source.name}",
            outcome=outcome.outcome,
            resolved_scope=outcome.scope.describe() if outcome.scope is not None else None,
        )
    data: dict[str, Any] = dict(settings.block) if settings is not None else {}
    if settings is not None:
        files.update(settings.files)
    if binding_groups:
        data["bindingGroups"] = {name: list(bindings) for name, bindings in binding_groups.items()}
    data["policies"] = sorted(entries, key=lambda e: str(e["name"]))
    try:
        config = parse_config(data, source=f"{namespace}/{RENDERED_SECRET} {CONFIG_KEY}")
    except ConfigError as error:
        # Each policy was validated on its own and scopes made unique, so this is a bug, not user error.
        raise RenderError(str(error)) from None
    rendered = {CONFIG_KEY: dump_yaml(namespace, data), **files}
    owners = owner_references(policies)
    if settings is not None and settings.owner is not None:
        owners = (*owners, settings.owner)
    return Rendering(
        data=dict(sorted(rendered.items())),
        owners=owners,
        policies=verdicts,
        groups=group_verdicts,
        config=config,
        settings=dict(settings.verdicts) if settings is not None else {},
    )
