"""The custom resources' specs and statuses as typed models: the one source of the CRDs.

The operator parses each object's spec into these models (render.py reads nothing else), and `make crds`
(crdgen.py) writes crds/*.yaml from them: field names, types, limits, patterns, defaults, descriptions
(the field docstrings; `kubectl explain` shows them), the CEL rules and the printer columns. A test fails
when crds/ differs from what the generator writes, so the schema the API server enforces and the one the
operator reads cannot drift apart.

A CEL rule is declared once as a `Rule`: its CEL expression for the API server and the same check in
Python for the operator, with one message for both; tests/operator/test_operator_crds.py checks on the
real API server that the two agree on every combination of the fields they name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.config import JsonDict

from outbound_operator.resources import (
    GROUP_KIND,
    GROUP_PLURAL,
    POLICY_KIND,
    POLICY_PLURAL,
    SETTINGS_KIND,
    SETTINGS_NAME,
    SETTINGS_PLURAL,
)
from outbound_relay.config import AuthType, TlsMode

# A Momentum binding name as the relay, the CRDs and the injector's annotation all take it. 63 characters:
# a binding travels as a header field (`X-Binding: <name>` then fits RFC 5322's recommended 78-character
# line, so no client folds it) and as a Pod annotation and a relay.yaml value; the shape is a Kubernetes
# label value's, which catches a typo (a space, a quote) before mail is routed through the wrong scope.
BINDING_MAX_LENGTH = 63
BINDING_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{BINDING_MAX_LENGTH - 1}}}$"
BINDING_RULE = f"1 to {BINDING_MAX_LENGTH} letters, digits, '_', '-', '.', starting with a letter or digit"
# RFC 1035/1123 host names, with an optional "*." in front: a recipient domain or a wildcard for its
# subdomains.
DOMAIN_PATTERN = (
    r"^(\*\.)?([A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([-A-Za-z0-9]{0,61}[A-Za-z0-9])?\.?$"
)
# What the API server allows as a key of a Secret's data.
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 (a pattern, not a password)
_STRING_CONSTRAINTS = frozenset({"string_pattern_mismatch", "string_too_short", "string_too_long"})


def _explained(what: str) -> WrapValidator:
    """A string that breaks its length or pattern says what it should have been, not the regex."""

    def validate(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as error:
            if not all(item["type"] in _STRING_CONSTRAINTS for item in error.errors()):
                raise
            shown = repr(value) if len(value) <= 80 else f"{value[:77]!r}..."
            raise ValueError(f"{shown} is not {what}") from None

    return WrapValidator(validate)


BindingName = Annotated[
    str,
    Field(max_length=BINDING_MAX_LENGTH, pattern=BINDING_PATTERN),
    _explained(f"a binding name ({BINDING_RULE})"),
]
DomainName = Annotated[
    str,
    Field(max_length=253, pattern=DOMAIN_PATTERN),
    _explained("a domain name or a '*.example.com' wildcard"),
]
ObjectName = Annotated[str, Field(min_length=1, max_length=253)]
# An https URL with a host name (no user:password@, no IPv6 literal), as the relay's tokenUrl takes it.
TOKEN_URL_PATTERN = r"^https://[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?([/?#][!-~]*)?$"  # noqa: S105 (a pattern, not a password)
# RFC 6749 3.3 scope-token: printable ASCII but space, '"' and '\'.
ScopeToken = Annotated[
    str,
    Field(min_length=1, max_length=1024, pattern=r"^[\x21\x23-\x5b\x5d-\x7e]+$"),
    _explained("an OAuth2 scope (RFC 6749 3.3: printable ASCII, no space, '\"' or '\\')"),
]


@dataclass(frozen=True)
class Rule:
    """A rule across fields: `cel` for the API server (x-kubernetes-validations), `holds` for the operator."""

    cel: str
    message: str
    holds: Callable[[Any], bool]


def _add_rules(schema: JsonDict, model: type[Any]) -> None:
    rules: tuple[Rule, ...] = getattr(model, "crd_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [{"rule": r.cel, "message": r.message} for r in rules]


class CrdModel(BaseModel):
    """Frozen; camelCase keys as in the CRD; unknown keys are errors (the API server prunes them, so one
    here is an object stored under an older schema, and the operator says so instead of guessing)."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        json_schema_extra=_add_rules,
    )
    crd_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _rules_hold(self) -> CrdModel:
        broken = [rule.message for rule in self.crd_rules if not rule.holds(self)]
        if broken:
            raise ValueError("; ".join(broken))
        return self


