"""import-momentum: ecelerity.conf to OutboundAuthPolicy + Secret + OutboundBindingGroup, or relay.yaml."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from outbound_relay.config import AuthType, parse_config
from outbound_relay.momentum_import import MomentumImportError, convert
from outbound_relay.scopes import ScopeIndex
from tests.support.seed import SEED_CONF

NESTED_CONF = """\
# global scope
Outbound_SMTP_AUTH_Type = PLAIN
Binding_Group "Marketing" {
  Outbound_SMTP_AUTH_User = "mkt"   # for every binding of the group
  Binding "bulk_a" {
    Outbound_SMTP_AUTH_Pass = "a-pass"
    Domain "gmail.com" {
      Outbound_SMTP_AUTH_Type = "XOAUTH2"
    }
  }
  Binding "bulk-b" {
  }
  Domain "yahoo.com" {
    Gateway = "smtp.yahoo.example:587"
    Outbound_SMTP_AUTH_Pass = "y-pass"
  }
}
Binding "transactional" {
  Domain "bird.com" { Outbound_SMTP_AUTH_User = "tx" }
}
"""

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def documents(text: str, **kwargs: Any) -> list[dict[str, Any]]:
    output = convert(text, source="ecelerity.conf", namespace="mail", relay_config=False, **kwargs)
    return [doc for doc in yaml.safe_load_all(output) if doc is not None]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def relay_yaml(text: str) -> dict[str, Any]:
    data = yaml.safe_load(convert(text, source="ecelerity.conf", namespace="mail", relay_config=True))
    assert isinstance(data, dict)
    return data


class TestSeedExample:
    def test_three_policies_with_their_secrets(self) -> None:
        docs = documents(SEED_CONF)
        policies = of_kind(docs, "OutboundAuthPolicy")
        secrets = of_kind(docs, "Secret")
        assert {name: p["spec"] for name, p in policies.items()} == {
            "domain-messagesystems-com": {
                "scope": {"domain": "messagesystems.com"},
                "type": "LOGIN",
                "user": "msys",
                "passwordSecretRef": {"name": "domain-messagesystems-com-auth", "key": "password"},
            },
            "domain-sparkpost-com": {
                "scope": {"domain": "sparkpost.com"},
                "type": "PLAIN",
                "user": "sparkpost",
                "passwordSecretRef": {"name": "domain-sparkpost-com-auth", "key": "password"},
            },
            "domain-bird-com": {
                "scope": {"domain": "bird.com"},
                "type": "XOAUTH2",
                "user": "test@contoso.onmicrosoft.com",
                "passwordSecretRef": {"name": "domain-bird-com-auth", "key": "password"},
            },
        }
        assert {name: s["stringData"] for name, s in secrets.items()} == {
            "domain-messagesystems-com-auth": {"password": "msys"},
            "domain-sparkpost-com-auth": {"password": "sparkpost"},
            "domain-bird-com-auth": {"password": "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"},
        }
        for doc in docs:
            assert doc["metadata"]["namespace"] == "mail"
            assert DNS_1123_LABEL.match(doc["metadata"]["name"])
        assert all(doc["apiVersion"] == "outboundrelay.io/v1alpha1" for doc in policies.values())
        assert all(doc["apiVersion"] == "v1" and doc["type"] == "Opaque" for doc in secrets.values())
        assert "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA" not in yaml.safe_dump(list(policies.values()))

    def test_secrets_come_before_the_policies_that_use_them(self) -> None:
        kinds = [doc["kind"] for doc in documents(SEED_CONF)]
        assert kinds == ["Secret", "OutboundAuthPolicy"] * 3

    def test_module_stanza_and_keep_dicts_are_accepted_without_warnings(self) -> None:
        output = convert(
            SEED_CONF, source="ecelerity.conf", namespace="mail", relay_config=False, strict=True
        )
        assert "# warning:" not in output
        assert "# note: ecelerity.conf:3: Keep_Message_Dicts_In_Memory is not needed" in output

    def test_relay_config_resolves_like_momentum(self) -> None:
        config = parse_config(relay_yaml(SEED_CONF))
        assert [p.name for p in config.policies] == [
            "mail/domain-messagesystems-com",
            "mail/domain-sparkpost-com",
            "mail/domain-bird-com",
        ]
        route = ScopeIndex(config).route("bird.com", "default")
        assert route.type is not None
        assert route.type.value is AuthType.XOAUTH2
        assert route.user is not None
        assert route.user.value == "test@contoso.onmicrosoft.com"
        assert route.password is not None
        assert route.password.value.get_secret_value() == "EwBAAl3BAAUFFpUAo7J3Ve0bjLBWZWCclRC3EoAA"


class TestNesting:
    def test_binding_groups_bindings_and_domains(self) -> None:
        docs = documents(NESTED_CONF)
        assert {name: g["spec"] for name, g in of_kind(docs, "OutboundBindingGroup").items()} == {
            "marketing": {"bindings": ["bulk_a", "bulk-b"]}
        }
        policies = {name: p["spec"] for name, p in of_kind(docs, "OutboundAuthPolicy").items()}
        assert {name: spec["scope"] for name, spec in policies.items()} == {
            "global": {},
            "binding-group-marketing": {"bindingGroup": "marketing"},
            "binding-bulk-a": {"binding": "bulk_a"},
            "binding-bulk-a-domain-gmail-com": {"binding": "bulk_a", "domain": "gmail.com"},
            "binding-group-marketing-domain-yahoo-com": {"bindingGroup": "marketing", "domain": "yahoo.com"},
            "binding-transactional-domain-bird-com": {"binding": "transactional", "domain": "bird.com"},
        }
        assert policies["binding-group-marketing-domain-yahoo-com"]["gateway"] == {
            "host": "smtp.yahoo.example",
            "port": 587,
        }
        assert policies["global"] == {"scope": {}, "type": "PLAIN"}

    def test_group_renamed_for_kubernetes_is_noted(self) -> None:
        output = convert(NESTED_CONF, source="ecelerity.conf", namespace="mail", relay_config=False)
        assert (
            "# note: ecelerity.conf:3: Binding_Group 'Marketing' is named 'marketing' in Kubernetes" in output
        )

    def test_each_setting_falls_back_on_its_own(self) -> None:
        index = ScopeIndex(parse_config(relay_yaml(NESTED_CONF)))
        route = index.route("gmail.com", "bulk_a")
        assert route.type is not None
        assert route.user is not None
        assert route.password is not None
        assert (route.type.value, route.user.value, route.password.value.get_secret_value()) == (
            AuthType.XOAUTH2,
            "mkt",
            "a-pass",
        )
        assert "binding-group-marketing" in route.user.source
        yahoo = index.route("yahoo.com", "bulk-b")
        assert yahoo.gateway is not None
        assert (yahoo.gateway.value.host, yahoo.gateway.value.port) == ("smtp.yahoo.example", 587)
        assert yahoo.type is not None
        assert yahoo.type.value is AuthType.PLAIN
        assert yahoo.type.source.startswith("policy mail/global")

    def test_relay_config_keeps_momentum_group_names(self) -> None:
        assert relay_yaml(NESTED_CONF)["bindingGroups"] == {"Marketing": ["bulk_a", "bulk-b"]}


class TestSpelling:
    def test_keys_and_stanza_names_in_any_case(self) -> None:
        conf = """
        DOMAIN "Example.COM" {
          outbound_smtp_auth_TYPE = login
          OUTBOUND_SMTP_AUTH_USER = 'u'
          outbound_SMTP_auth_PASS = "p \\"quoted\\""
        }
        binding_group g { BINDING b { domain x.org { Outbound_Smtp_Auth_Type = xoauth2 } } }
        """
        policies = {name: p["spec"] for name, p in of_kind(documents(conf), "OutboundAuthPolicy").items()}
        assert policies["domain-example-com"]["scope"] == {"domain": "example.com"}
        assert policies["domain-example-com"]["type"] == "LOGIN"
        assert policies["domain-example-com"]["user"] == "u"
        assert policies["binding-b-domain-x-org"] == {
            "scope": {"binding": "b", "domain": "x.org"},
            "type": "XOAUTH2",
        }
        secrets = of_kind(documents(conf), "Secret")
        assert secrets["domain-example-com-auth"]["stringData"] == {"password": 'p "quoted"'}

    def test_names_are_dns_labels_and_unique(self) -> None:
        long = f"{'x' * 40}.{'y' * 40}.example.com"
        conf = f"""
        Domain "*.Example.com" {{ Outbound_SMTP_AUTH_Type = PLAIN }}
        Binding "a.b" {{ Outbound_SMTP_AUTH_Type = PLAIN }}
        Binding "a_b" {{ Outbound_SMTP_AUTH_Type = PLAIN }}
        Domain "{long}" {{ Outbound_SMTP_AUTH_Pass = x }}
        """
        docs = documents(conf)
        names = [doc["metadata"]["name"] for doc in docs]
        assert len(names) == len(set(names))
        assert all(DNS_1123_LABEL.match(name) for name in names), names
        assert "domain-wildcard-example-com" in of_kind(docs, "OutboundAuthPolicy")
        scopes = [p["spec"]["scope"] for p in of_kind(docs, "OutboundAuthPolicy").values()]
        assert {"binding": "a.b"} in scopes
        assert {"binding": "a_b"} in scopes
        assert {"domain": "*.example.com"} in scopes


class TestReported:
    CONF = """\
