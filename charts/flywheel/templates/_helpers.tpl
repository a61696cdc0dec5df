{{/* The release's base name. */}}
{{- define "flywheel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; `component` names the service. */}}
{{- define "flywheel.labels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- /* The run, copied onto every scraped metric (the ServiceMonitor's targetLabels). */}}
flywheel-run: {{ .root.Values.config.storage.run_id | trunc 63 | quote }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component. */}}
{{- define "flywheel.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "flywheel.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "flywheel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "flywheel.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
The run's config file: `config` from the values, with the fields the chart owns.
*/}}
{{- define "flywheel.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $coordinator := get $config "coordinator" | default dict -}}
{{- $_ := set $coordinator "bind" (printf "0.0.0.0:%d" (int .Values.coordinator.port)) -}}
{{- $_ := set $config "coordinator" $coordinator -}}
{{- $worker := get $config "worker" | default dict -}}
{{- $_ := set $worker "metrics_addr" (printf "0.0.0.0:%d" (int .Values.worker.metricsPort)) -}}
{{- $_ := set $worker "grace_period_ms" (mul (int .Values.worker.drainSeconds) 1000) -}}
{{- if .Values.worker.engineSidecar.enabled -}}
{{- /* The sidecar on loopback, loaded with each version through the shared /weights. */ -}}
{{- $engine := get $worker "engine" | default dict -}}
{{- $_ := set $engine "kind" .Values.worker.engineSidecar.kind -}}
{{- $_ := set $engine "servers" (list (printf "http://127.0.0.1:%d" (int .Values.worker.engineSidecar.port))) -}}
{{- $_ := set $engine "weights_dir" "/weights" -}}
{{- $_ := set $engine "model" "policy" -}}
{{- $_ := set $worker "engine" $engine -}}
{{- end -}}
{{- $_ := set $config "worker" $worker -}}
{{- $trainer := get $config "trainer" | default dict -}}
{{- $_ := set $trainer "metrics_addr" (printf "0.0.0.0:%d" (int .Values.trainer.metricsPort)) -}}
{{- $_ := set $config "trainer" $trainer -}}
{{- if ne .Values.kafka.sasl "none" -}}
{{- $kafka := get $config "kafka" | default dict -}}
{{- $rd := get $kafka "librdkafka" | default dict -}}
{{- $_ := set $rd "security.protocol" (ternary "sasl_ssl" "sasl_plaintext" .Values.kafka.tls) -}}
{{- $_ := set $rd "sasl.mechanism" (get (dict "plaintext" "PLAIN" "scram_sha256" "SCRAM-SHA-256" "scram_sha512" "SCRAM-SHA-512") .Values.kafka.sasl) -}}
{{- $_ := set $kafka "librdkafka" $rd -}}
{{- $_ := set $config "kafka" $kafka -}}
{{- else if .Values.kafka.tls -}}
{{- $kafka := get $config "kafka" | default dict -}}
{{- $rd := get $kafka "librdkafka" | default dict -}}
{{- $_ := set $rd "security.protocol" "ssl" -}}
{{- $_ := set $kafka "librdkafka" $rd -}}
{{- $_ := set $config "kafka" $kafka -}}
{{- end -}}
{{- include "flywheel.wholeNumbers" $config -}}
{{- toToml $config -}}
{{- end -}}

{{/*
Helm reads every number of the values as a float: turn the whole ones back into integers (in
place, recursively), so that `409600` is written as 409600 and not 409600.0, which the
config's integer fields would refuse.
*/}}
{{- define "flywheel.wholeNumbers" -}}
{{- $map := . -}}
{{- range $key, $value := $map -}}
{{- if kindIs "map" $value -}}
{{- include "flywheel.wholeNumbers" $value -}}
{{- else if and (kindIs "float64" $value) (eq $value (floor $value)) -}}
{{- $_ := set $map $key (int64 $value) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* One environment variable from a key of an existing Secret. */}}
{{- define "flywheel.secretEnv" -}}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/*
The credentials every Flywheel container reads, as environment overrides from the Secrets
named in `secrets` (none is inlined). `admin` adds the coordinator's admin token.
*/}}
{{- define "flywheel.env" -}}
{{- $s := .root.Values.secrets -}}
- name: FLYWHEEL_CACHE_DIR
  value: /var/cache/flywheel
- name: FLYWHEEL_LOG_JSON
  value: "true"
{{- if $s.redis.name }}
{{ include "flywheel.secretEnv" (dict "env" "FLYWHEEL_STORAGE__STATE_URL" "secret" $s.redis.name "key" $s.redis.key) }}
{{- end }}
{{- if $s.postgres.name }}
{{ include "flywheel.secretEnv" (dict "env" "FLYWHEEL_STORAGE__LEDGER_URL" "secret" $s.postgres.name "key" $s.postgres.key) }}
{{- end }}
{{- if $s.s3.name }}
{{ include "flywheel.secretEnv" (dict "env" "AWS_ACCESS_KEY_ID" "secret" $s.s3.name "key" $s.s3.accessKeyIdKey) }}
{{ include "flywheel.secretEnv" (dict "env" "AWS_SECRET_ACCESS_KEY" "secret" $s.s3.name "key" $s.s3.secretAccessKeyKey) }}
{{- end }}
{{- if $s.kafka.name }}
{{ include "flywheel.secretEnv" (dict "env" "FLYWHEEL_KAFKA__LIBRDKAFKA__SASL.USERNAME" "secret" $s.kafka.name "key" $s.kafka.usernameKey) }}
{{ include "flywheel.secretEnv" (dict "env" "FLYWHEEL_KAFKA__LIBRDKAFKA__SASL.PASSWORD" "secret" $s.kafka.name "key" $s.kafka.passwordKey) }}
{{- end }}
{{- if and .admin $s.admin.name }}
{{ include "flywheel.secretEnv" (dict "env" "FLYWHEEL_COORDINATOR__ADMIN_TOKEN" "secret" $s.admin.name "key" $s.admin.key) }}
{{- end }}
{{- end -}}

{{/* The config file and the writable directories of a read-only root file system. */}}
{{- define "flywheel.volumeMounts" -}}
- name: config
  mountPath: /etc/flywheel
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: /var/cache/flywheel
{{- end -}}

{{- define "flywheel.volumes" -}}
- name: config
  configMap:
    name: {{ include "flywheel.fullname" . }}-config
- name: tmp
  emptyDir: {}
- name: cache
  emptyDir: {}
{{- end -}}

{{/* Restarts pods when the config changes. */}}
{{- define "flywheel.configChecksum" -}}
checksum/config: {{ include "flywheel.config" . | sha256sum }}
{{- end -}}

{{/* The spot presets: node selector and tolerations per provider. */}}
{{- define "flywheel.spotNodeSelector" -}}
{{- $p := .Values.worker.spot.provider -}}
{{- if eq $p "gke" }}
cloud.google.com/gke-spot: "true"
{{- else if eq $p "eks" }}
karpenter.sh/capacity-type: spot
{{- else if eq $p "aks" }}
kubernetes.azure.com/scalesetpriority: spot
{{- end }}
{{- end -}}

{{- define "flywheel.spotTolerations" -}}
{{- $p := .Values.worker.spot.provider -}}
{{- if eq $p "gke" }}
- key: cloud.google.com/gke-spot
  operator: Equal
  value: "true"
  effect: NoSchedule
{{- else if eq $p "aks" }}
- key: kubernetes.azure.com/scalesetpriority
  operator: Equal
  value: spot
  effect: NoSchedule
{{- end }}
{{- end -}}