class SecretKeyRef(CrdModel):
    """A key of a Secret in this namespace."""

    name: ObjectName
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)
    """Key in the Secret's data."""


class PolicyScope(CrdModel):
    """Which messages this policy applies to; no key at all is the namespace-wide global scope."""

    crd_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.binding) && has(self.bindingGroup))",
            message="set binding or bindingGroup, not both (a binding already implies its group)",
            holds=lambda s: s.binding is None or s.binding_group is None,
        ),
    )

    domain: DomainName | None = None
    """Recipient domain; "*.example.com" matches its subdomains. Exact beats wildcard."""
    binding: BindingName | None = None
    """Binding of the message: its X-Binding header, else the Pod's outboundrelay.io/binding annotation.
    1 to 63 letters, digits, '_', '-', '.', starting with a letter or digit."""
    binding_group: ObjectName | None = None
    """Name of an OutboundBindingGroup in this namespace."""


class OAuth2(CrdModel):
    """XOAUTH2 only: the relay obtains the access token from a token endpoint (RFC 6749) and refreshes it
    before it expires: with the refresh_token grant when refreshTokenSecretRef is set, else with
    client_credentials (docs/oauth2.md)."""

    crd_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.clientIdSecretRef)",
            message="clientIdSecretRef is required: the token endpoint knows the client by its id",
            holds=lambda s: s.client_id_secret_ref is not None,
        ),
        Rule(
            cel="has(self.refreshTokenSecretRef) || has(self.clientSecretSecretRef)",
            message="set refreshTokenSecretRef (the refresh_token grant) or clientSecretSecretRef "
            "(the client_credentials grant needs the client secret)",
            holds=lambda s: s.refresh_token_secret_ref is not None or s.client_secret_secret_ref is not None,
        ),
    )

    token_url: str = Field(alias="tokenURL", max_length=2048, pattern=TOKEN_URL_PATTERN)
    """Token endpoint (https only), e.g. https://login.microsoftonline.com/<tenant>/oauth2/v2.0/token or
    https://oauth2.googleapis.com/token."""
    client_id_secret_ref: SecretKeyRef | None = None
    """The OAuth2 client id (required)."""
    client_secret_secret_ref: SecretKeyRef | None = None
    """The OAuth2 client secret; left out, a public client (refresh_token grant only)."""
    refresh_token_secret_ref: SecretKeyRef | None = None
    """The OAuth2 refresh token; left out, the client_credentials grant is used."""
    scopes: tuple[ScopeToken, ...] | None = None
    """OAuth2 scopes to request, e.g. https://outlook.office365.com/.default or https://mail.google.com/."""
    ca_secret_ref: SecretKeyRef | None = None
    """PEM CA bundle to verify the token endpoint with, instead of the system's."""


class Gateway(CrdModel):
    """The upstream this scope's mail is relayed to."""

    host: str = Field(min_length=1, max_length=253)
    """Host name or IP address."""
    port: int = Field(ge=1, le=65535)
    """TCP port, e.g. 587 (submission, STARTTLS) or 465 (implicit TLS)."""


class Tls(CrdModel):
    """TLS to the gateway."""

    mode: TlsMode = TlsMode.STARTTLS
    """starttls: STARTTLS is required (no plaintext fallback); implicit: TLS from the first byte (port 465);
    none: no TLS, so AUTH goes in plaintext: only for trusted networks."""
    verify: bool = True
    """Verify the gateway's certificate and host name."""
    ca_secret_ref: SecretKeyRef | None = None
    """PEM CA bundle to verify the upstream with, instead of the system's."""


