"""The relay sidecar for an opted-in Pod: pure functions from a Pod (a dict, as admission sees it) and the
injection settings to a JSONPatch (RFC 6902) or the mutated Pod.

The sidecar is a native one (an init container with `restartPolicy: Always`, Kubernetes >= 1.29): it starts
before the app's containers and stops after them, so mail submitted during shutdown still leaves.
It runs `outbound-relay serve` on the namespace's rendered config (Secret `outbound-relay-config`, mounted
read-only at /etc/outbound-relay/config; an optional hooks ConfigMap at /etc/outbound-relay/hooks, a
directory of its own, so that no ConfigMap key can replace relay.yaml or a CA file) and listens on
127.0.0.1:2525; docs/helm.md lists the annotations.

Idempotent: a Pod that already has the sidecar gets an empty patch, so a second admission changes nothing.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from outbound_operator.crd_models import BindingName

ANNOTATION_INJECT: Final = "outboundrelay.io/inject"
"""Pod annotation that opts a Pod in; the value "true" (any case) injects, anything else does not."""
ANNOTATION_BINDING: Final = "outboundrelay.io/binding"
"""Pod annotation: the binding of mail without an X-Binding header (the relay's `--default-binding`)."""
ANNOTATION_HOOKS: Final = "outboundrelay.io/hooks-configmap"
"""Pod annotation: a ConfigMap whose keys (e.g. auth.lua) are mounted at HOOKS_DIR, apart from relay.yaml."""
ANNOTATION_INJECTED: Final = "outboundrelay.io/injected"
"""Annotation and label the webhook sets (value "true") on every Pod it injected."""
NAMESPACE_LABEL: Final = "outboundrelay.io/inject"
"""Namespace label (value "enabled") that the MutatingWebhookConfiguration's namespaceSelector requires."""

CONTAINER_NAME: Final = "outbound-relay"
VOLUME_NAME: Final = "outbound-relay-config"
HOOKS_VOLUME: Final = "outbound-relay-hooks"
NO_TOKEN_VOLUME: Final = "outbound-relay-no-token"  # noqa: S105 - a volume name, not a token
# The API server mounts the Pod's ServiceAccount token into every container without a mount here; the
# relay never calls the API, so an empty directory takes the token's place in the sidecar.
TOKEN_DIR: Final = "/var/run/secrets/kubernetes.io/serviceaccount"  # noqa: S105 - a path
CONFIG_DIR: Final = "/etc/outbound-relay/config"
"""Only the operator's Secret: relay.yaml and the CA files it names, nothing a ConfigMap could add."""
CONFIG_FILE: Final = f"{CONFIG_DIR}/relay.yaml"
HOOKS_DIR: Final = "/etc/outbound-relay/hooks"
"""The hooks ConfigMap's keys (e.g. auth.lua); relay.yaml names them by absolute path."""
METRICS_PORT_NAME: Final = "relay-metrics"  # a port name has at most 15 characters (IANA_SVC_NAME)

# A binding name is checked as OutboundAuthPolicy's scope.binding is (crd_models.BindingName): a Pod's
# default binding then always names a binding that a policy can name too.
_BINDING: TypeAdapter[str] = TypeAdapter(BindingName)
# A Kubernetes resource quantity (apimachinery's resource.Quantity) as a container's requests and limits
# take it: a number with an optional SI or binary suffix or exponent, e.g. "50m", "0.5", "64Mi", "1e3";
# never negative. The chart's values.schema.json takes its pattern from here (chart_schema.py).
QUANTITY_PATTERN = r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$"
_QUANTITY = re.compile(QUANTITY_PATTERN)
# RFC 1123 subdomain, what the API server requires of a ConfigMap name.
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_DNS_SUBDOMAIN = re.compile(DNS_SUBDOMAIN_PATTERN)
ConfigMapName = Annotated[str, Field(max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
LogLevel = Literal["debug", "info", "warning", "error"]

JsonPatch = list[dict[str, Any]]


class InjectionError(ValueError):
    """The Pod asked for the sidecar but cannot get it as written; the message says what to change."""


class ResourceList(BaseModel):
    """Quantities by resource name: cpu, memory, and any other (ephemeral-storage, hugepages-2Mi, ...):
    strings or numbers (`cpu: 0.5`), kept as strings. The chart's values.schema.json says the same
    (generated from QUANTITY_PATTERN by `make crds`)."""

    model_config = ConfigDict(frozen=True, extra="allow", use_attribute_docstrings=True)

    cpu: str | None = None
    """CPU quantity, e.g. "50m" or 0.5."""
    memory: str | None = None
    """Memory quantity, e.g. "64Mi"."""

    @model_validator(mode="before")
    @classmethod
    def _quantities_as_strings(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value  # pydantic says what is wrong
        result: dict[str, str] = {}
        for key, quantity in value.items():
            if quantity is None:
                continue
            if isinstance(quantity, bool) or not isinstance(quantity, str | int | float):
                raise ValueError(f"{key}: a quantity is a string or a number, not {quantity!r}")
            text = f"{quantity:g}" if isinstance(quantity, float) else str(quantity).strip()
            if not _QUANTITY.match(text):
                raise ValueError(f"{key}: {quantity!r} is not a Kubernetes quantity")
            result[str(key)] = text
        return result

    def as_dict(self) -> dict[str, str]:
        return {key: str(value) for key, value in self.model_dump(exclude_none=True).items()}


class Resources(BaseModel):
    """Requests and limits of the sidecar container."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    requests: ResourceList = ResourceList(cpu="20m", memory="64Mi")
    """What the scheduler reserves for the sidecar; default 20m CPU, 64Mi memory."""
    limits: ResourceList = ResourceList(cpu="1", memory="256Mi")
    """Hard caps; default 1 CPU and 256Mi memory. A CPU limit, although throttling only delays mail: a
    namespace whose ResourceQuota covers limits.cpu refuses any container without one, and a LimitRange's
    defaults are applied before the webhook adds the sidecar, so they never reach it."""


class InjectionSettings(BaseModel):
    """What the chart's `relay:` values give the webhook (rendered into sidecar.yaml); camelCase in YAML."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, use_attribute_docstrings=True
    )

    image: str = Field(default="ghcr.io/outbound-relay/outbound-relay:0.1.0", min_length=1)
    """Sidecar image (the same image as the operator's, command `outbound-relay`)."""
    image_pull_policy: PullPolicy = Field(default="IfNotPresent", alias="imagePullPolicy")
    """Kubernetes imagePullPolicy of the sidecar."""
    resources: Resources = Resources()
    """Requests and limits of the sidecar container."""
    run_as_user: int | None = Field(default=None, alias="runAsUser", ge=1)
    """UID of the relay process; none: the image's (65532), or on OpenShift the one its restricted SCC
    assigns from the namespace's range (a fixed UID outside it would be refused). Never root."""
    run_as_group: int | None = Field(default=None, alias="runAsGroup", ge=1)
    """GID of the relay process; none: the image's (65532), or the SCC's."""
    metrics_port: int = Field(default=9425, alias="metricsPort", ge=1, le=65535)
    """Port of the relay's /metrics, passed as `serve --metrics-port` (it overrides relay.yaml's)."""
    config_secret: str = Field(default="outbound-relay-config", alias="configSecret", min_length=1)
    """The Secret the operator renders in each namespace (key relay.yaml)."""
    hooks_config_map: ConfigMapName | None = Field(default=None, alias="hooksConfigMap")
    """ConfigMap mounted at /etc/outbound-relay/hooks in every injected Pod unless the Pod names its own."""
    log_level: LogLevel = Field(default="info", alias="logLevel")
    """`outbound-relay serve --log-level`."""
    shutdown_timeout_seconds: float = Field(default=25.0, alias="shutdownTimeoutSeconds", gt=0, le=3600)
    """`serve --shutdown-timeout`: keep it below the Pod's terminationGracePeriodSeconds (30); at most an
    hour, which catches a value meant in milliseconds."""
    prometheus_annotations: bool = Field(default=True, alias="prometheusAnnotations")
    """Add prometheus.io/scrape|port|path to the Pod when it has none of its own."""

    @classmethod
    def load(cls, path: Path) -> InjectionSettings:
        """Read sidecar.yaml; raises ValueError naming the file and the bad key."""
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            return cls.model_validate(data)
        except OSError as error:
            raise ValueError(f"{path}: cannot be read: {error.strerror}") from error
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not YAML: {error}") from error
        except ValidationError as error:
            reasons = "; ".join(
                f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']}"
                for item in error.errors(include_url=False, include_input=False)
            )
            raise ValueError(f"{path}: {reasons}") from error


def wants_injection(pod: Mapping[str, Any]) -> bool:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(ANNOTATION_INJECT, "")).strip().lower() == "true"


def is_injected(pod: Mapping[str, Any]) -> bool:
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]
    return any(c.get("name") == CONTAINER_NAME for c in containers)


IMAGE_UID = 65532  # the image's USER (Dockerfile)


def sidecar_container(
    settings: InjectionSettings, *, binding: str | None = None, hooks: bool = False
) -> dict[str, Any]:
    """The init container with `restartPolicy: Always` that runs the relay."""
    args = [
        "serve",
        "--config",
        CONFIG_FILE,
        "--log-level",
        settings.log_level,
        # One JSON object a line, for log collectors; each message outcome's fields at the top level.
        "--log-format",
        "json",
        "--shutdown-timeout",
        f"{settings.shutdown_timeout_seconds:g}",
        # The port the probes and Prometheus use, whatever relay.yaml says (the operator renders none).
        "--metrics-port",
        str(settings.metrics_port),
        # A namespace with no rendered Secret yet (labelled before its first policy, or after the last was
        # deleted): the relay starts, defers all mail with 451 4.3.5 and loads the config once it appears.
        "--allow-missing-config",
    ]
    if binding is not None:
        args += ["--default-binding", binding]
    probe = {"httpGet": {"path": "/metrics", "port": METRICS_PORT_NAME}}
    resources = {
        kind: values
        for kind, values in (
            ("requests", settings.resources.requests.as_dict()),
            ("limits", settings.resources.limits.as_dict()),
        )
        if values
    }
    return {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["outbound-relay"],
        "args": args,
        "restartPolicy": "Always",
        "ports": [{"name": METRICS_PORT_NAME, "containerPort": settings.metrics_port, "protocol": "TCP"}],
        # The app's containers start once this passes: nothing is submitted before the relay listens.
        "startupProbe": {**probe, "periodSeconds": 1, "failureThreshold": 60},
        "readinessProbe": {**probe, "periodSeconds": 10},
        # /healthz fails only when the relay can no longer run its hooks (docs/metrics.md); 30 s of it
        # outlasts the hook worker's restart backoff (5 s at most).
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": METRICS_PORT_NAME},
            "periodSeconds": 10,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "resources": resources,
        "volumeMounts": [
            {"name": VOLUME_NAME, "mountPath": CONFIG_DIR, "readOnly": True},
            *([{"name": HOOKS_VOLUME, "mountPath": HOOKS_DIR, "readOnly": True}] if hooks else []),
            {"name": NO_TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": True},
        ],
        "securityContext": {
            "runAsNonRoot": True,
            **({"runAsUser": settings.run_as_user} if settings.run_as_user is not None else {}),
            **({"runAsGroup": settings.run_as_group} if settings.run_as_group is not None else {}),
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def config_volume(settings: InjectionSettings) -> dict[str, Any]:
    """The rendered Secret, alone in its volume: a projected volume merging it with the hooks ConfigMap
    would let a ConfigMap key `relay.yaml` or `ca-*.pem` silently replace the operator's file, and anyone
    who may edit that ConfigMap is not necessarily allowed to change what the relay loads.

    Optional: a Pod of a namespace with no policy yet (so no rendered Secret) starts anyway, its relay
    answers every transaction `451 4.3.5` (the app retries) until the kubelet projects the Secret, then
    loads it; a required Secret would hold the Pod in ContainerCreating instead."""
    return {"name": VOLUME_NAME, "secret": {"secretName": settings.config_secret, "optional": True}}


def hooks_volume(name: str) -> dict[str, Any]:
    """The hooks ConfigMap in a volume of its own, mounted at HOOKS_DIR; optional as the Secret is."""
    return {"name": HOOKS_VOLUME, "configMap": {"name": name, "optional": True}}


def _pointer(*parts: str) -> str:
    """JSON Pointer (RFC 6901) from path segments: '~' and '/' inside a segment are escaped."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def _requested(pod: Mapping[str, Any], settings: InjectionSettings) -> tuple[str | None, str | None]:
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    binding = annotations.get(ANNOTATION_BINDING)
    if binding is not None:
        try:
            _BINDING.validate_python(binding)
        except ValidationError as error:
            (problem,) = error.errors(include_url=False, include_input=False)
            reason = str(problem["msg"]).removeprefix("Value error, ")
            raise InjectionError(f"annotation {ANNOTATION_BINDING}: {reason}") from None
    hooks = annotations.get(ANNOTATION_HOOKS, settings.hooks_config_map)
    if hooks is not None and (len(hooks) > 253 or not _DNS_SUBDOMAIN.match(hooks)):
        raise InjectionError(f"annotation {ANNOTATION_HOOKS}: {hooks!r} is not a ConfigMap name")
    return binding, hooks


def injection_patch(pod: Mapping[str, Any], settings: InjectionSettings) -> JsonPatch:
    """The JSONPatch that adds the sidecar to `pod`; [] if the Pod did not opt in or has it already.

    Raises InjectionError if the Pod opted in but cannot be injected as written."""
    if not wants_injection(pod) or is_injected(pod):
        return []
    spec = pod.get("spec") or {}
    if spec.get("hostNetwork"):
        raise InjectionError(
            "hostNetwork Pods cannot get the relay sidecar: its ports 2525 and "
            f"{settings.metrics_port} would clash with every other such Pod on the node"
        )
    for volume in spec.get("volumes") or ():
        if volume.get("name") in (VOLUME_NAME, HOOKS_VOLUME, NO_TOKEN_VOLUME):
            raise InjectionError(f"the Pod already has a volume named {volume['name']!r}; rename it")
    binding, hooks = _requested(pod, settings)

    patch: JsonPatch = []
    container = sidecar_container(settings, binding=binding, hooks=hooks is not None)
    pod_security = spec.get("securityContext") or {}
    if settings.run_as_user is None and pod_security.get("runAsUser") == 0:
        # The sidecar would inherit root from the Pod and be refused (runAsNonRoot): run it as the image's
        # user instead, which is what it gets in every other Pod that names no UID.
        container["securityContext"] |= {"runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID}
    # First of the init containers, so that later init containers can send mail too.
    if spec.get("initContainers"):
        patch.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
    else:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": [container]})
    volumes = [
        config_volume(settings),
        *([hooks_volume(hooks)] if hooks is not None else []),
        # Not 1Ki: the kubelet measures an emptyDir with du, and an empty directory takes a 4 KiB block on
        # ext4; above its sizeLimit the whole Pod is evicted (seen on a real kubelet, tests/node).
        {"name": NO_TOKEN_VOLUME, "emptyDir": {"sizeLimit": "64Ki"}},
    ]
    if spec.get("volumes"):
        patch += [{"op": "add", "path": "/spec/volumes/-", "value": volume} for volume in volumes]
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": volumes})

    annotations = dict((pod.get("metadata") or {}).get("annotations") or {})
    added = {ANNOTATION_INJECTED: "true"}
    # Only when the Pod has no Prometheus annotations of its own: those belong to the app's metrics.
    if settings.prometheus_annotations and not any(k.startswith("prometheus.io/") for k in annotations):
        added |= {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(settings.metrics_port),
            "prometheus.io/path": "/metrics",
        }
    # The opt-in annotation exists, so metadata.annotations does too: add key by key.
    patch += [
        {"op": "add", "path": _pointer("metadata", "annotations", key), "value": value}
        for key, value in added.items()
    ]
    # A label too, so that a PodMonitor (or `kubectl get pods -l`) can select every injected Pod.
    if (pod.get("metadata") or {}).get("labels"):
        patch.append(
            {"op": "add", "path": _pointer("metadata", "labels", ANNOTATION_INJECTED), "value": "true"}
        )
    else:
        patch.append({"op": "add", "path": "/metadata/labels", "value": {ANNOTATION_INJECTED: "true"}})
    return patch


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def apply_json_patch(document: Mapping[str, Any], patch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A copy of `document` with the `add` operations of `patch` applied (all that injection emits)."""
    result = copy.deepcopy(dict(document))
    for operation in patch:
        if operation["op"] != "add":
            raise ValueError(f"unsupported JSONPatch op {operation['op']!r}")
        *parents, last = [_unescape(p) for p in operation["path"].split("/")[1:]]
        node: Any = result
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        value = copy.deepcopy(operation["value"])
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            node[last] = value
    return result


def inject(pod: Mapping[str, Any], settings: InjectionSettings) -> dict[str, Any]:
    """The Pod as the webhook makes it: `pod` with `injection_patch` applied (a copy; `pod` is untouched)."""
    return apply_json_patch(pod, injection_patch(pod, settings))
