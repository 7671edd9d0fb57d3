"""docs/helm.md shows the quick start's files exactly as tests/webhook/test_quickstart.py applies them."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"


@pytest.mark.parametrize("example", ["secret.yaml", "policy.yaml", "pod.yaml"])
def test_helm_md_shows_each_example_verbatim(example: str) -> None:
    text = (EXAMPLES / example).read_text()
    assert f"`docs/examples/{example}`:\n```yaml\n{text}```" in (REPO / "docs" / "helm.md").read_text()


def test_quick_start_commands_name_the_example_files() -> None:
    doc = (REPO / "docs" / "helm.md").read_text()
    assert "kubectl apply -n mail -f docs/examples/secret.yaml -f docs/examples/policy.yaml" in doc
    assert "kubectl apply -n mail -f docs/examples/pod.yaml" in doc
    assert "kubectl label namespace mail outboundrelay.io/inject=enabled" in doc
    install = "helm install outbound-relay charts/outbound-relay"
    assert f"{install} --namespace outbound-relay-system --create-namespace" in doc
