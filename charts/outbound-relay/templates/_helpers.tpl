{{/* Names and labels shared by every template. */}}

{{- define "outbound-relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
A name cut to 63 characters (a DNS label: Service names, label values) the same way everywhere: when too
long, its first 54 characters and 8 of its SHA-256, so that two long names differing only at the end (one
release name in two namespaces, "-webhook" and "-webhook-tls") stay distinct.
*/}}
{{- define "outbound-relay.fit" -}}
{{- if le (len .) 63 }}
{{- . }}
{{- else }}
{{- printf "%s-%s" (trunc 54 . | trimSuffix "-") (sha256sum . | trunc 8) }}
{{- end }}
{{- end }}

{{/* The full name before fitting: what every derived name is built from. */}}
{{- define "outbound-relay.rawFullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride }}
{{- else if contains (include "outbound-relay.name" .) .Release.Name }}
{{- .Release.Name }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "outbound-relay.name" .) }}
{{- end }}
{{- end }}

{{- define "outbound-relay.fullname" -}}
{{- include "outbound-relay.fit" (include "outbound-relay.rawFullname" .) }}
{{- end }}

{{/* (list . "suffix"): the full name with a suffix, fitted as a whole. */}}
{{- define "outbound-relay.suffixedName" -}}
{{- $root := index . 0 }}
{{- include "outbound-relay.fit" (printf "%s-%s" (include "outbound-relay.rawFullname" $root) (index . 1)) }}
{{- end }}

{{- define "outbound-relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outbound-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "outbound-relay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "outbound-relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: outbound-relay
{{- end }}

{{- define "outbound-relay.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outbound-relay.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image: repository@digest when image.digest is set (the tag is then ignored). */}}
{{- define "outbound-relay.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The sidecar's image: relay.image.* where set, else the operator's image (with its digest, if any).
relay.image.digest pins the sidecar's own; a relay.image.repository or tag of its own drops image.digest,
which names another image.
*/}}
{{- define "outbound-relay.relayImage" -}}
{{- $relay := .Values.relay.image }}
{{- $repository := default .Values.image.repository $relay.repository }}
{{- if $relay.digest }}
{{- printf "%s@%s" $repository $relay.digest }}
{{- else if or $relay.repository $relay.tag }}
{{- printf "%s:%s" $repository (default (default .Chart.AppVersion .Values.image.tag) $relay.tag) }}
{{- else }}
{{- include "outbound-relay.image" . }}
{{- end }}
{{- end }}

{{/* The CRD files the chart ships (files/crds/, all of them). */}}
{{- define "outbound-relay.crdNames" -}}
{{- $names := list }}
{{- range $path, $_ := .Files.Glob "files/crds/*.yaml" }}
{{- $names = append $names ($.Files.Get $path | fromYaml).metadata.name }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* Cluster-scoped names carry the namespace too: one release name may be installed in two namespaces. */}}
{{- define "outbound-relay.clusterName" -}}
{{- include "outbound-relay.fit" (printf "%s-%s" (include "outbound-relay.rawFullname" .) .Release.Namespace) }}
{{- end }}

{{- define "outbound-relay.webhookService" -}}
{{- include "outbound-relay.suffixedName" (list . "webhook") }}
{{- end }}

{{- define "outbound-relay.webhookCertSecret" -}}
{{- include "outbound-relay.suffixedName" (list . "webhook-tls") }}
{{- end }}

{{/* Never injected: kube-system and friends, and the operator's own namespace (it would wait for itself). */}}
{{- define "outbound-relay.excludedNamespaces" -}}
{{- $excluded := concat .Values.webhook.excludedNamespaces (list "kube-system" .Release.Namespace) | uniq }}
{{- toJson $excluded }}
{{- end }}

{{/* The operator's identity as the API server sees it (RBAC subjects, the ValidatingAdmissionPolicy). */}}
{{- define "outbound-relay.operatorUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "outbound-relay.serviceAccountName" .) }}
{{- end }}

{{/*
The ClusterRole with the operator's rules for a namespace it renders, and the name of each RoleBinding to
it (one per namespace: the operator's own when namespaces opt in by label, the chart's for
operator.watchNamespaces).
*/}}
{{- define "outbound-relay.renderRole" -}}
{{- include "outbound-relay.fit" (printf "%s-%s-render" (include "outbound-relay.rawFullname" .) .Release.Namespace) }}
{{- end }}

{{/* Namespaces opt in to injection and rendering with this label (value "enabled"). */}}
{{- define "outbound-relay.optInLabel" -}}
outboundrelay.io/inject
{{- end }}

{{/* The operator's rules for a namespace it renders; bound per namespace only, never cluster-wide. */}}
{{- define "outbound-relay.namespacedRules" -}}
- apiGroups: [outboundrelay.io]
  resources: [outboundauthpolicies, outboundbindinggroups, outboundrelaysettings]
  verbs: [get, list, watch]
- apiGroups: [outboundrelay.io]
  resources: [outboundauthpolicies/status, outboundbindinggroups/status, outboundrelaysettings/status]
  verbs: [get, patch]
# The Lua hooks an OutboundRelaySettings names are read from ConfigMaps; read only, never written.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, watch]
# Referenced Secrets are read, the rendered one is written. RBAC cannot limit create by name: the
# ValidatingAdmissionPolicy confines the operator's writes to the Opaque Secret outbound-relay-config.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create]
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [outbound-relay-config]
  verbs: [update, patch, delete]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Opted-in Pods admitted without the sidecar (the webhook was down) get an Event (uninjected.py).
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
{{- end }}

{{- define "outbound-relay.sidecarSettings" -}}
image: {{ include "outbound-relay.relayImage" . | quote }}
imagePullPolicy: {{ default .Values.image.pullPolicy .Values.relay.image.pullPolicy }}
resources:
  {{- toYaml .Values.relay.resources | nindent 2 }}
{{- with .Values.relay.runAsUser }}
runAsUser: {{ . }}
{{- end }}
{{- with .Values.relay.runAsGroup }}
runAsGroup: {{ . }}
{{- end }}
metricsPort: {{ .Values.relay.metricsPort }}
logLevel: {{ .Values.relay.logLevel }}
shutdownTimeoutSeconds: {{ .Values.relay.shutdownTimeoutSeconds }}
{{- with .Values.relay.hooksConfigMap }}
hooksConfigMap: {{ . | quote }}
{{- end }}
prometheusAnnotations: {{ .Values.relay.prometheusAnnotations }}
{{- end }}