Server_Max_File_Descriptors = 1000
ESMTP_Listener {
  Listen ":25" { }
}
Domain "sparkpost.com" {
  Max_Outbound_Connections = 20
  Outbound_SMTP_AUTH_Type = PLAIN
  Routes = ( a b )
  TLS { }
}
outbound_smtp_auth { debug_level = "DEBUG" }
"""

    def test_unsupported_keys_are_listed_with_their_lines(self) -> None:
        output = convert(self.CONF, source="ecelerity.conf", namespace="mail", relay_config=False)
        warnings = [line.removeprefix("# warning: ecelerity.conf:") for line in output.splitlines()]
        assert [line.removesuffix(" is not converted") for line in warnings if line[0].isdigit()] == [
            "1: unsupported key 'Server_Max_File_Descriptors' in the global scope",
            "2: unsupported stanza 'ESMTP_Listener' in the global scope",
            "6: unsupported key 'Max_Outbound_Connections' in Domain \"sparkpost.com\"",
            "8: unsupported key 'Routes' in Domain \"sparkpost.com\"",
            "9: unsupported stanza 'TLS' in Domain \"sparkpost.com\"",
            "11: 'debug_level' in the outbound_smtp_auth module stanza",
        ]
        assert (
            of_kind(documents(self.CONF), "OutboundAuthPolicy")["domain-sparkpost-com"]["spec"]["type"]
            == "PLAIN"
        )

    def test_strict_makes_them_errors(self) -> None:
        with pytest.raises(MomentumImportError) as caught:
            convert(self.CONF, source="ecelerity.conf", namespace="mail", relay_config=False, strict=True)
        assert str(caught.value).startswith("ecelerity.conf:1: unsupported key 'Server_Max_File_Descriptors'")
        assert "ecelerity.conf:6: unsupported key 'Max_Outbound_Connections'" in str(caught.value)


class TestMalformed:
    @pytest.mark.parametrize(
        ("conf", "message"),
        [
            ('Domain "a.com" {\n  Outbound_SMTP_AUTH_Type = PLAIN\n', '1: Domain "a.com" { is not closed'),
            ('Domain "a.com" {\n  Outbound_SMTP_AUTH_User = "unterminated\n}\n', "2: string is not closed"),
            (
                'Domain "a.com" {\n  Outbound_SMTP_AUTH_User =\n}\n',
                "2: Outbound_SMTP_AUTH_User = has no value",
            ),
            ("}\n", "1: '}' without a matching '{'"),
            ('Domain "a.com" {\n Outbound_SMTP_AUTH_Type "PLAIN"\n}\n', "2: expected '=' or '{' after"),
            (
                'Domain "a.com" {\n Outbound_SMTP_AUTH_Type = CRAM-MD5\n}\n',
                "2: Outbound_SMTP_AUTH_Type: must be one of",
            ),
            (
                'Domain "a.com" {\n Domain "b.com" { }\n}\n',
                '2: Domain stanzas cannot be inside Domain "a.com"',
            ),
            (
                'Binding "b" {\n Binding_Group "g" { }\n}\n',
                "2: Binding_Group stanzas cannot be inside Binding",
            ),
            (
                'Domain "a.com" {\n X = x\n Outbound_SMTP_AUTH_User = a\n outbound_smtp_auth_user = b\n}\n',
                '4: outbound_smtp_auth_user is set twice in Domain "a.com" (line 3)',
            ),
            (
                'Domain "a.com" { }\nDomain "A.com" { }\n',
                '2: Domain "A.com" is declared twice in the global scope',
            ),
            (
                'Binding_Group "g" {\n Binding "b" { }\n}\nBinding "b" { }\n',
                '4: Binding "b" is declared twice (line 2)',
            ),
            (
                'Domain "not a domain" { }\n',
                "1: Domain \"not a domain\": 'not a domain' is not a domain name",
            ),
            ("Domain { }\n", '1: Domain needs a name: Domain "name" { ... }'),
            ('Domain "a.com" {\n Gateway = "a:b:c"\n}\n', "2: Gateway 'a:b:c' is not 'host' or 'host:port'"),
            (
                'Domain "a.com" {\n Gateway = "a:99999"\n}\n',
                "2: Gateway 'a:99999' is not 'host' or 'host:port' (port",
            ),
            ('Domain "a.com" {\n Outbound_SMTP_AUTH_Pass = ""\n}\n', "2: Outbound_SMTP_AUTH_Pass is empty"),
        ],
    )
    def test_error_names_file_and_line(self, conf: str, message: str) -> None:
        with pytest.raises(MomentumImportError) as caught:
            convert(conf, source="ecelerity.conf", namespace="mail", relay_config=False)
        assert str(caught.value).startswith(f"ecelerity.conf:{message}")

    def test_empty_file_is_empty_output(self) -> None:
        assert documents("# nothing here\n") == []
        assert relay_yaml("") == {"policies": []}


class TestPasswordsNeverQuoted:
    """A malformed password line fails or warns without printing any piece of the password: errors and
    warnings reach terminals, CI logs and tickets."""

    # Fragments in letters no message uses, so a fragment found in a message can only be a leak.
    fragment = st.text(alphabet="QXZJKVW", min_size=8, max_size=12)
    separator = st.sampled_from([" ", '"', "'", "{", "}", "=", "(", ")", "#", "\\", " = ", '" "', "\n"])

    @staticmethod
    def _password(fragments: list[str], separators: list[str]) -> str:
        parts = [fragments[0]]
        for piece, between in zip(fragments[1:], separators, strict=False):
            parts += [between, piece]
        return "".join(parts)

    @settings(max_examples=400, deadline=None)  # a loaded CI machine is slow, not wrong
    @given(
        fragments=st.lists(fragment, min_size=1, max_size=4),
        separators=st.lists(separator, min_size=3, max_size=3),
        quoted=st.booleans(),
        relay_config=st.booleans(),
    )
    def test_no_fragment_in_errors_or_warnings(
        self, fragments: list[str], separators: list[str], quoted: bool, relay_config: bool
    ) -> None:
        password = self._password(fragments, separators)
        value = f'"{password}"' if quoted else password
        conf = f'Domain "a.com" {{\n  Outbound_SMTP_AUTH_Pass = {value}\n  Outbound_SMTP_AUTH_User = u\n}}\n'
        try:
            output = convert(conf, source="ecelerity.conf", namespace="mail", relay_config=relay_config)
        except MomentumImportError as error:
            shown = str(error)
        else:
            shown = "\n".join(line for line in output.splitlines() if line.startswith("# "))
        for piece in fragments:
            assert piece not in shown

    def test_the_error_still_says_where_and_what(self) -> None:
        conf = 'Domain "a.com" {\n  Outbound_SMTP_AUTH_Pass = QXZJKVWQ QXZJKVWZ\n}\n'
        with pytest.raises(MomentumImportError) as caught:
            convert(conf, source="ecelerity.conf", namespace="mail", relay_config=False)
        assert str(caught.value).startswith(
            "ecelerity.conf:2: unexpected text after the value of Outbound_SMTP_AUTH_Pass (not shown"
        )
        assert "QXZJ" not in str(caught.value)

    def test_unknown_keys_after_a_quoted_password_are_still_named(self) -> None:
        conf = 'Domain "a.com" {\n  Outbound_SMTP_AUTH_Pass = "p"\n  Max_Outbound_Connections = 5\n}\n'
        output = convert(conf, source="ecelerity.conf", namespace="mail", relay_config=False)
        assert "unsupported key 'Max_Outbound_Connections'" in output

    def test_settings_after_a_password_on_its_line_still_convert(self) -> None:
        conf = 'Domain "a.com" { Outbound_SMTP_AUTH_Pass = "p" Gateway = "smtp.example:587" }\n'
        assert relay_yaml(conf)["policies"][0]["gateway"] == {"host": "smtp.example", "port": 587}
