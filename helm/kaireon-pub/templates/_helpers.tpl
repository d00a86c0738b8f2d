{{/* Names and labels. */}}
{{- define "kaireon-pub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kaireon-pub.fullname" -}}
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

{{/* The publisher's workload name: pods show as <release>-outbox-publisher-*. */}}
{{- define "kaireon-pub.publisher" -}}
{{- printf "%s-outbox-publisher" (include "kaireon-pub.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "kaireon-pub.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "kaireon-pub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "kaireon-pub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kaireon-pub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: outbox-publisher
{{- end }}

{{/*
Labels of the pods the chart makes, beyond a workload's selector (not part of any selector):
(list . podLabels), commonLabels under the pod's own labels.
*/}}
{{- define "kaireon-pub.podExtraLabels" -}}
{{- $ctx := index . 0 }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- with merge (deepCopy (index . 1 | default dict)) ($ctx.Values.commonLabels | default dict) }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The pods' service account: the chart's, a named one, or none (the namespace's default). */}}
{{- define "kaireon-pub.serviceAccountName" -}}
{{- $sa := .Values.serviceAccount }}
{{- if $sa.create }}
{{- default (include "kaireon-pub.fullname" .) $sa.name }}
{{- else }}
{{- $sa.name }}
{{- end }}
{{- end }}

{{/*
The pod-level fields every pod of the chart shares: the service account, its token, the
securityContext (null fields left out, for a platform that assigns them: OpenShift).
(list . keys): keys, a list of the podSecurityContext's keys to leave out.
*/}}
{{- define "kaireon-pub.podSecurity" -}}
{{- $ctx := index . 0 }}
{{- $leaveOut := index . 1 }}
{{- $sa := include "kaireon-pub.serviceAccountName" $ctx }}
{{- if $sa }}
serviceAccountName: {{ $sa }}
{{- end }}
automountServiceAccountToken: {{ $ctx.Values.serviceAccount.automount }}
{{- $context := dict }}
{{- range $key, $value := $ctx.Values.podSecurityContext }}
{{- if not (or (kindIs "invalid" $value) (has $key $leaveOut)) }}
{{- $_ := set $context $key $value }}
{{- end }}
{{- end }}
{{- with $context }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* repository@digest when image.digest is set, else repository:tag (tag defaults to appVersion). */}}
{{- define "kaireon-pub.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "kaireon-pub.databaseSecret" -}}
{{- default (printf "%s-database" (include "kaireon-pub.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "kaireon-pub.cronSecret" -}}
{{- default (printf "%s-cron" (include "kaireon-pub.fullname" .)) .Values.cronSecret.existingSecret }}
{{- end }}

{{/*
"true" when the publisher gets CRON_SECRET: the chart's reaper CronJob calls the route, or
cronSecret.existingSecret names a Secret for another caller. Otherwise the route stays
fail-closed (401) and the pods need no cron Secret at all.
*/}}
{{- define "kaireon-pub.cronSecretUsed" -}}
{{- if or .Values.cron.schedules.outboxReaper.enabled .Values.cronSecret.existingSecret }}true{{ end }}
{{- end }}

{{/*
The autoscaler that owns the replica count: "hpa", "keda" or "" (none; the Deployment's
`replicas` then counts). The ScaledObject needs KEDA's CRDs (keda.sh/v1alpha1): without them it
is not rendered, the Deployment keeps `replicas`, and the install notes say so. Fails on what the
schema cannot see: both on, minReplicas above maxReplicas, more workers than shards.
*/}}
{{- define "kaireon-pub.autoscaler" -}}
{{- $a := .Values.autoscaling }}
{{- if .Values.outboxPublisher.enabled }}
{{- if and $a.hpa.enabled $a.keda.enabled }}
{{- fail "autoscaling.hpa.enabled and autoscaling.keda.enabled are both true: KEDA makes its own HorizontalPodAutoscaler, and two autoscalers would fight over the replicas; enable one" }}
{{- end }}
{{- if or $a.hpa.enabled $a.keda.enabled }}
{{- if gt ($a.minReplicas | int) ($a.maxReplicas | int) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" ($a.minReplicas | int) ($a.maxReplicas | int)) }}
{{- end }}
{{- $workers := .Values.outboxPublisher.workers }}
{{- if and (not (kindIs "invalid" $workers)) (gt (mul ($a.maxReplicas | int) ($workers | int)) 256) }}
{{- fail (printf "autoscaling.maxReplicas (%d) x outboxPublisher.workers (%d) is above the 256 shards: the workers beyond them would hold none" ($a.maxReplicas | int) ($workers | int)) }}
{{- end }}
{{- end }}
{{- if $a.hpa.enabled }}
{{- if and (kindIs "invalid" $a.hpa.pendingPerReplica) (kindIs "invalid" $a.hpa.oldestPendingAgeSeconds) }}
{{- fail "autoscaling.hpa: pendingPerReplica and oldestPendingAgeSeconds are both null; set at least one" }}
{{- end }}
{{- print "hpa" }}
{{- else if and $a.keda.enabled (.Capabilities.APIVersions.Has "keda.sh/v1alpha1/ScaledObject") }}
{{- if not (or $a.keda.prometheus.enabled $a.keda.postgresql.enabled) }}
{{- fail "autoscaling.keda: neither the prometheus nor the postgresql trigger is enabled" }}
{{- end }}
{{- if and $a.keda.prometheus.enabled (kindIs "invalid" $a.keda.prometheus.pendingPerReplica) (kindIs "invalid" $a.keda.prometheus.oldestPendingAgeSeconds) }}
{{- fail "autoscaling.keda.prometheus: pendingPerReplica and oldestPendingAgeSeconds are both null; set one or disable the trigger" }}
{{- end }}
{{- print "keda" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The fewest and the most publisher pods there can be: outboxPublisher.replicas, or the
autoscaler's minReplicas and maxReplicas.
*/}}
{{- define "kaireon-pub.replicasFloor" -}}
{{- if include "kaireon-pub.autoscaler" . }}{{ .Values.autoscaling.minReplicas | int }}{{ else }}{{ .Values.outboxPublisher.replicas | int }}{{ end }}
{{- end }}

{{- define "kaireon-pub.replicasCeiling" -}}
{{- if include "kaireon-pub.autoscaler" . }}{{ .Values.autoscaling.maxReplicas | int }}{{ else }}{{ .Values.outboxPublisher.replicas | int }}{{ end }}
{{- end }}

{{/*
"true" when the PodDisruptionBudget is rendered: enabled, and it can allow a disruption (more
replicas than minAvailable requires; Kubernetes rounds a percentage up). With minAvailable 1 and
one replica it would stall every node drain and cluster-autoscaler scale-down. With an
autoscaler the count is its minReplicas: the budget must allow a disruption at the fewest pods.
*/}}
{{- define "kaireon-pub.pdbRendered" -}}
{{- $p := .Values.outboxPublisher }}
{{- $replicas := include "kaireon-pub.replicasFloor" . | int }}
{{- $min := $p.pdb.minAvailable }}
{{- $required := 0 }}
{{- if kindIs "string" $min }}
{{- $required = div (add (mul $replicas (trimSuffix "%" $min | int)) 99) 100 }}
{{- else }}
{{- $required = $min | int }}
{{- end }}
{{- if and $p.enabled $p.pdb.enabled (gt $replicas $required) }}true{{ end }}
{{- end }}

{{/*
PromQL label matchers (without braces) that pick this release's series: the value given, or
namespace and job as the ServiceMonitor's scrape labels them (job is the Service's name).
*/}}
{{- define "kaireon-pub.seriesSelector" -}}
{{- $ctx := index . 0 }}
{{- default (printf "namespace=%q,job=%q" $ctx.Release.Namespace (include "kaireon-pub.publisher" $ctx)) (index . 1) }}
{{- end }}

{{/* Where the Kafka TLS Secret is mounted. */}}
{{- define "kaireon-pub.kafkaTlsDir" -}}/etc/kaireon/kafka-tls{{- end }}

{{/*
The environment the chart itself sets. Every name is a kaireon_pub.settings setting or a KAFKA_*
librdkafka pass-through (tests/unit/test_helm_chart.py checks the rendered chart against the
registry). Numbers go through `int` so large values never render in exponent form.
*/}}
{{- define "kaireon-pub.chartEnv" -}}
{{- $p := .Values.outboxPublisher -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "kaireon-pub.databaseSecret" . }}
      key: {{ .Values.database.key }}
{{- if include "kaireon-pub.cronSecretUsed" . }}
{{- /* Optional: publishing never needs it; without it the route answers 401 (fail-closed). */}}
- name: CRON_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "kaireon-pub.cronSecret" . }}
      key: {{ .Values.cronSecret.key }}
      optional: true
{{- end }}
- name: KAFKA_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: OUTBOX_POLL_INTERVAL_MS
  value: {{ $p.pollIntervalMs | int | quote }}
- name: OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS
  value: {{ $p.shutdownDrainTimeoutMs | int | quote }}
- name: OUTBOX_LIVENESS_FILE
  value: {{ $p.livenessFile | quote }}
- name: OUTBOX_HTTP_PORT
  value: {{ .Values.http.port | int | quote }}
{{- if not (kindIs "invalid" $p.workers) }}
- name: OUTBOX_WORKERS
  value: {{ $p.workers | int | quote }}
{{- end }}
{{- if gt ($p.auditSamplePerMinute | int) 0 }}
- name: OUTBOX_AUDIT_SAMPLE_PER_MINUTE
  value: {{ $p.auditSamplePerMinute | int | quote }}
{{- end }}
{{- $k := .Values.kafka }}
{{- if and $k.sasl.enabled $k.tls.enabled }}
- name: KAFKA_SECURITY_PROTOCOL
  value: SASL_SSL
{{- else if $k.sasl.enabled }}
- name: KAFKA_SECURITY_PROTOCOL
  value: SASL_PLAINTEXT
{{- else if $k.tls.enabled }}
- name: KAFKA_SECURITY_PROTOCOL
  value: SSL
{{- end }}
{{- if $k.sasl.enabled }}
- name: KAFKA_SASL_MECHANISM
  value: {{ $k.sasl.mechanism | quote }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret is required when kafka.sasl.enabled" $k.sasl.existingSecret }}
      key: {{ $k.sasl.usernameKey }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.existingSecret }}
      key: {{ $k.sasl.passwordKey }}
{{- end }}
{{- if $k.tls.enabled }}
- name: KAFKA_SSL_CA_LOCATION
  value: {{ printf "%s/%s" (include "kaireon-pub.kafkaTlsDir" .) $k.tls.caKey | quote }}
{{- if $k.tls.certKey }}
- name: KAFKA_SSL_CERTIFICATE_LOCATION
  value: {{ printf "%s/%s" (include "kaireon-pub.kafkaTlsDir" .) $k.tls.certKey | quote }}
{{- end }}
{{- if $k.tls.keyKey }}
- name: KAFKA_SSL_KEY_LOCATION
  value: {{ printf "%s/%s" (include "kaireon-pub.kafkaTlsDir" .) $k.tls.keyKey | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The publisher's environment: the chart's own, kafka.extraConfig, then outboxPublisher.extraEnv.
A name set twice fails the render (Kubernetes would keep the last entry and hide the first):
the schema refuses extraEnv names the chart always sets, this catches the conditional ones
(KAFKA_SASL_*, KAFKA_SSL_*, KAFKA_SECURITY_PROTOCOL, OUTBOX_WORKERS) and extraConfig overlaps.
*/}}
{{- define "kaireon-pub.env" -}}
{{- $chart := include "kaireon-pub.chartEnv" . }}
{{- $seen := dict }}
{{- range (fromYamlArray $chart) }}
{{- $_ := set $seen .name "the chart" }}
{{- end }}
{{- range $name, $value := .Values.kafka.extraConfig }}
{{- if hasKey $seen $name }}
{{- fail (printf "kafka.extraConfig.%s: %s is already set by %s; use the chart's value for it" $name $name (get $seen $name)) }}
{{- end }}
{{- $_ := set $seen $name "kafka.extraConfig" }}
{{- end }}
{{- range .Values.outboxPublisher.extraEnv }}
{{- if hasKey $seen .name }}
{{- fail (printf "outboxPublisher.extraEnv: %s is already set by %s; use the chart's value for it" .name (get $seen .name)) }}
{{- end }}
{{- $_ := set $seen .name "outboxPublisher.extraEnv" }}
{{- end }}
{{- $chart }}
{{- range $name, $value := .Values.kafka.extraConfig }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with .Values.outboxPublisher.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The migrate init container's environment: its DSN, the tier's own settings of extraEnv (among
them OUTBOX_POOL_MODE and OUTBOX_LISTEN_DATABASE_URL: through a transaction pooler migrate takes
its session-level lock on the listen URL; OUTBOX_PARTITIONING: the flavour of a fresh outbox),
and what the settings' checks relate them to (the drain budget, KAFKA_MESSAGE_TIMEOUT_MS), so
that migrate accepts exactly what the publisher accepts. No other Kafka setting or credential,
no CRON_SECRET, no OTEL_*.

With outboxPublisher.migrate.existingSecret, DATABASE_URL is that Secret's DSN (a session to the
server, e.g. the schema owner's role) and migrate runs in session mode on it: OUTBOX_POOL_MODE
and OUTBOX_LISTEN_DATABASE_URL are set to session and empty (over extraEnvFrom too).
*/}}
{{- define "kaireon-pub.migrateEnvPattern" -}}^(OUTBOX_[A-Z0-9_]+|PROMETHEUS_MULTIPROC_DIR|KAFKA_MESSAGE_TIMEOUT_MS)${{- end }}

{{- define "kaireon-pub.migrateEnv" -}}
{{- $m := .Values.outboxPublisher.migrate }}
{{- $own := list }}
{{- if $m.existingSecret }}{{ $own = list "OUTBOX_POOL_MODE" "OUTBOX_LISTEN_DATABASE_URL" }}{{ end }}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $m.existingSecret | default (include "kaireon-pub.databaseSecret" .) }}
      key: {{ $m.key | default .Values.database.key }}
- name: OUTBOX_SHUTDOWN_DRAIN_TIMEOUT_MS
  value: {{ .Values.outboxPublisher.shutdownDrainTimeoutMs | int | quote }}
{{- with .Values.kafka.extraConfig.KAFKA_MESSAGE_TIMEOUT_MS }}
- name: KAFKA_MESSAGE_TIMEOUT_MS
  value: {{ . | toString | quote }}
{{- end }}
{{- $pattern := include "kaireon-pub.migrateEnvPattern" . }}
{{- range .Values.outboxPublisher.extraEnv }}
{{- if and (regexMatch $pattern .name) (not (has .name $own)) }}
{{ list . | toYaml }}
{{- end }}
{{- end }}
{{- if $m.existingSecret }}
- name: OUTBOX_POOL_MODE
  value: session
- name: OUTBOX_LISTEN_DATABASE_URL
  value: ""
{{- end }}
{{- end }}

{{/*
Fails where migrate would refuse to run, in Init:CrashLoopBackOff: OUTBOX_POOL_MODE=transaction
without a session for its advisory lock (OUTBOX_LISTEN_DATABASE_URL or migrate.existingSecret).
Values from extraEnvFrom are not visible here; with extraEnvFrom set, nothing is checked.
*/}}
{{- define "kaireon-pub.checkMigrate" -}}
{{- $p := .Values.outboxPublisher }}
{{- if and $p.migrate.enabled (not $p.migrate.existingSecret) (not $p.extraEnvFrom) }}
{{- $names := dict }}
{{- range $p.extraEnv }}{{ $_ := set $names .name (.value | default "") }}{{ end }}
{{- if and (eq (get $names "OUTBOX_POOL_MODE") "transaction") (not (hasKey $names "OUTBOX_LISTEN_DATABASE_URL")) }}
{{- fail "outboxPublisher.extraEnv: OUTBOX_POOL_MODE is transaction and OUTBOX_LISTEN_DATABASE_URL is not set: the migrate init container takes a session-level advisory lock, which a transaction pooler cannot keep; set OUTBOX_LISTEN_DATABASE_URL (a Secret's DSN of the server itself) or outboxPublisher.migrate.existingSecret, or migrate.enabled: false" }}
{{- end }}
{{- end }}
{{- end }}


{{/* Every container's securityContext: the value, null fields left out. */}}
{{- define "kaireon-pub.containerSecurityContext" -}}
{{- $context := dict }}
{{- range $key, $value := .Values.securityContext }}
{{- if not (kindIs "invalid" $value) }}
{{- $_ := set $context $key $value }}
{{- end }}
{{- end }}
{{- toYaml $context }}
{{- end }}
