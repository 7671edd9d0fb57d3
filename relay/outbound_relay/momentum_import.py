"""`outbound-relay import-momentum`: Momentum `ecelerity.conf` auth settings to Kubernetes or relay.yaml.

Reads `Domain`, `Binding` and `Binding_Group` stanzas (nested as Momentum nests them) and global keys,
and converts `Outbound_SMTP_AUTH_Type|User|Pass` (any case) and `Gateway` into one OutboundAuthPolicy per
scope, its password in a Secret of its own, and one OutboundBindingGroup per `Binding_Group`
(docs/momentum-import.md). Everything else is reported by name and line, never dropped silently: the
output starts with `# warning:` comments, `strict=True` makes them errors. Syntax errors, bad values and
scopes declared twice raise `MomentumImportError` naming file:line.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Final

import yaml
from pydantic import ValidationError

from outbound_relay.config import AuthType, ConfigError, Scope, parse_config

API_VERSION: Final = "outboundrelay.io/v1alpha1"
SECRET_KEY: Final = "password"  # noqa: S105 (the key in the Secret, not a password)
MANAGED_BY: Final = {"app.kubernetes.io/managed-by": "outbound-relay-import-momentum"}
MAX_NAME: Final = 58  # a DNS-1123 label (63) minus the Secret's "-auth" suffix

_AUTH_KEYS: Final = {
    "outboundsmtpauthtype": "type",
    "outboundsmtpauthuser": "user",
    "outboundsmtpauthpass": "password",
}
_IGNORED_GLOBALS: Final = {
    "keepmessagedictsinmemory": "Keep_Message_Dicts_In_Memory is not needed: the relay keeps message "
    "context in memory",
}
_PASSWORD_KEY: Final = "outboundsmtpauthpass"  # noqa: S105 (a key name, not a password)
_PASSWORD_NAME: Final = "Outbound_SMTP_AUTH_Pass"  # noqa: S105 (a key name, not a password)
# What may follow a password's value on its line: another setting (`... Pass = "x" Gateway = "h:25"`).
_KNOWN_KEYS: Final = frozenset({*_AUTH_KEYS, "gateway"})
_MODULE: Final = "outboundsmtpauth"
_SCOPES: Final = {"domain": "Domain", "binding": "Binding", "bindinggroup": "Binding_Group"}
_RECOGNIZED: Final = frozenset({*_KNOWN_KEYS, *_SCOPES, _MODULE, *_IGNORED_GLOBALS})
# Which scope stanzas each scope may contain, as Momentum allows them.
_NESTING: Final = {
    None: {"domain", "binding", "bindinggroup"},
    "bindinggroup": {"domain", "binding"},
    "binding": {"domain"},
    "domain": set(),
}


class MomentumImportError(ValueError):
    """The file cannot be converted; the message starts with file:line."""


def _fold(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


# --- reading ecelerity.conf -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Token:
    kind: str  # "word", "string", "=", "{", "}", "(", ")"
    text: str
    line: int
    hidden: bool = False  # may be part of a password: never quoted in an error


_PUNCTUATION = "={}()"
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "'": "'", "\\": "\\"}


def _tokens(text: str, source: str) -> Iterator[_Token]:
    i, line, end = 0, 1, len(text)
    while i < end:
        char = text[i]
        if char == "\n":
            line += 1
            i += 1
        elif char.isspace():
            i += 1
        elif char == "#":
            while i < end and text[i] != "\n":
                i += 1
        elif char in _PUNCTUATION:
            yield _Token(char, char, line)
            i += 1
        elif char in "\"'":
            start_line, out, i = line, [], i + 1
            while True:
                if i >= end:
                    raise MomentumImportError(f"{source}:{start_line}: string is not closed")
                c = text[i]
                if c == char:
                    i += 1
                    break
                if c == "\\" and i + 1 < end:
                    out.append(_ESCAPES.get(text[i + 1], text[i + 1]))
                    i += 2
                    continue
                if c == "\n":
                    line += 1
                out.append(c)
                i += 1
            yield _Token("string", "".join(out), start_line)
        else:
            start = i
            while i < end and not text[i].isspace() and text[i] not in _PUNCTUATION + "#\"'":
                i += 1
            yield _Token("word", text[start:i], line)


@dataclass
class _Node:
    name: str
    line: int
    value: str | list[str] | None = None  # an assignment: "x" or ( a b c )
    argument: str | None = None  # a stanza: Name "argument" { ... }
    children: list[_Node] | None = None  # None for an assignment
    hidden: bool = False  # the name may be part of a password (never quoted)

    @property
    def key(self) -> str:
        return _fold(self.name)

    @property
    def shown(self) -> str:
        return f"(a key after {_PASSWORD_NAME}, not shown)" if self.hidden else repr(self.name)


def _hide_password_text(tokens: list[_Token]) -> list[_Token]:
    """Mark what follows `Outbound_SMTP_AUTH_Pass` on its line (and on the lines a quoted string there
    spans): a value is always on its key's line, so any of that text may be a password or a piece of one
    (`Pass = two words`, a stray quote). Key names stay visible."""
    marked, until = [], 0
    for token in tokens:
        if token.kind in ("word", "string") and _fold(token.text) == _PASSWORD_KEY:
            until = token.line
        elif token.line <= until and _fold(token.text) not in _KNOWN_KEYS:
            token = replace(token, hidden=True)
            until = max(until, token.line + token.text.count("\n"))
        marked.append(token)
    return marked


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.tokens = _hide_password_text(list(_tokens(text, source)))
        # After an unquoted password, whose value ends at the line's end: an unknown name on the next lines
        # may be the rest of a password that held a line break.
        self.suspect = False
        self.pos = 0
        self.last_line = text.count("\n") + 1

    @staticmethod
    def show(token: _Token) -> str:
        """A token quoted for an error, unless it may be (part of) a password: errors go to terminals, CI
        logs and tickets."""
        return f"a value after {_PASSWORD_NAME} (not shown)" if token.hidden else repr(token.text)

    def error(self, line: int, message: str) -> MomentumImportError:
        return MomentumImportError(f"{self.source}:{line}: {message}")

    def peek(self, offset: int = 0) -> _Token | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def block(self, opened: _Token | None, name: str = "") -> list[_Node]:
        nodes: list[_Node] = []
        while True:
            token = self.peek()
            if token is None:
                if opened is not None:
                    raise self.error(opened.line, f"{name} {{ is not closed before the end of the file")
                return nodes
            if token.kind == "}":
                if opened is None:
                    raise self.error(token.line, "'}' without a matching '{'")
                self.take()
                return nodes
            nodes.append(self.statement())

    def unexpected(self, line: int) -> MomentumImportError:
        return self.error(
            line,
            f"unexpected text after the value of {_PASSWORD_NAME} (not shown: it may be part of the "
            "password); quote a password that holds spaces, quotes, line breaks, '#' or any of = { } ( )",
        )

    def statement(self) -> _Node:
        name = self.take()
        hidden = name.hidden or (
            self.suspect and name.kind in ("word", "string") and _fold(name.text) not in _RECOGNIZED
        )
        self.suspect = False
        if name.kind not in ("word", "string"):
            if hidden:
                raise self.unexpected(name.line)
            raise self.error(name.line, f"expected a key or a stanza name, found {self.show(name)}")
        after = self.peek()
        if after is None:
            if hidden:
                raise self.unexpected(name.line)
            raise self.error(name.line, f"{self.show(name)} has no value: expected '= value' or '{{ ... }}'")
        if after.kind == "=":
            self.take()
            node = _Node(name.text, name.line, value=self.value(name), hidden=hidden)
            unquoted = self.tokens[self.pos - 1].kind == "word"
            self.suspect = hidden or (node.key == _PASSWORD_KEY and unquoted)
            return node
        if hidden or after.hidden:
            raise self.unexpected(name.line)
        if after.kind == "{":
            opened = self.take()
            return _Node(name.text, name.line, children=self.block(opened, name.text))
        following = self.peek(1)
        if after.kind in ("word", "string") and following is not None and following.kind == "{":
            self.take()
            opened = self.take()
            label = f'{name.text} "{after.text}"'
            return _Node(name.text, name.line, argument=after.text, children=self.block(opened, label))
        raise self.error(name.line, f"expected '=' or '{{' after {self.show(name)}, found {self.show(after)}")

    def value(self, name: _Token) -> str | list[str]:
        token = self.peek()
        if token is None or token.line != name.line or token.kind in "={})":
            raise self.error(name.line, f"{name.text} = has no value")
        self.take()
        if token.kind != "(":
            return token.text
        items: list[str] = []
        while (item := self.peek()) is not None and item.kind in ("word", "string"):
            items.append(self.take().text)
        closing = self.peek()
        if closing is None or closing.kind != ")":
            raise self.error(token.line, f"{name.text} = ( ... ) is not closed with ')'")
        self.take()
        return items


# --- from stanzas to policies ---------------------------------------------------------------------------


@dataclass
class _Policy:
    scope: dict[str, str]  # domain, binding, bindingGroup (Kubernetes spelling)
    label: str  # 'Domain "x" in Binding "b"', for messages
    line: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Import:
    source: str
    strict: bool
    policies: list[_Policy] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)  # Momentum group name -> bindings
    group_lines: dict[str, int] = field(default_factory=dict)
    binding_lines: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def error(self, line: int, message: str) -> MomentumImportError:
        return MomentumImportError(f"{self.source}:{line}: {message}")

    def warn(self, line: int, message: str) -> None:
        self.warnings.append(f"{self.source}:{line}: {message}")


def _scope_label(scope: dict[str, str]) -> str:
    parts = []
    if "bindingGroup" in scope:
        parts.append(f'Binding_Group "{scope["bindingGroup"]}"')
    if "binding" in scope:
        parts.append(f'Binding "{scope["binding"]}"')
    if "domain" in scope:
        parts.append(f'Domain "{scope["domain"]}"')
    return " / ".join(parts) or "the global scope"


def _gateway(value: str, line: int, state: _Import) -> dict[str, Any]:
    """Momentum's `Gateway = "host"`, `"host:port"`, `"[v6]:port"`; without a port, SMTP's 25."""
    text = value.strip()
    bracketed = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?", text)
    if bracketed:
        host, port = bracketed[1], bracketed[2]
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" not in text:
        host, port = text, None
    else:
        try:
            host, port = str(ipaddress.IPv6Address(text)), None
        except ValueError:
            raise state.error(line, f"Gateway {value!r} is not 'host' or 'host:port'") from None
    if not host or not (port is None or (port.isdigit() and 0 < int(port) < 65536)):
        raise state.error(line, f"Gateway {value!r} is not 'host' or 'host:port' (port 1 to 65535)")
    return {"host": host, "port": int(port or 25)}


def _collect(nodes: list[_Node], scope: dict[str, str], kind: str | None, line: int, state: _Import) -> None:
    """One stanza's contents: settings into one policy for `scope`, nested scopes recursively."""
    label = _scope_label(scope)
    policy = _Policy(scope=dict(scope), label=label, line=line)
    seen: dict[str, int] = {}
    seen_scopes: dict[tuple[str, str], int] = {}
    for node in nodes:
        key = node.key
        if node.children is not None:
            if key in _SCOPES:
                if key not in _NESTING[kind]:
                    raise state.error(
                        node.line,
                        f"{_SCOPES[key]} stanzas cannot be inside {label} (Momentum does not nest them so)",
                    )
                if node.argument is None or not node.argument.strip():
                    raise state.error(
                        node.line, f'{_SCOPES[key]} needs a name: {_SCOPES[key]} "name" {{ ... }}'
                    )
                first = seen_scopes.get((key, node.argument.lower()))
                if first is not None:
                    raise state.error(
                        node.line,
                        f'{_SCOPES[key]} "{node.argument}" is declared twice in {label} (line {first})',
                    )
                seen_scopes[(key, node.argument.lower())] = node.line
                _enter(node, key, scope, state)
            elif key == _MODULE and kind is None:
                for inner in node.children:
                    state.warn(
                        inner.line, f"{inner.shown} in the outbound_smtp_auth module stanza is not converted"
                    )
            else:
                state.warn(node.line, f"unsupported stanza {node.name!r} in {label} is not converted")
            continue
        if key in seen:
            shown = node.shown if node.hidden else node.name
            raise state.error(node.line, f"{shown} is set twice in {label} (line {seen[key]})")
        seen[key] = node.line
        value = node.value
        if key in _AUTH_KEYS or key == "gateway":
            if not isinstance(value, str):
                raise state.error(node.line, f"{node.name} takes one value, not a list")
            if not value.strip():
                raise state.error(node.line, f"{node.name} is empty")
            policy.line = policy.line or node.line
            if key == "gateway":
                policy.settings["gateway"] = _gateway(value, node.line, state)
            elif _AUTH_KEYS[key] == "type":
                try:
                    policy.settings["type"] = AuthType.parse(value).value
                except ValueError as error:
                    raise state.error(node.line, f"{node.name}: {error}") from None
            else:
                policy.settings[_AUTH_KEYS[key]] = value
        elif kind is None and key in _IGNORED_GLOBALS:
            state.notes.append(f"{state.source}:{node.line}: {_IGNORED_GLOBALS[key]}")
        else:
            state.warn(node.line, f"unsupported key {node.shown} in {label} is not converted")
    if policy.settings:
        state.policies.append(policy)


