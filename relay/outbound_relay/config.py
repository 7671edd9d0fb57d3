"""The `relay.yaml` model: the contract between the operator and the relay (docs/relay-config.md).

Keys are camelCase as docs/relay-config.md writes them, and are also accepted case-insensitively, with
`_` or `-` between words, and in Momentum's spelling (`Outbound_SMTP_AUTH_user`), so a stanza carried
over from `ecelerity.conf` reads as it did there. Unknown keys are errors: a typo must never silently
drop a setting.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

# The option names of Momentum's outbound_smtp_auth; they map onto our fields in every model that has them.
MOMENTUM_KEYS = {
    "outboundsmtpauthtype": "type",
    "outboundsmtpauthuser": "user",
    "outboundsmtpauthpass": "password",
}
CONTEXT_KEYS = ("outbound_smtp_auth_type", "outbound_smtp_auth_user", "outbound_smtp_auth_pass")

_DOMAIN_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HOOK_REF = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 3.3 scope-token


class ConfigError(ValueError):
    """A relay config that cannot be used; the message names each bad key and why."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fold(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


class Model(BaseModel):
    """Frozen, strict about unknown keys, and forgiving about the case and spelling of known ones."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    _extra_aliases: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _canonical_keys(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        known: dict[str, str] = {}
        for name, field in cls.model_fields.items():
            # The documented (camelCase) spelling, so that errors name the key as the user wrote it.
            known[_fold(name)] = known[_fold(field.alias or name)] = field.alias or name
        for alias, name in cls._extra_aliases.items():
            known[_fold(alias)] = name
        out: dict[str, Any] = {}
        seen: dict[str, str] = {}
        for key, value in data.items():
            name = known.get(_fold(str(key)), str(key))
            if name in seen:
                raise ValueError(f"{key!r} and {seen[name]!r} set the same setting; keep one")
            seen[name] = str(key)
            out[name] = value
        return out


class Endpoint(Model):
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)


class ClientAuth(StrEnum):
    """What the listener does with AUTH from the app (docs/relay-config.md, `listen.clientAuth`)."""

    ACCEPT = "accept"  # offer AUTH PLAIN / LOGIN, accept any credentials, use none of them
    BINDING = "binding"  # as accept, and the AUTH user names the message's binding
    NONE = "none"  # offer no AUTH


class ListenTls(Model):
    """The certificate the listener offers STARTTLS with; paths are relative to relay.yaml."""

    cert_file: Path = Field(alias="certFile")
    key_file: Path = Field(alias="keyFile")


class ListenConfig(Endpoint):
    """Where the app submits mail. Loopback only: an open listener would relay anyone's mail with our
    credentials, and the sidecar shares the Pod's network namespace with the app."""

    host: str = "127.0.0.1"
    port: int = Field(default=2525, ge=0, le=65535)  # 0: any free port (tests)
    client_auth: ClientAuth = Field(default=ClientAuth.ACCEPT, alias="clientAuth")
    tls: ListenTls | None = None  # STARTTLS offered only when set

    @field_validator("client_auth", mode="before")
    @classmethod
    def _client_auth(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("host")
    @classmethod
    def _loopback(cls, host: str) -> str:
        if not _is_loopback(host):
            raise ValueError(
                f"must be a loopback address (127.0.0.1, ::1 or localhost), got {host!r}: "
                "the relay never accepts mail from the network"
            )
        return host


class MetricsConfig(Endpoint):
    host: str = "0.0.0.0"
    port: int = Field(default=9425, ge=0, le=65535)  # 0: any free port
    enabled: bool = True


class Scope(Model):
    """Which messages a policy applies to; no key at all is the namespace-wide global scope."""

    domain: str | None = None
    binding: str | None = Field(default=None, min_length=1)
    binding_group: str | None = Field(default=None, alias="bindingGroup", min_length=1)

    @field_validator("domain")
    @classmethod
    def _domain(cls, domain: str | None) -> str | None:
        if domain is None:
            return None
        name = domain.strip().rstrip(".").lower()
        labels = name.removeprefix("*.").split(".")
        if not all(_DOMAIN_LABEL.match(label) for label in labels) or "*" in name.removeprefix("*."):
            raise ValueError(f"{domain!r} is not a domain name or a '*.example.com' wildcard")
        return name

    @model_validator(mode="after")
    def _one_binding_kind(self) -> Scope:
        if self.binding and self.binding_group:
            raise ValueError("set binding or bindingGroup, not both (a binding already implies its group)")
        return self

    def describe(self) -> str:
        parts = [
            f"{key}={value}"
            for key, value in (
                ("domain", self.domain),
                ("binding", self.binding),
                ("bindingGroup", self.binding_group),
            )
            if value
        ]
        return ",".join(parts) or "global"


class AuthType(StrEnum):
    PLAIN = "PLAIN"
    LOGIN = "LOGIN"
    XOAUTH2 = "XOAUTH2"

    @classmethod
    def parse(cls, value: object) -> AuthType:
        try:
            return cls(str(value).strip().upper())
        except ValueError:
            raise ValueError(f"must be one of PLAIN, LOGIN, XOAUTH2, got {value!r}") from None


class TlsMode(StrEnum):
    STARTTLS = "starttls"
    IMPLICIT = "implicit"
    NONE = "none"


class TlsSettings(Model):
    mode: TlsMode = TlsMode.STARTTLS
    verify: bool = True
    ca_file: Path | None = Field(default=None, alias="caFile")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def _read_secret_file(path: Path, where: str) -> SecretStr:
    try:
        return SecretStr(path.read_text(encoding="utf-8").rstrip("\r\n"))
    except OSError as error:
        raise ConfigError(f"{where} {str(path)!r} cannot be read: {error.strerror}") from None


class OAuth2Settings(Model):
    """Where an XOAUTH2 policy gets its access token: an OAuth2 token endpoint (RFC 6749), with the
    refresh_token grant when a refresh token is given, else client_credentials."""

    token_url: str = Field(alias="tokenUrl", min_length=1)
    client_id: str | None = Field(default=None, alias="clientId", min_length=1)
    client_id_file: Path | None = Field(default=None, alias="clientIdFile")
    client_secret: SecretStr | None = Field(default=None, alias="clientSecret")
    client_secret_file: Path | None = Field(default=None, alias="clientSecretFile")
    refresh_token: SecretStr | None = Field(default=None, alias="refreshToken")
    refresh_token_file: Path | None = Field(default=None, alias="refreshTokenFile")
    scopes: tuple[str, ...] = ()
    ca_file: Path | None = Field(default=None, alias="caFile")

    @field_validator("token_url")
    @classmethod
    def _https(cls, url: str) -> str:
        parsed = urlsplit(url)
        if parsed.scheme not in ("https", "http") or not parsed.hostname:
            raise ValueError(f"must be an https:// URL, got {url!r}")
        if parsed.username or parsed.password:
            raise ValueError("must not carry credentials; use clientId and clientSecret")
        if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
            raise ValueError(
                f"must be https:// (http:// only to a loopback address), got {url!r}: "
                "the client secret and tokens would cross the network in clear"
            )
        return url

    @field_validator("scopes", mode="before")
    @classmethod
    def _scope_list(cls, value: object) -> object:
        # RFC 6749 3.3 writes scopes space-delimited; accept that as well as a YAML list.
        return value.split() if isinstance(value, str) else value

    @field_validator("scopes")
    @classmethod
    def _scope_tokens(cls, scopes: tuple[str, ...]) -> tuple[str, ...]:
        for scope in scopes:
            if not scope or not _SCOPE_TOKEN.match(scope):
                raise ValueError(f"{scope!r} is not a scope token (RFC 6749 3.3: printable ASCII, no space)")
        return scopes

    @model_validator(mode="after")
    def _one_source_each(self) -> OAuth2Settings:
        problems = [
            f"set {key} or {key}File, not both"
            for key, value, file in (
                ("clientId", self.client_id, self.client_id_file),
                ("clientSecret", self.client_secret, self.client_secret_file),
                ("refreshToken", self.refresh_token, self.refresh_token_file),
            )
            if value is not None and file is not None
        ]
        if self.client_id is None and self.client_id_file is None:
            problems.append("clientId (or clientIdFile) is required")
        if (
            self.refresh_token is None
            and self.refresh_token_file is None
            and self.client_secret is None
            and self.client_secret_file is None
        ):
            problems.append(
                "the client_credentials grant (no refreshToken) needs clientSecret (or clientSecretFile)"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def grant(self) -> str:
        """The grant used to obtain access tokens."""
        has_refresh = self.refresh_token is not None or self.refresh_token_file is not None
        return "refresh_token" if has_refresh else "client_credentials"

    def files(self) -> list[Path]:
        found = [self.client_id_file, self.client_secret_file, self.refresh_token_file, self.ca_file]
        return [path for path in found if path is not None]

    def resolve_files(self, base_dir: Path, where: str) -> OAuth2Settings:
        """Read the `*File` keys into their values and anchor `caFile`, relative to `base_dir`."""
        updates: dict[str, Any] = {}
        if self.client_id_file is not None:
            value = _read_secret_file(base_dir / self.client_id_file, f"{where}clientIdFile")
            updates["client_id"] = value.get_secret_value()
        if self.client_secret_file is not None:
            path = base_dir / self.client_secret_file
            updates["client_secret"] = _read_secret_file(path, f"{where}clientSecretFile")
        if self.refresh_token_file is not None:
            path = base_dir / self.refresh_token_file
            updates["refresh_token"] = _read_secret_file(path, f"{where}refreshTokenFile")
        if self.ca_file is not None:
            ca_file = base_dir / self.ca_file
            if not ca_file.is_file():
                raise ConfigError(f"{where}caFile {str(ca_file)!r} is not a readable file")
            updates["ca_file"] = ca_file
        return self.model_copy(update=updates) if updates else self

    def identity(self) -> str:
        """A digest of everything that decides which token the endpoint issues, never the token itself:
        it keys the token cache and, through Route.identity, the upstream pool."""
        digest = hashlib.sha256()
        for part in (
            self.token_url,
            self.client_id or "",
            str(self.client_id_file or ""),
            self.client_secret.get_secret_value() if self.client_secret else "",
            self.refresh_token.get_secret_value() if self.refresh_token else "",
            " ".join(self.scopes),
            str(self.ca_file or ""),
        ):
            digest.update(part.encode() + b"\0")
        return digest.hexdigest()[:16]

    def secrets(self) -> list[str]:
        """The values that must never be logged."""
        return [s.get_secret_value() for s in (self.client_secret, self.refresh_token) if s is not None]


class Policy(Model):
    """One scope's settings. Each setting left out falls back, on its own, to a wider scope."""

    _extra_aliases: ClassVar[Mapping[str, str]] = MOMENTUM_KEYS

    name: str = Field(min_length=1)
    scope: Scope = Scope()
    type: AuthType | None = None
    user: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = Field(default=None, alias="passwordFile")
    oauth2: OAuth2Settings | None = None  # XOAUTH2: the access token comes from a token endpoint
    gateway: Endpoint | None = None
    tls: TlsSettings | None = None
    max_connections: int | None = Field(default=None, alias="maxConnections", ge=1, le=1000)
    # This policy's credentials may go over plaintext or unverified TLS set by a wider scope; without it,
    # only this policy's own `tls` can weaken the protection of its credentials (docs/relay-config.md).
    allow_insecure_auth: bool = Field(default=False, alias="allowInsecureAuth")
    # Set by the operator when this policy's settings cannot be had (a Secret is missing): mail that
    # would use this scope is deferred rather than sent with a wider scope's credentials.
    suspended: str | None = None

    @field_validator("type", mode="before")
    @classmethod
    def _type(cls, value: object) -> object:
        return None if value is None else AuthType.parse(value)

    @model_validator(mode="after")
    def _one_password_source(self) -> Policy:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or passwordFile, not both")
        if self.oauth2 is not None:
            if self.password is not None or self.password_file is not None:
                raise ValueError("set password (or passwordFile) or oauth2, not both")
            if self.type is not AuthType.XOAUTH2:
                raise ValueError(
                    "oauth2 needs type: XOAUTH2 in the same policy (it supplies an access token)"
                )
        return self


class Hooks(Model):
    lua: tuple[Path, ...] = ()
    python: tuple[str, ...] = ()
    timeout_ms: int = Field(default=50, alias="timeoutMs", ge=1, le=10_000)

    @field_validator("python")
    @classmethod
    def _python_refs(cls, refs: tuple[str, ...]) -> tuple[str, ...]:
        for ref in refs:
            if not _HOOK_REF.match(ref):
                raise ValueError(f"{ref!r} is not of the form 'package.module:function'")
        return refs


class UpstreamSettings(Model):
    connect_timeout_seconds: float = Field(default=10.0, alias="connectTimeoutSeconds", gt=0)
    timeout_seconds: float = Field(default=60.0, alias="timeoutSeconds", gt=0)
    idle_timeout_seconds: float = Field(default=30.0, alias="idleTimeoutSeconds", gt=0)
    # RFC 5321 4.5.3.2.5-6: the body may take minutes to send, and the final reply to DATA up to ten
    # more; `timeoutSeconds` is for every other reply.
    data_timeout_seconds: float = Field(default=600.0, alias="dataTimeoutSeconds", gt=0)
    default_max_connections: int = Field(default=4, alias="defaultMaxConnections", ge=1, le=1000)


class Limits(Model):
    """What one client may ask of the relay; each is checked before anything goes upstream."""

    # Postfix's message_size_limit default; RFC 5321 4.5.3.1.7 asks for at least 64 KiB. Advertised as
    # SIZE, refused at MAIL when declared larger, and at the end of DATA when larger still.
    message_size_bytes: int = Field(default=10_240_000, alias="messageSizeBytes", ge=65_536, le=1 << 30)
    # RFC 5321 4.5.3.1.8 asks that 100 be accepted; more get 452 and go in a new transaction, so an
    # upstream's own cap (commonly 100) cannot defer a message forever.
    recipients_per_transaction: int = Field(default=100, alias="recipientsPerTransaction", ge=1, le=10_000)
    # Concurrent client sessions; one more is answered 421 and closed.
    sessions: int = Field(default=100, ge=1, le=10_000)


class RelayConfig(Model):
    # An opaque label of this config, stamped by the operator (a number that grows with each rendering of
    # a namespace's Secret); exported as outbound_relay_config_revision_info, so sidecars on an older
    # revision than the operator's are found with one query. No effect on delivery.
    revision: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    listen: ListenConfig = ListenConfig()
    metrics: MetricsConfig = MetricsConfig()
    default_binding: str = Field(default="default", alias="defaultBinding", min_length=1)
    binding_header: str = Field(
        default="X-Binding", alias="bindingHeader", min_length=1, pattern=r"^[!-9;-~]+$"
    )  # RFC 5322 3.6.8: printable ASCII but ":"
    binding_groups: dict[str, tuple[str, ...]] = Field(default_factory=dict, alias="bindingGroups")
    policies: tuple[Policy, ...] = ()
    hooks: Hooks = Hooks()
    upstream: UpstreamSettings = UpstreamSettings()
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
        problems: list[str] = []  # all of them at once, as for the per-key errors
        group_of: dict[str, str] = {}
        for group, bindings in self.binding_groups.items():
            for binding in bindings:
                if binding in group_of:
                    problems.append(
                        f"bindingGroups: binding {binding!r} is in both {group_of[binding]!r} and {group!r}"
                    )
                group_of[binding] = group
        names: set[str] = set()
        scopes: dict[Scope, str] = {}
        for i, policy in enumerate(self.policies):
            where = f"policies[{i}] ({policy.name})"
            if policy.name in names:
                problems.append(f"{where}: name is used by an earlier policy")
            names.add(policy.name)
            if policy.scope in scopes:
                problems.append(
                    f"{where}: scope {policy.scope.describe()} is already taken by policy "
                    f"{scopes[policy.scope]!r}"
                )
            scopes.setdefault(policy.scope, policy.name)
            wanted = policy.scope.binding_group
            if wanted is not None and wanted not in self.binding_groups:
                problems.append(f"{where}: scope.bindingGroup {wanted!r} is not declared in bindingGroups")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    @property
    def group_of(self) -> dict[str, str]:
        return {b: g for g, bindings in self.binding_groups.items() for b in bindings}

    def policy(self, name: str) -> Policy:
        for policy in self.policies:
            if policy.name == name:
                return policy
        raise KeyError(name)


def _location(loc: tuple[int | str, ...], data: Any) -> str:
    """`policies[1] (mail/sparkpost): tls.mode` from pydantic's ('policies', 1, 'tls', 'mode')."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{item}]"]
        else:
            parts.append(item)
        try:
            node = node[item]
        except (KeyError, IndexError, TypeError):
            node = None
        if parts[0].startswith("policies[") and len(parts) == 1 and isinstance(node, Mapping):
            name = node.get("name")
            parts[0] += f" ({name})" if name else ""
    head, *rest = parts
    return f"{head}: {'.'.join(rest)}" if rest and head.startswith("policies[") else ".".join(parts)


def format_validation_error(error: ValidationError, data: Any) -> str:
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        message = str(item["msg"]).removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (not part of relay.yaml; check its spelling)"
        loc = tuple(item["loc"])
        lines.append(f"{_location(loc, data)}: {message}" if loc else message)
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "relay.yaml") -> RelayConfig:
    """Validate already-loaded YAML data; `ConfigError` lists every problem found."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        return RelayConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source} is invalid:\n{format_validation_error(error, data)}") from None


def resolve_files(config: RelayConfig, base_dir: Path) -> RelayConfig:
    """Read each `passwordFile` into `password` (and the oauth2 `*File` keys into theirs) and anchor each
    `caFile`; relative paths are relative
    to the config file, so a mounted Secret can carry the config and its files side by side."""
    policies = []
    for i, policy in enumerate(config.policies):
        where = f"policies[{i}] ({policy.name})"
        updates: dict[str, Any] = {}
        if policy.password_file is not None:
            updates["password"] = _read_secret_file(base_dir / policy.password_file, f"{where}: passwordFile")
        if policy.oauth2 is not None:
            updates["oauth2"] = policy.oauth2.resolve_files(base_dir, f"{where}: oauth2.")
        if policy.tls is not None and policy.tls.ca_file is not None:
            ca_file = base_dir / policy.tls.ca_file
            if not ca_file.is_file():
                raise ConfigError(f"{where}: tls.caFile {str(ca_file)!r} is not a readable file")
            updates["tls"] = policy.tls.model_copy(update={"ca_file": ca_file})
        policies.append(policy.model_copy(update=updates) if updates else policy)
    config = config.model_copy(update={"policies": tuple(policies)})
    if config.listen.tls is not None:
        tls = config.listen.tls
        files = {"cert_file": base_dir / tls.cert_file, "key_file": base_dir / tls.key_file}
        for name, path in files.items():
            if not path.is_file():
                key = "certFile" if name == "cert_file" else "keyFile"
                raise ConfigError(f"listen.tls.{key} {str(path)!r} is not a readable file")
        listen = config.listen.model_copy(update={"tls": tls.model_copy(update=files)})
        config = config.model_copy(update={"listen": listen})
    return config


def load_config(path: Path) -> RelayConfig:
    """Read, parse and validate a relay.yaml, with its password and CA files resolved."""
    return read_config(path)[0]


def read_config(path: Path) -> tuple[RelayConfig, str]:
    """`load_config`, and the digest of what it read: the config's bytes as read, the other files'
    before they are read for use, so a change landing meanwhile is seen at the next poll, never lost."""
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot be read: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 (byte {error.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(error)}") from None
    config = parse_config(data, source=str(path))
    digest = fingerprint(watched_files(config, path), first=raw)
    return resolve_files(config, path.parent), digest


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What and where, without PyYAML's quote of the line: that line may hold a password."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{error.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return type(error).__name__


def watched_files(config: RelayConfig, path: Path) -> tuple[Path, ...]:
    """The files whose change means a reload: the config itself, every passwordFile, caFile, oauth2 file
    and Lua hook (relative paths are relative to the config's directory)."""
    extra = [p.password_file for p in config.policies if p.password_file is not None]
    extra += [p.tls.ca_file for p in config.policies if p.tls is not None and p.tls.ca_file is not None]
    extra += [file for p in config.policies if p.oauth2 is not None for file in p.oauth2.files()]
    extra += config.hooks.lua
    return (path, *(path.parent / file for file in extra))


def fingerprint(paths: tuple[Path, ...], *, first: bytes | None = None) -> str:
    """A digest of the files' current bytes (`first`: the first file's, already read); reading through
    symlinks sees the kubelet's `..data` swap. It covers passwords: never log or export it as it is."""
    digest = hashlib.sha256()
    for i, path in enumerate(paths):
        digest.update(str(path).encode() + b"\0")
        try:
            content = first if i == 0 and first is not None else path.read_bytes()
            digest.update(len(content).to_bytes(8, "big") + content)
        except OSError as error:
            digest.update(f"unreadable:{error.errno}".encode())
    return digest.hexdigest()
