{{/* Names, labels and the values derived from several others. */}}

{{- define "normserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "normserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "normserve.headlessName" -}}
{{- printf "%s-headless" (include "normserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "normserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "normserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "normserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "normserve.labels" -}}
helm.sh/chart: {{ include "normserve.chart" . }}
{{ include "normserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "normserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "normserve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "normserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* How many replicas own modules: placement.replicas, or replicaCount when it is 0. */}}
{{- define "normserve.owners" -}}
{{- $owners := int .Values.placement.replicas -}}
{{- if eq $owners 0 -}}
{{- $owners = int .Values.replicaCount -}}
{{- end -}}
{{- if gt $owners (int .Values.replicaCount) -}}
{{- fail (printf "placement.replicas (%d) cannot exceed replicaCount (%d): every owner must be a running pod" $owners (int .Values.replicaCount)) -}}
{{- end -}}
{{- $owners -}}
{{- end -}}

{{/* A pod's stable address, for --peers and --self-address: <pod>.<headless service>.<namespace>.svc.<domain>:<port>. */}}
{{- define "normserve.podAddress" -}}
{{- printf "%s.%s.%s.svc.%s:%d" .pod (include "normserve.headlessName" .root) .root.Release.Namespace .root.Values.clusterDomain (int .root.Values.ports.grpc) -}}
{{- end -}}

{{/* The --peers list: the first placement.replicas pods, in ordinal order. */}}
{{- define "normserve.peers" -}}
{{- $root := . -}}
{{- $peers := list -}}
{{- range $i := until (int (include "normserve.owners" .)) -}}
{{- $pod := printf "%s-%d" (include "normserve.fullname" $root) $i -}}
{{- $peers = append $peers (include "normserve.podAddress" (dict "pod" $pod "root" $root)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* Settings that cannot work together, refused at render time with what to change. */}}
{{- define "normserve.checks" -}}
{{- $drainMs := add (mul (int .Values.preStopSleepSeconds) 1000) (int .Values.config.shutdownGraceMs) -}}
{{- if le (mul (int .Values.terminationGracePeriodSeconds) 1000) $drainMs -}}
{{- fail (printf "terminationGracePeriodSeconds (%d s) must exceed preStopSleepSeconds plus config.shutdownGraceMs (%d ms), or the kubelet kills pods mid-drain" (int .Values.terminationGracePeriodSeconds) $drainMs) -}}
{{- end -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) -}}
{{- fail "tls.enabled needs tls.secretName: a kubernetes.io/tls Secret with tls.crt and tls.key" -}}
{{- end -}}
{{- if and .Values.tls.clientAuth (not .Values.tls.enabled) -}}
{{- fail "tls.clientAuth needs tls.enabled" -}}
{{- end -}}
{{- if and .Values.auth.enabled (not .Values.auth.existingSecret) -}}
{{- fail "auth.enabled needs auth.existingSecret: a Secret holding the tokens file (docs/security.md)" -}}
{{- end -}}
{{- end -}}
