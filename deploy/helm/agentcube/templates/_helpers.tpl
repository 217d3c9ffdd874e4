{{- define "agentcube.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "agentcube.labels" -}}
app.kubernetes.io/name: {{ include "agentcube.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* image: a string (upstream style) or {repository, tag} */}}
{{- define "agentcube.image" -}}
{{- if kindIs "string" . -}}
{{ . }}
{{- else -}}
{{ .repository }}:{{ .tag | default "latest" }}
{{- end -}}
{{- end -}}

{{- define "agentcube.redisAddr" -}}
{{- if .Values.bundledRedis.enabled -}}
{{ .Release.Name }}-redis.{{ .Release.Namespace }}.svc.cluster.local:6379
{{- else -}}
{{ required "redis.addr is required (or set bundledRedis.enabled=true)" .Values.redis.addr }}
{{- end -}}
{{- end -}}

{{/* The Secret holding the store's password: redis.secretName, else <release>-redis. */}}
{{- define "agentcube.redisSecretName" -}}
{{ default (printf "%s-redis" .Release.Name) .Values.redis.secretName }}
{{- end -}}

{{/* Whether the store has a password: one given, or the bundled Redis's (generated when none
is given: any pod that reaches it, a sandbox's included, could otherwise rewrite sessions). */}}
{{- define "agentcube.redisHasPassword" -}}
{{- if or .Values.redis.password .Values.redis.secretName .Values.bundledRedis.enabled }}true{{ end -}}
{{- end -}}

{{- define "agentcube.redisEnv" -}}
- name: REDIS_ADDR
  value: {{ include "agentcube.redisAddr" . | quote }}
{{- if include "agentcube.redisHasPassword" . }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "agentcube.redisSecretName" . }}
      key: {{ .Values.redis.secretKey }}
{{- else }}
- name: REDIS_PASSWORD_REQUIRED
  value: "false"
{{- end }}
{{- with .Values.redis.tls }}
{{- if .enabled }}
- name: AGENTCUBE_STORE_TLS
  value: "true"
{{- if .secretName }}
- name: AGENTCUBE_STORE_CA_FILE
  value: /etc/agentcube/store-tls/ca.crt
{{- if .clientCertificate }}
- name: AGENTCUBE_STORE_CERT_FILE
  value: /etc/agentcube/store-tls/tls.crt
- name: AGENTCUBE_STORE_KEY_FILE
  value: /etc/agentcube/store-tls/tls.key
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The store's TLS files (redis.tls.secretName), as a volume mount and a volume. */}}
{{- define "agentcube.storeTlsMount" -}}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.secretName }}
- name: store-tls
  mountPath: /etc/agentcube/store-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "agentcube.storeTlsVolume" -}}
{{- if and .Values.redis.tls.enabled .Values.redis.tls.secretName }}
- name: store-tls
  secret:
    secretName: {{ .Values.redis.tls.secretName }}
{{- end }}
{{- end -}}

{{/* Listener limit flags of a component (its values' `limits`). */}}
{{- define "agentcube.limitArgs" -}}
- --header-timeout={{ .headerTimeout }}
- --body-idle-timeout={{ .bodyIdleTimeout }}
- --keep-alive-idle={{ .keepAliveIdle }}
{{- if .maxConnections }}
- --max-connections={{ .maxConnections }}
{{- end }}
{{- end }}

{{/* A label map as `k=v,k2=v2` (sorted), for selector flags. */}}
{{- define "agentcube.selector" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}
{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

{{/* Where a component's pods run: its nodeSelector, tolerations, affinity,
topologySpreadConstraints and priorityClassName, as pod spec fields (nothing when unset). Use as
`with include "agentcube.podPlacement" .Values.<component> | trim`. */}}
{{- define "agentcube.podPlacement" -}}
{{- range $field := list "nodeSelector" "tolerations" "affinity" "topologySpreadConstraints" }}
{{- with index $ $field }}
{{ $field }}:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- with .priorityClassName }}
priorityClassName: {{ . | quote }}
{{- end }}
{{- end -}}
