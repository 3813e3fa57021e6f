{{/* The pod template both workloads share: the StatefulSet (store.type sqlite) and the Deployment (store.type etcd). */}}
{{- define "normserve.podTemplate" -}}
template:
  metadata:
    labels:
      {{- include "normserve.labels" . | nindent 6 }}
      {{- with .Values.podLabels }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with .Values.podAnnotations }}
    annotations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  spec:
    serviceAccountName: {{ include "normserve.serviceAccountName" . }}
    automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
    {{- with .Values.imagePullSecrets }}
    imagePullSecrets:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if .Values.priorityClassName }}
    priorityClassName: {{ .Values.priorityClassName | quote }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.podSecurityContext | nindent 6 }}
    terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds | int }}
    containers:
      - name: normserve
        image: {{ include "normserve.image" . | quote }}
        imagePullPolicy: {{ .Values.image.pullPolicy }}
        securityContext:
          {{- toYaml .Values.containerSecurityContext | nindent 10 }}
        ports:
          - name: grpc
            containerPort: {{ .Values.ports.grpc | int }}
            protocol: TCP
          - name: health
            containerPort: {{ .Values.ports.health | int }}
            protocol: TCP
          {{- if .Values.metrics.enabled }}
          - name: metrics
            containerPort: {{ .Values.ports.metrics | int }}
            protocol: TCP
          {{- end }}
        env:
          - name: POD_NAME
            valueFrom:
              fieldRef:
                fieldPath: metadata.name
          {{- if eq .Values.store.type "etcd" }}
          - name: POD_IP
            valueFrom:
              fieldRef:
                fieldPath: status.podIP
          {{- end }}
          {{- if .Values.nodeOptions }}
          - name: NODE_OPTIONS
            value: {{ .Values.nodeOptions | quote }}
          {{- end }}
          # Set by the chart from its other values.
          - name: NORMSERVE_PORT
            value: {{ .Values.ports.grpc | int | quote }}
          - name: NORMSERVE_HEALTH_PORT
            value: {{ .Values.ports.health | int | quote }}
          - name: NORMSERVE_METRICS_PORT
            value: {{ .Values.ports.metrics | int | quote }}
          - name: NORMSERVE_STORE
            value: {{ include "normserve.store" . | quote }}
          # With etcd: where the other replicas send callers of this pod's modules (docs/scale-out.md).
          - name: NORMSERVE_ADVERTISE_ADDRESS
            value: {{ ternary (printf "$(POD_IP):%d" (int .Values.ports.grpc)) "" (eq .Values.store.type "etcd") | quote }}
          - name: NORMSERVE_TLS_CERT
            value: {{ ternary "/etc/normserve/tls/tls.crt" "" .Values.tls.enabled | quote }}
          - name: NORMSERVE_TLS_KEY
            value: {{ ternary "/etc/normserve/tls/tls.key" "" .Values.tls.enabled | quote }}
          - name: NORMSERVE_TLS_CLIENT_CA
            value: {{ ternary "/etc/normserve/tls/ca.crt" "" .Values.tls.clientAuth | quote }}
          - name: NORMSERVE_AUTH_TOKENS_FILE
            value: {{ ternary (printf "/etc/normserve/auth/%s" .Values.auth.secretKey) "" .Values.auth.enabled | quote }}
          # From `config` (docs/configuration.md).
          - name: NORMSERVE_HOST
            value: {{ .Values.config.host | quote }}
          - name: NORMSERVE_LEASE_TTL_SECONDS
            value: {{ .Values.config.leaseTtlSeconds | int64 | quote }}
          - name: NORMSERVE_BACKEND
            value: {{ .Values.config.backend | quote }}
          - name: NORMSERVE_LOG_LEVEL
            value: {{ .Values.config.logLevel | quote }}
          - name: NORMSERVE_DURABILITY
            value: {{ .Values.config.durability | quote }}
          - name: NORMSERVE_CHECKPOINT_MS
            value: {{ .Values.config.checkpointMs | int64 | quote }}
          - name: NORMSERVE_MAX_MESSAGE_BYTES
            value: {{ .Values.config.maxMessageBytes | int64 | quote }}
          - name: NORMSERVE_FLOW_CONTROL_WINDOW
            value: {{ .Values.config.flowControlWindow | int64 | quote }}
          - name: NORMSERVE_STREAM_BUDGET_BYTES
            value: {{ .Values.config.streamBudgetBytes | int64 | quote }}
          - name: NORMSERVE_STREAM_CHUNK_BYTES
            value: {{ .Values.config.streamChunkBytes | int64 | quote }}
          - name: NORMSERVE_SHM_DIR
            value: {{ .Values.config.shmDir | quote }}
          - name: NORMSERVE_MAX_TENSOR_ELEMENTS
            value: {{ .Values.config.maxTensorElements | int64 | quote }}
          - name: NORMSERVE_MAX_MODULES
            value: {{ .Values.config.maxModules | int64 | quote }}
          - name: NORMSERVE_MAX_CALLS
            value: {{ .Values.config.maxCalls | int64 | quote }}
          - name: NORMSERVE_MAX_CALLS_PER_MODULE
            value: {{ .Values.config.maxCallsPerModule | int64 | quote }}
          - name: NORMSERVE_CONTEXT_BUDGET_BYTES
            value: {{ .Values.config.contextBudgetBytes | int64 | quote }}
          - name: NORMSERVE_CONTEXT_TTL_MS
            value: {{ .Values.config.contextTtlMs | int64 | quote }}
          - name: NORMSERVE_STEP_TIMEOUT_MS
            value: {{ .Values.config.stepTimeoutMs | int64 | quote }}
          - name: NORMSERVE_STEP_RESULTS_KEPT
            value: {{ .Values.config.stepResultsKept | int64 | quote }}
          - name: NORMSERVE_SHUTDOWN_GRACE_MS
            value: {{ .Values.config.shutdownGraceMs | int64 | quote }}
          {{- with .Values.extraEnv }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- if .Values.probes.startup.enabled }}
        startupProbe:
          grpc:
            port: {{ .Values.ports.health | int }}
            service: liveness
          periodSeconds: {{ .Values.probes.startup.periodSeconds | int }}
          timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds | int }}
          failureThreshold: {{ .Values.probes.startup.failureThreshold | int }}
        {{- end }}
        {{- if .Values.probes.liveness.enabled }}
        livenessProbe:
          grpc:
            port: {{ .Values.ports.health | int }}
            service: liveness
          periodSeconds: {{ .Values.probes.liveness.periodSeconds | int }}
          timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds | int }}
          failureThreshold: {{ .Values.probes.liveness.failureThreshold | int }}
        {{- end }}
        {{- if .Values.probes.readiness.enabled }}
        readinessProbe:
          grpc:
            port: {{ .Values.ports.health | int }}
            service: normserve.v1.BatchNormService
          periodSeconds: {{ .Values.probes.readiness.periodSeconds | int }}
          timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds | int }}
          failureThreshold: {{ .Values.probes.readiness.failureThreshold | int }}
        {{- end }}
        {{- if gt (int .Values.preStopSleepSeconds) 0 }}
        lifecycle:
          preStop:
            sleep:
              seconds: {{ .Values.preStopSleepSeconds | int }}
        {{- end }}
        resources:
          {{- toYaml .Values.resources | nindent 10 }}
        volumeMounts:
          {{- if eq .Values.store.type "sqlite" }}
          - name: data
            mountPath: {{ .Values.persistence.mountPath }}
          {{- end }}
          - name: tmp
            mountPath: /tmp
          {{- if .Values.tls.enabled }}
          - name: tls
            mountPath: /etc/normserve/tls
            readOnly: true
          {{- end }}
          {{- if .Values.auth.enabled }}
          - name: auth
            mountPath: /etc/normserve/auth
            readOnly: true
          {{- end }}
          {{- with .Values.extraVolumeMounts }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
    volumes:
      {{- if and (eq .Values.store.type "sqlite") (not .Values.persistence.enabled) }}
      - name: data
        emptyDir: {}
      {{- end }}
      - name: tmp
        emptyDir: {}
      {{- if .Values.tls.enabled }}
      - name: tls
        secret:
          secretName: {{ .Values.tls.secretName }}
      {{- end }}
      {{- if .Values.auth.enabled }}
      - name: auth
        secret:
          secretName: {{ .Values.auth.existingSecret }}
      {{- end }}
      {{- with .Values.extraVolumes }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- with .Values.nodeSelector }}
    nodeSelector:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.affinity }}
    affinity:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.tolerations }}
    tolerations:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- with .Values.topologySpreadConstraints }}
    topologySpreadConstraints:
      {{- toYaml . | nindent 6 }}
    {{- end }}
{{- end -}}