def _enter(node: _Node, key: str, outer: dict[str, str], state: _Import) -> None:
    assert node.argument is not None
    assert node.children is not None
    name = node.argument.strip()
    scope = dict(outer)
    if key == "domain":
        try:
            domain = Scope(domain=name).domain
        except ValidationError as error:
            reason = error.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
            raise state.error(node.line, f'Domain "{name}": {reason}') from None
        assert domain is not None
        scope["domain"] = domain
    elif key == "binding":
        if name in state.binding_lines:
            raise state.error(
                node.line, f'Binding "{name}" is declared twice (line {state.binding_lines[name]})'
            )
        state.binding_lines[name] = node.line
        if "bindingGroup" in scope:
            state.groups[scope["bindingGroup"]].append(name)
            del scope["bindingGroup"]  # a binding's scope implies its group
        scope["binding"] = name
    else:
        if name in state.groups:
            raise state.error(
                node.line, f'Binding_Group "{name}" is declared twice (line {state.group_lines[name]})'
            )
        state.groups[name] = []
        state.group_lines[name] = node.line
        scope["bindingGroup"] = name
    _collect(node.children, scope, key, node.line, state)


def read_momentum(text: str, *, source: str, strict: bool = False) -> _Import:
    parser = _Parser(text, source)
    state = _Import(source=source, strict=strict)
    _collect(parser.block(None), {}, None, 0, state)
    if strict and state.warnings:
        raise MomentumImportError("\n".join(f"{w} (strict)" for w in state.warnings))
    return state


