"""Names the operator and the cluster agree on: the API group, the CRDs' plurals, the rendered Secret."""

from __future__ import annotations

GROUP = "outboundrelay.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

POLICY_KIND = "OutboundAuthPolicy"
POLICY_PLURAL = "outboundauthpolicies"
GROUP_KIND = "OutboundBindingGroup"
GROUP_PLURAL = "outboundbindinggroups"
SETTINGS_KIND = "OutboundRelaySettings"
SETTINGS_PLURAL = "outboundrelaysettings"
# At most one per namespace, and it must have this name: the CRD refuses any other (a CEL rule).
SETTINGS_NAME = "default"

# One per namespace; the sidecar mounts it read-only (docs/relay-config.md).
RENDERED_SECRET = "outbound-relay-config"  # noqa: S105 (a Secret name, not a password)
CONFIG_KEY = "relay.yaml"
# The rendering's revision, also relay.yaml's `revision` (docs/metrics.md, "Stale sidecars").
REVISION_ANNOTATION = "outboundrelay.io/revision"

MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGER = "outbound-operator"  # label value, Event source and field manager
RENDERED_LABELS = {MANAGED_BY_LABEL: MANAGER, "app.kubernetes.io/name": "outbound-relay"}