class PolicySpec(CrdModel):
    """Every setting is optional: as with Momentum's options, each falls back on its own to the nearest
    wider scope that sets it (a global policy may carry only the gateway, a domain policy only the user
    and password)."""

    crd_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!(has(self.user) && has(self.userSecretRef))",
            message="set user or userSecretRef, not both",
            holds=lambda s: s.user is None or s.user_secret_ref is None,
        ),
        Rule(
            cel="!has(self.oauth2) || (has(self.type) && self.type == 'XOAUTH2')",
            message="oauth2 is only valid with type XOAUTH2",
            holds=lambda s: s.oauth2 is None or s.type is AuthType.XOAUTH2,
        ),
        Rule(
            cel="!(has(self.passwordSecretRef) && has(self.oauth2))",
            message="set passwordSecretRef (a password or static XOAUTH2 token) or oauth2, not both",
            holds=lambda s: s.password_secret_ref is None or s.oauth2 is None,
        ),
    )

    scope: PolicyScope | None = None
    """Which messages this policy applies to; left out, the namespace-wide global scope."""
    type: AuthType | None = None
    """SASL mechanism used with the upstream."""
    user: str | None = Field(default=None, min_length=1)
    """The user to authenticate as (for XOAUTH2, the mailbox)."""
    user_secret_ref: SecretKeyRef | None = None
    """The user, from a key of a Secret in this namespace."""
    password_secret_ref: SecretKeyRef | None = None
    """The password (PLAIN, LOGIN) or the access token (XOAUTH2)."""
    oauth2: OAuth2 | None = None
    gateway: Gateway | None = None
    """Upstream to relay to. Left out, the gateway of the nearest wider scope that sets one is used; when
    no scope of a message sets one, the relay defers the message (451 4.3.5). There is no MX lookup: the
    relay only ever delivers to a configured gateway."""
    tls: Tls | None = None
    """TLS to the gateway; left out, the nearest wider scope's, else starttls with verification."""
    max_connections: int | None = Field(default=None, ge=1, le=1000)
    """Most concurrent upstream sessions for this scope (default 4)."""


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(CrdModel):
    """One aspect of the object's state, in the form of Kubernetes' metav1.Condition."""

    type: str
    """Ready, or a problem: SecretMissing, Invalid, Conflict."""
    status: ConditionStatus
    reason: str | None = None
    """A CamelCase word for machines, e.g. SecretNotFound."""
    message: str | None = None
    """What happened and what the relay does about it; never a secret's value."""
    observed_generation: int | None = Field(default=None, json_schema_extra={"format": "int64"})
    last_transition_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})


