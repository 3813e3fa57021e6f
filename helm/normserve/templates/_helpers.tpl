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

{{/* The bundled etcd's names: its StatefulSet and client Service, and its headless Service for member addresses. */}}
{{- define "normserve.etcdName" -}}
{{- printf "%s-etcd" (include "normserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "normserve.etcdHeadlessName" -}}
{{- printf "%s-etcd-headless" (include "normserve.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "normserve.etcdSelectorLabels" -}}
app.kubernetes.io/name: {{ include "normserve.name" . }}-etcd
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "normserve.etcdLabels" -}}
helm.sh/chart: {{ include "normserve.chart" . }}
{{ include "normserve.etcdSelectorLabels" . }}
app.kubernetes.io/version: {{ .Values.etcd.bundled.image.tag | quote }}
app.kubernetes.io/component: store
app.kubernetes.io/part-of: {{ include "normserve.name" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* A bundled etcd member's stable DNS name: <etcd>-<i>.<etcd headless>.<namespace>.svc.<domain>. */}}
{{- define "normserve.etcdMemberHost" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "normserve.etcdName" .root) (int .i) (include "normserve.etcdHeadlessName" .root) .root.Release.Namespace .root.Values.clusterDomain -}}
{{- end -}}

{{/* The etcd client endpoints normserve uses: etcd.endpoints, or every member of the bundled etcd. */}}
{{- define "normserve.etcdEndpoints" -}}
{{- $root := . -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- $hosts := list -}}
{{- range $i := until (int .Values.etcd.bundled.replicas) -}}
{{- $hosts = append $hosts (printf "%s:2379" (include "normserve.etcdMemberHost" (dict "i" $i "root" $root))) -}}
{{- end -}}
{{- join "," $hosts -}}
{{- else -}}
{{- join "," .Values.etcd.endpoints -}}
{{- end -}}
{{- end -}}

{{/* The server's --store: sqlite:<mount path> on the pod's volume, or etcd://<endpoints>/<prefix>. */}}
{{- define "normserve.store" -}}
{{- if eq .Values.store.type "etcd" -}}
{{- printf "etcd://%s/%s" (include "normserve.etcdEndpoints" .) .Values.etcd.prefix -}}
{{- else -}}
{{- printf "sqlite:%s" .Values.persistence.mountPath -}}
{{- end -}}
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
{{- if eq .Values.store.type "sqlite" -}}
{{- if gt (int .Values.replicaCount) 1 -}}
{{- fail (printf "replicaCount %d needs store.type etcd: with sqlite one pod keeps every module on its own volume (docs/scale-out.md)" (int .Values.replicaCount)) -}}
{{- end -}}
{{- if .Values.etcd.bundled.enabled -}}
{{- fail "etcd.bundled.enabled needs store.type etcd: with sqlite nothing uses the etcd" -}}
{{- end -}}
{{- else -}}
{{- if and .Values.etcd.bundled.enabled (gt (len .Values.etcd.endpoints) 0) -}}
{{- fail "store.type etcd takes etcd.endpoints or etcd.bundled.enabled, not both: which etcd holds the modules?" -}}
{{- end -}}
{{- if and (not .Values.etcd.bundled.enabled) (eq (len .Values.etcd.endpoints) 0) -}}
{{- fail "store.type etcd needs an etcd: list its client endpoints (host:2379) in etcd.endpoints, or set etcd.bundled.enabled" -}}
{{- end -}}
{{- if ne .Values.config.durability "strict" -}}
{{- fail (printf "config.durability %s is for store.type sqlite: with etcd every change is committed before its call is answered" .Values.config.durability) -}}
{{- end -}}
{{- end -}}
{{- end -}}