# --- output --------------------------------------------------------------------------------------------


def dns_label(text: str) -> str:
    """`*.Mail.example.com` -> `wildcard-mail-example-com`: lowercase letters, digits and '-' only."""
    text = text.lower()
    if text.startswith("*."):
        text = "wildcard-" + text[2:]
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "x"


def _fit(name: str, original: str, taken: set[str]) -> str:
    if len(name) > MAX_NAME or name in taken:
        digest = hashlib.sha256(original.encode()).hexdigest()[:6]
        name = f"{name[: MAX_NAME - 7].rstrip('-')}-{digest}"
    taken.add(name)
    return name


def _policy_name(scope: dict[str, str], group_names: dict[str, str]) -> str:
    parts = []
    if "bindingGroup" in scope:
        parts.append(f"binding-group-{group_names[scope['bindingGroup']]}")
    if "binding" in scope:
        parts.append(f"binding-{dns_label(scope['binding'])}")
    if "domain" in scope:
        parts.append(f"domain-{dns_label(scope['domain'])}")
    return "-".join(parts) or "global"


def _kubernetes(state: _Import, namespace: str) -> list[dict[str, Any]]:
    taken: set[str] = set()
    group_names: dict[str, str] = {}
    for group in state.groups:
        group_names[group] = _fit(dns_label(group), group, taken)
        if group_names[group] != group:
            state.notes.append(
                f"{state.source}:{state.group_lines[group]}: Binding_Group {group!r} is named "
                f"{group_names[group]!r} in Kubernetes (a DNS-1123 name); policies refer to it by that name"
            )
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": API_VERSION,
            "kind": "OutboundBindingGroup",
            "metadata": {"name": group_names[group], "namespace": namespace, "labels": dict(MANAGED_BY)},
            "spec": {"bindings": list(bindings)},
        }
        for group, bindings in state.groups.items()
    ]
    taken = set()
    for policy in state.policies:
        name = _fit(_policy_name(policy.scope, group_names), repr(sorted(policy.scope.items())), taken)
        annotations = {"outboundrelay.io/imported-from": f"{state.source}:{policy.line}"}
        metadata = {
            "name": name,
            "namespace": namespace,
            "labels": dict(MANAGED_BY),
            "annotations": annotations,
        }
        scope = dict(policy.scope)
        if "bindingGroup" in scope:
            scope["bindingGroup"] = group_names[scope["bindingGroup"]]
        spec: dict[str, Any] = {"scope": scope}
        settings = policy.settings
        for key in ("type", "user"):
            if key in settings:
                spec[key] = settings[key]
        if "password" in settings:
            secret_name = f"{name}-auth"
            spec["passwordSecretRef"] = {"name": secret_name, "key": SECRET_KEY}
            documents.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": secret_name, "namespace": namespace, "labels": dict(MANAGED_BY)},
                    "type": "Opaque",
                    "stringData": {SECRET_KEY: settings["password"]},
                }
            )
        if "gateway" in settings:
            spec["gateway"] = settings["gateway"]
        documents.append(
            {"apiVersion": API_VERSION, "kind": "OutboundAuthPolicy", "metadata": metadata, "spec": spec}
        )
    return documents