Conditions = Annotated[
    tuple[Condition, ...],
    Field(json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
]


class GroupStatus(CrdModel):
    """Written by outbound-operator."""

    observed_generation: int | None = Field(default=None, json_schema_extra={"format": "int64"})
    """The metadata.generation the conditions are about."""
    conditions: Conditions | None = None
    """Ready first, then each problem condition, always all of them."""


class PolicyStatus(GroupStatus):
    """Written by outbound-operator."""

    resolved_scope: str | None = None
    """The scope as the relay reads it, e.g. "domain=sparkpost.com" or "global"."""
    pods_without_sidecar: int | None = Field(default=None, ge=1, json_schema_extra={"format": "int32"})
    """Pods of this namespace annotated outboundrelay.io/inject: "true" that run without the relay sidecar
    (admitted while no operator replica answered the injection webhook); their mail fails until they are
    recreated. Counted every 30 s; absent when there are none."""


class OutboundAuthPolicy(CrdModel):
    """Outbound SMTP authentication for one scope (domain, binding, binding group, or the whole namespace),
    as Momentum's outbound_smtp_auth module configures it per Domain/Binding stanza."""

    spec: PolicySpec
    status: PolicyStatus | None = None


class GroupSpec(CrdModel):
    """The group's name is the object's name; an OutboundAuthPolicy's scope.bindingGroup refers to it."""

    bindings: Annotated[tuple[BindingName, ...], Field(json_schema_extra={"x-kubernetes-list-type": "set"})]
    """Bindings in this group; a binding belongs to at most one group (the older group keeps it)."""


class OutboundBindingGroup(CrdModel):
    """Which bindings form a group, as Momentum's `Binding_Group "x" { Binding "a" {} }`."""

    spec: GroupSpec
    status: GroupStatus | None = None


# A ConfigMap's keys take the same shape as a Secret's.
ConfigMapKey = Annotated[str, Field(min_length=1, max_length=253, pattern=SECRET_KEY_PATTERN)]
# relay.yaml's `hooks.python` entries: `package.module:function` (ASCII here: the API server's regex
# engine reads `\w` as ASCII, Python's as Unicode).
PYTHON_HOOK_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"
# The relay's `bindingHeader`: a header field name, printable ASCII but ":" (RFC 5322 3.6.8).
HEADER_NAME_PATTERN = r"^[!-9;-~]+$"


class ConfigMapKeyRef(CrdModel):
    """A key of a ConfigMap in this namespace."""

    name: ObjectName
    """Name of the ConfigMap."""
    key: ConfigMapKey
    """Key in the ConfigMap's data, e.g. auth.lua."""


class LuaHookSource(CrdModel):
    """Where one Lua hook file comes from."""

    config_map_ref: ConfigMapKeyRef
    """The ConfigMap key holding the Lua source (UTF-8 text)."""


class HooksSpec(CrdModel):
    """relay.yaml's `hooks` block (docs/hooks.md): Lua files first, in list order, then Python functions."""

    lua: Annotated[tuple[LuaHookSource, ...], Field(max_length=32)] | None = None
    """Lua hook files, each from a ConfigMap key. The operator compiles and loads each one with the
    relay's own sandbox before rendering it; one that fails leaves the hooks last rendered in force."""
    python: (
        Annotated[
            tuple[Annotated[str, Field(max_length=512, pattern=PYTHON_HOOK_PATTERN)], ...],
            Field(max_length=32),
        ]
        | None
    ) = None
    """Python hook functions as 'package.module:function'; the module must be installed in the relay's
    image."""
    timeout_ms: int | None = Field(default=None, ge=1, le=10_000)
    """Per hook call, in milliseconds (relay default 50)."""


class UpstreamSpec(CrdModel):
    """relay.yaml's `upstream` block: timeouts and the default pool size towards every gateway."""

    connect_timeout_seconds: float | None = Field(default=None, ge=0.001, le=3600)
    """TCP connect and TLS handshake, in seconds (relay default 10)."""
    timeout_seconds: float | None = Field(default=None, ge=0.001, le=3600)
    """Each upstream reply but the one to the end of DATA, in seconds (relay default 60)."""
    idle_timeout_seconds: float | None = Field(default=None, ge=0.001, le=3600)
    """An idle pooled upstream session is closed after this many seconds (relay default 30)."""
    data_timeout_seconds: float | None = Field(default=None, ge=0.001, le=3600)
    """Sending the message body and waiting for the reply to its end, in seconds (relay default 600, as
    RFC 5321 4.5.3.2 asks)."""
    default_max_connections: int | None = Field(default=None, ge=1, le=1000)
    """Concurrent upstream sessions per scope whose policy sets no maxConnections (relay default 4)."""


class LimitsSpec(CrdModel):
    """relay.yaml's `limits` block: what one client may ask of the relay."""

    message_size_bytes: int | None = Field(default=None, ge=65_536, le=1 << 30)
    """Largest message, advertised as SIZE (relay default 10240000)."""
    recipients_per_transaction: int | None = Field(default=None, ge=1, le=10_000)
    """Recipients accepted per transaction; more get 452 (relay default 100)."""
    sessions: int | None = Field(default=None, ge=1, le=10_000)
    """Concurrent client sessions; one more is answered 421 (relay default 100)."""


class SettingsSpec(CrdModel):
    """What relay.yaml sets outside its policies, for every relay sidecar of this namespace. Every field is
    optional; one left out keeps the relay's default."""

    hooks: HooksSpec | None = None
    """Per-message hooks (docs/hooks.md)."""
    default_binding: BindingName | None = None
    """Binding of a message with no X-Binding header and no Pod annotation (relay default "default")."""
    binding_header: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=HEADER_NAME_PATTERN
    )
    """Header field that carries a message's binding (relay default X-Binding)."""
    upstream: UpstreamSpec | None = None
    """Upstream timeouts and pool size."""
    limits: LimitsSpec | None = None
    """Limits on what the app may submit."""


class SettingsStatus(GroupStatus):
    """Written by outbound-operator."""

    hooks: tuple[str, ...] | None = None
    """The hook files in force: the rendered Secret's keys, in call order (the last good ones while the
    spec's cannot be rendered)."""


def _named_default(body: Any) -> bool:
    return isinstance(body, Mapping) and _mapping(body.get("metadata")).get("name") == SETTINGS_NAME


class OutboundRelaySettings(CrdModel):
    """Relay-wide settings of this namespace's relay sidecars: hooks, default binding, binding header,
    upstream timeouts, limits. At most one per namespace, named "default"."""

    spec: SettingsSpec
    status: SettingsStatus | None = None


@dataclass(frozen=True, kw_only=True)
class InvalidSpec:
    """A spec the models refuse (stored before a schema change, or written past the API server's checks).

    `scope` is the spec's scope when that part is valid, so the operator can still defer that scope's mail
    instead of letting it fall back to a wider scope's credentials."""

    errors: tuple[str, ...]  # "spec.gateway.port: Input should be less than or equal to 65535"
    scope: PolicyScope | None = None


