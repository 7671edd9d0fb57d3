"""Fuzz targets for what the relay parses from others: relay.yaml, Momentum's configuration and (with
tests/unit/test_smuggling.py and tests/unit/test_reply.py) the SMTP wire. Hypothesis runs them briefly
by default and in CI; `make fuzz` runs them long (HYPOTHESIS_PROFILE=fuzz, tests/conftest.py).

The property is the same for each parser: any input gives a result or the parser's own error with a
message, never another exception."""

from __future__ import annotations

import yaml
from hypothesis import given
from hypothesis import strategies as st

from outbound_relay.config import ConfigError, parse_config
from outbound_relay.momentum_import import MomentumImportError, convert
from tests.support.seed import SEED_CONF

_KEYS = st.sampled_from(
    ["listen", "metrics", "policies", "name", "scope", "domain", "binding", "bindingGroup", "type", "user",
     "password", "gateway", "host", "port", "tls", "mode", "verify", "caFile", "limits", "messageSizeBytes",
     "upstream", "timeoutSeconds", "hooks", "bindingGroups", "allowInsecureAuth", "x"]
)  # fmt: skip
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(), st.text(max_size=20)
)
_yaml_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=5)),
    max_leaves=25,
)


def _refusal(data: object) -> str | None:
    """parse_config's error message, or None when it took the data; any other exception fails the test."""
    try:
        parse_config(data)
    except ConfigError as error:
        return str(error)
    return None


@given(_yaml_values)
def test_config_parser_takes_any_yaml_data(data: object) -> None:
    assert _refusal(data) != ""


@given(st.text(max_size=400))
def test_config_parser_takes_any_yaml_text(text: str) -> None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return
    assert _refusal(data) != ""


# Momentum configuration: pieces of the seed, shuffled and cut, plus arbitrary text.
_MOMENTUM_PIECES = st.sampled_from(
    [*SEED_CONF.split(" "), "{", "}", "\n", '"', "#", "=", "Domain", "Binding", "Binding_Group",
     "outbound_smtp_auth", "\\", "\t"]
)  # fmt: skip
_momentum_texts = st.one_of(st.lists(_MOMENTUM_PIECES, max_size=60).map(" ".join), st.text(max_size=300))


@given(_momentum_texts, st.booleans(), st.booleans())
def test_momentum_importer_takes_any_text(text: str, relay_config: bool, strict: bool) -> None:
    refusal: str | None = None
    try:
        out = convert(text, source="fuzz.conf", namespace="mail", relay_config=relay_config, strict=strict)
    except MomentumImportError as error:
        refusal = str(error)
    if refusal is not None:
        assert refusal
        return
    documents = list(yaml.safe_load_all(out))
    if relay_config and documents and documents[0] is not None:
        parse_config(documents[0])  # what it writes, the relay reads
