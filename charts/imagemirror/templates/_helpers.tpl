{{/*
Chart name, overridable with nameOverride.
*/}}
{{- define "imagemirror.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name, truncated to 63 characters (the DNS label limit).
If the release name contains the chart name, the release name is used alone.
*/}}
{{- define "imagemirror.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Chart name and version, for the helm.sh/chart label.
*/}}
{{- define "imagemirror.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "imagemirror.labels" -}}
helm.sh/chart: {{ include "imagemirror.chart" . }}
{{ include "imagemirror.selectorLabels" . }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: controller
app.kubernetes.io/part-of: imagemirror
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels: stable across upgrades, so never include the version here.
*/}}
{{- define "imagemirror.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imagemirror.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Name of the ServiceAccount the controller runs as.
*/}}
{{- define "imagemirror.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imagemirror.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Controller image reference: repository@digest, or repository:tag (tag defaults to appVersion).
*/}}
{{- define "imagemirror.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Whether leader election is on: "true" or "" (empty is false in templates).
leaderElection.enabled null → on when replicas > 1; true → on; false → off, refused with replicas > 1.
With sharding.shards > 1 it is off: the shard Leases keep replicas apart.
*/}}
{{- define "imagemirror.leaderElection" -}}
{{- $enabled := .Values.leaderElection.enabled }}
{{- if include "imagemirror.sharded" . }}
{{- if $enabled }}
{{- fail "leaderElection.enabled=true with sharding.shards > 1: the shard Leases replace leader election; leave leaderElection.enabled null" }}
{{- end }}
{{- else if kindIs "invalid" $enabled }}
{{- if gt (int .Values.replicas) 1 }}true{{ end }}
{{- else if $enabled }}
{{- print "true" }}
{{- else if gt (int .Values.replicas) 1 }}
{{- fail "leaderElection.enabled=false with replicas > 1 would let several controllers reconcile the same ImageMirrors at once; enable leader election or set replicas: 1" }}
{{- end }}
{{- end }}

{{/*
Whether the controller shards ImageMirrors across replicas with shard Leases: "true" or "".
*/}}
{{- define "imagemirror.sharded" -}}
{{- if gt (int .Values.sharding.shards) 1 }}true{{ end }}
{{- end }}

{{/*
Name of the leader-election Lease.
*/}}
{{- define "imagemirror.leaseName" -}}
{{- default (printf "%s-leader" (include "imagemirror.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
Mount path of the extra CA bundle directory.
*/}}
{{- define "imagemirror.caDir" -}}
/etc/imagemirror/ca
{{- end }}

{{/*
The controller's RBAC rules, shared by the ClusterRole and the per-namespace Roles.
No wildcards: every group, resource and verb is named.
*/}}
{{- define "imagemirror.rules" -}}
- apiGroups: ["imagemirror.dev"]
  resources: ["imagemirrors"]
  # patch: the prune record annotation (imagemirror.dev/prune-record), for spec.prune.
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["imagemirror.dev"]
  resources: ["imagemirrors/status"]
  verbs: ["get", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