def _relay_config(state: _Import, namespace: str) -> dict[str, Any]:
    taken: set[str] = set()
    group_names = {group: dns_label(group) for group in state.groups}
    policies = []
    for policy in state.policies:
        name = _fit(_policy_name(policy.scope, group_names), repr(sorted(policy.scope.items())), taken)
        policies.append({"name": f"{namespace}/{name}", "scope": dict(policy.scope), **policy.settings})
    data: dict[str, Any] = {}
    if state.groups:
        data["bindingGroups"] = {group: list(bindings) for group, bindings in state.groups.items()}
    data["policies"] = policies
    try:
        parse_config(data, source="the converted relay.yaml")
    except ConfigError as error:  # a gap in this converter, not in the input
        raise MomentumImportError(f"{state.source}: {error}") from None
    return data


def _header(state: _Import, relay_config: bool) -> str:
    lines = [f"# Converted from {state.source} by outbound-relay import-momentum."]
    if relay_config:
        lines.append("# It holds passwords: keep it in a Secret or a file only the relay can read.")
    lines += [f"# note: {note}" for note in state.notes]
    lines += [f"# warning: {warning}" for warning in state.warnings]
    return "".join(f"{line}\n" for line in lines)


def convert(text: str, *, source: str, namespace: str, relay_config: bool, strict: bool = False) -> str:
    """YAML for `kubectl apply -f -` (Secrets, OutboundBindingGroups, OutboundAuthPolicies), or with
    `relay_config` one relay.yaml. Unconverted keys are listed as `# warning:` comments at the top
    (errors with `strict`)."""
    state = read_momentum(text, source=source, strict=strict)
    if relay_config:
        body = yaml.safe_dump(_relay_config(state, namespace), sort_keys=False, allow_unicode=True)
        return _header(state, relay_config) + body
    documents = _kubernetes(state, namespace)
    body = (
        yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True, allow_unicode=True)
        if documents
        else ""
    )
    return _header(state, relay_config) + body
