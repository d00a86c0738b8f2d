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
{{- end }}

{{- define "kaireon-pub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kaireon-pub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: outbox-publisher
{{- end }}

{{- define "kaireon-pub.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kaireon-pub.databaseSecret" -}}
{{- default (printf "%s-database" (include "kaireon-pub.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "kaireon-pub.cronSecret" -}}
{{- default (printf "%s-cron" (include "kaireon-pub.fullname" .)) .Values.cronSecret.existingSecret }}
{{- end }}

{{/* Where the Kafka TLS Secret is mounted. */}}
{{- define "kaireon-pub.kafkaTlsDir" -}}/etc/kaireon/kafka-tls{{- end }}

{{/*
The tier's environment. Every name is a kaireon_pub.settings setting or a KAFKA_* librdkafka
pass-through (tests/unit/test_helm_chart.py checks the rendered chart against the registry).
Numbers go through `int` so large values never render in exponent form.
*/}}
{{- define "kaireon-pub.env" -}}
{{- $p := .Values.outboxPublisher -}}
- name: DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "kaireon-pub.databaseSecret" . }}
      key: {{ .Values.database.key }}
- name: CRON_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "kaireon-pub.cronSecret" . }}
      key: {{ .Values.cronSecret.key }}
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
{{- range $name, $value := $k.extraConfig }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- with $p.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "kaireon-pub.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}