def describe_errors(error: ValidationError, prefix: str = "spec") -> tuple[str, ...]:
    """Each problem as "<field path>: <what is wrong>", the path as the object spells it."""
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        path = ".".join([prefix, *(f"[{p}]" if isinstance(p, int) else str(p) for p in item["loc"])])
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field (not in this CRD version; check its spelling)"
        lines.append(f"{path.replace('.[', '[')}: {message}")
    return tuple(lines)


def _mapping(raw: object) -> Mapping[str, Any]:
    return raw if isinstance(raw, Mapping) else {}


def parse_policy_spec(raw: object) -> PolicySpec | InvalidSpec:
    try:
        return PolicySpec.model_validate(raw if raw is not None else {})
    except ValidationError as error:
        scope: PolicyScope | None
        try:
            scope = PolicyScope.model_validate(_mapping(raw).get("scope") or {})
        except ValidationError:
            scope = None
        return InvalidSpec(errors=describe_errors(error), scope=scope)


def parse_group_spec(raw: object) -> GroupSpec | InvalidSpec:
    try:
        return GroupSpec.model_validate(raw if raw is not None else {})
    except ValidationError as error:
        return InvalidSpec(errors=describe_errors(error))


def parse_settings_spec(raw: object) -> SettingsSpec | InvalidSpec:
    try:
        return SettingsSpec.model_validate(raw if raw is not None else {})
    except ValidationError as error:
        return InvalidSpec(errors=describe_errors(error))


@dataclass(frozen=True, kw_only=True)
class PrinterColumn:
    """A column of `kubectl get` (additionalPrinterColumns); priority 1 shows only with `-o wide`."""

    name: str
    json_path: str
    type: Literal["string", "integer", "number", "boolean", "date"] = "string"
    priority: int = 0


@dataclass(frozen=True, kw_only=True)
class CustomResource:
    """What a CRD says besides the schema (the model's): its names and printer columns."""

    kind: str
    plural: str
    model: type[CrdModel]
    short_names: tuple[str, ...] = ()
    columns: tuple[PrinterColumn, ...]
    object_rules: tuple[Rule, ...] = ()
    """Rules on the whole object (its metadata.name), at the schema's root; `holds` takes the object as
    the API returns it."""


_READY = '.status.conditions[?(@.type=="Ready")]'

POLICY_RESOURCE = CustomResource(
    kind=POLICY_KIND,
    plural=POLICY_PLURAL,
    model=OutboundAuthPolicy,
    short_names=("oap",),
    columns=(
        PrinterColumn(name="Scope", json_path=".status.resolvedScope"),
        PrinterColumn(name="Type", json_path=".spec.type"),
        PrinterColumn(name="User", json_path=".spec.user"),
        PrinterColumn(name="Ready", json_path=f"{_READY}.status"),
        PrinterColumn(name="Pods Without Sidecar", json_path=".status.podsWithoutSidecar", type="integer"),
        PrinterColumn(name="Reason", json_path=f"{_READY}.reason", priority=1),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    ),
)
GROUP_RESOURCE = CustomResource(
    kind=GROUP_KIND,
    plural=GROUP_PLURAL,
    model=OutboundBindingGroup,
    columns=(
        PrinterColumn(name="Bindings", json_path=".spec.bindings"),
        PrinterColumn(name="Ready", json_path=f"{_READY}.status"),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    ),
)
SETTINGS_NAME_RULE = Rule(
    cel=f"self.metadata.name == '{SETTINGS_NAME}'",
    message=f"an {SETTINGS_KIND} must be named {SETTINGS_NAME!r}: there is at most one per namespace",
    holds=_named_default,
)
SETTINGS_RESOURCE = CustomResource(
    kind=SETTINGS_KIND,
    plural=SETTINGS_PLURAL,
    model=OutboundRelaySettings,
    short_names=("ors",),
    columns=(
        PrinterColumn(name="Ready", json_path=f"{_READY}.status"),
        PrinterColumn(name="Reason", json_path=f"{_READY}.reason"),
        PrinterColumn(name="Hooks", json_path=".status.hooks"),
        PrinterColumn(name="Age", json_path=".metadata.creationTimestamp", type="date"),
    ),
    object_rules=(SETTINGS_NAME_RULE,),
)
RESOURCES = (POLICY_RESOURCE, GROUP_RESOURCE, SETTINGS_RESOURCE)
