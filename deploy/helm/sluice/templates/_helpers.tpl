{{/* Names and labels. */}}
{{- define "sluice.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.fullname" -}}
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

{{- define "sluice.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sluice.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "sluice.labels" -}}
helm.sh/chart: {{ include "sluice.chart" . }}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sluice
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sluice.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "sluice.adminSecretName" -}}
{{- default (printf "%s-admin" (include "sluice.fullname" .)) .Values.adminToken.existingSecret -}}
{{- end -}}

{{- define "sluice.adminSecretKey" -}}
{{- if .Values.adminToken.existingSecret -}}
{{- .Values.adminToken.existingSecretKey -}}
{{- else -}}
admin-token
{{- end -}}
{{- end -}}

{{- define "sluice.policyStoreClaim" -}}
{{- default (printf "%s-policy-store" (include "sluice.fullname" .)) .Values.policyStore.persistence.existingClaim -}}
{{- end -}}

{{/* Paths inside the container. */}}
{{- define "sluice.configDir" -}}/etc/sluice/config{{- end -}}
{{- define "sluice.secretsDir" -}}/etc/sluice/secrets{{- end -}}
{{- define "sluice.stateDir" -}}/var/lib/sluice/state{{- end -}}
{{- define "sluice.usageDir" -}}/var/lib/sluice/usage{{- end -}}

{{/*
The Bitnami Redis chart's master service: its fullname (the same rule as
ours) followed by -master.
*/}}
{{- define "sluice.redisHost" -}}
{{- $r := .Values.redis -}}
{{- $fullname := "" -}}
{{- if $r.fullnameOverride -}}
{{- $fullname = $r.fullnameOverride -}}
{{- else -}}
{{- $name := default "redis" $r.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- $fullname = .Release.Name -}}
{{- else -}}
{{- $fullname = printf "%s-%s" .Release.Name $name -}}
{{- end -}}
{{- end -}}
{{- printf "%s-master" ($fullname | trunc 63 | trimSuffix "-") -}}
{{- end -}}

{{- define "sluice.redisUrl" -}}
{{- if and .Values.redis.enabled .Values.externalRedis.url -}}
{{- fail "set either redis.enabled or externalRedis.url, not both" -}}
{{- end -}}
{{- if .Values.externalRedis.url -}}
{{- .Values.externalRedis.url -}}
{{- else if .Values.redis.enabled -}}
{{- if eq (toString (dig "sentinel" "enabled" false .Values.redis)) "true" -}}
{{- fail "redis.sentinel.enabled: the gateway talks to one Redis master; use architecture standalone or replication" -}}
{{- end -}}
{{- if .Values.redis.auth.enabled -}}
{{- if not .Values.redis.auth.password -}}
{{- fail "redis.auth.enabled: set redis.auth.password too (it goes into limits.redis_url), or turn auth off" -}}
{{- end -}}
{{- if not .Values.configInSecret -}}
{{- fail "redis.auth.enabled: set configInSecret: true so the Redis password is not written into a ConfigMap" -}}
{{- end -}}
{{- printf "redis://:%s@%s.%s.svc:6379/0" (urlquery .Values.redis.auth.password) (include "sluice.redisHost" .) .Release.Namespace -}}
{{- else -}}
{{- printf "redis://%s.%s.svc:6379/0" (include "sluice.redisHost" .) .Release.Namespace -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The shutdown budget, in seconds (an unset unready delay counts as the gateway's default, 1 s). */}}
{{- define "sluice.terminationGracePeriod" -}}
{{- $s := .Values.shutdown -}}
{{- $computed := add (int $s.preStopSleepSeconds) (int (default 1 $s.unreadyDelaySeconds)) (int $s.timeoutSeconds) 15 -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- $computed -}}
{{- else -}}
{{- $set := int .Values.terminationGracePeriodSeconds -}}
{{- if le $set (add (int $s.preStopSleepSeconds) (int (default 1 $s.unreadyDelaySeconds)) (int $s.timeoutSeconds)) -}}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed shutdown.preStopSleepSeconds + shutdown.unreadyDelaySeconds + shutdown.timeoutSeconds, or in-flight streams are killed" $set) -}}
{{- end -}}
{{- $set -}}
{{- end -}}
{{- end -}}

{{/*
The effective config as JSON: .Values.config plus the keys the chart owns
(listeners, token file, shutdown, storage paths, Redis).
*/}}
{{- define "sluice.effectiveConfig" -}}
{{- $cfg := deepCopy (default dict .Values.config) -}}
{{- $owned := dict
      "server" (list "listen" "admin_listen" "admin_token_file" "shutdown_timeout" "unready_delay")
      "policy_store" (list "state_dir")
      "usage" (list "database" "redis_url")
      "limits" (list "redis_url") -}}
{{- range $section, $keys := $owned -}}
{{- $table := get $cfg $section -}}
{{- if and $table (not (kindIs "map" $table)) -}}
{{- fail (printf "config.%s must be a table" $section) -}}
{{- end -}}
{{- range $keys -}}
{{- if and $table (hasKey $table .) (not (kindIs "invalid" (get $table .))) -}}
{{- fail (printf "config.%s.%s is set by the chart; see the comment above `config:` in values.yaml for the value to use instead" $section .) -}}
{{- end -}}
{{- end -}}
{{- if not $table -}}
{{- $_ := set $cfg $section dict -}}
{{- end -}}
{{- end -}}
{{- if not .Values.config.backends -}}
{{- fail "config.backends: at least one backend is required (name, url, and optionally models)" -}}
{{- end -}}
{{- $server := get $cfg "server" -}}
{{- $_ := set $server "listen" (printf "0.0.0.0:%d" (int .Values.ports.http)) -}}
{{- $_ := set $server "admin_listen" (printf "0.0.0.0:%d" (int .Values.ports.admin)) -}}
{{- $_ := set $server "admin_token_file" (printf "%s/admin-token" (include "sluice.secretsDir" .)) -}}
{{- $_ := set $server "shutdown_timeout" (printf "%ds" (int .Values.shutdown.timeoutSeconds)) -}}
{{- if not (kindIs "invalid" .Values.shutdown.unreadyDelaySeconds) -}}
{{- $_ := set $server "unready_delay" (printf "%ds" (int .Values.shutdown.unreadyDelaySeconds)) -}}
{{- end -}}
{{- $_ := set (get $cfg "policy_store") "state_dir" (include "sluice.stateDir" .) -}}
{{- $_ := set (get $cfg "usage") "database" (printf "%s/sluice-usage.db" (include "sluice.usageDir" .)) -}}
{{- $redis := include "sluice.redisUrl" . -}}
{{- if $redis -}}
{{- $_ := set (get $cfg "limits") "redis_url" $redis -}}
{{- $_ := set (get $cfg "usage") "redis_url" $redis -}}
{{- end -}}
{{- toJson $cfg -}}
{{- end -}}

{{/*
TOML, from the effective config. Top-level tables become [section] and lists
of tables [[section]]; nested tables are inline tables; null values are left
out. Strings are written with toJson: a JSON string is a valid TOML basic
string (\uXXXX escapes included).
*/}}
{{- define "sluice.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "sluice.toml.value" -}}
{{- if kindIs "map" . -}}
{{- $parts := list -}}
{{- range $k, $v := . -}}
{{- if not (kindIs "invalid" $v) -}}
{{- $parts = append $parts (printf "%s = %s" (include "sluice.toml.key" $k) (include "sluice.toml.value" $v)) -}}
{{- end -}}
{{- end -}}
{{- if $parts -}}{{- printf "{ %s }" (join ", " $parts) -}}{{- else -}}{}{{- end -}}
{{- else if kindIs "slice" . -}}
{{- $parts := list -}}
{{- range . -}}
{{- if kindIs "invalid" . -}}
{{- fail "sluice.toml: a list holds a null value, which TOML cannot write" -}}
{{- end -}}
{{- $parts = append $parts (include "sluice.toml.value" .) -}}
{{- end -}}
{{- printf "[%s]" (join ", " $parts) -}}
{{- else if kindIs "float64" . -}}
{{- /* YAML numbers arrive as float64: write whole ones as integers. */ -}}
{{- if eq . (floor .) -}}{{ int64 . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- else -}}
{{- toJson . -}}
{{- end -}}
{{- end -}}

{{- define "sluice.toml.entries" -}}
{{- range $k, $v := . -}}
{{- if not (kindIs "invalid" $v) }}
{{ include "sluice.toml.key" $k }} = {{ include "sluice.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "sluice.toml" -}}
{{- $cfg := include "sluice.effectiveConfig" . | fromJson -}}
{{- if hasKey $cfg "Error" -}}
{{- fail (printf "rendering sluice.toml: %v" (get $cfg "Error")) -}}
{{- end -}}
# sluice.toml, rendered by the {{ include "sluice.chart" . }} chart from
# .Values.config. Edit the values, not this file.
{{- /* Scalars (none today) must precede the first table. */ -}}
{{- range $k, $v := $cfg -}}
{{- if not (or (kindIs "invalid" $v) (kindIs "map" $v) (kindIs "slice" $v)) }}
{{ include "sluice.toml.key" $k }} = {{ include "sluice.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k, $v := $cfg -}}
{{- if kindIs "slice" $v -}}
{{- $tables := true -}}
{{- range $v -}}{{- if not (kindIs "map" .) -}}{{- $tables = false -}}{{- end -}}{{- end -}}
{{- if not $tables -}}
{{- fail (printf "config.%s: a top-level list must hold tables" $k) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := $cfg -}}
{{- if kindIs "map" $v }}

[{{ include "sluice.toml.key" $k }}]
{{- include "sluice.toml.entries" $v -}}
{{- end -}}
{{- end -}}
{{- range $k, $v := $cfg -}}
{{- if kindIs "slice" $v -}}
{{- range $v }}

[[{{ include "sluice.toml.key" $k }}]]
{{- include "sluice.toml.entries" . -}}
{{- end -}}
{{- end -}}
{{- end }}
{{ end -}}
