{{/*
Names. The same scheme as Go kiam's chart, so `helm upgrade` of a release
made with it keeps every object's name (and the immutable selectors): the
release name when it contains the chart name, else <release>-<chart>.
*/}}
{{- define "kiam.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kiam.fullname" -}}
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

{{/* The workloads, Services and generated Secrets. */}}
{{- define "kiam.agent.fullname" -}}
{{- default (printf "%s-agent" (include "kiam.fullname" .)) .Values.agent.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- define "kiam.server.fullname" -}}
{{- default (printf "%s-server" (include "kiam.fullname" .)) .Values.server.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kiam.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object of a role ("agent" or "server"). */}}
{{- define "kiam.labels" -}}
{{- $root := index . 0 -}}
{{- $values := index . 1 -}}
app: {{ include "kiam.name" $root }}
chart: {{ include "kiam.chart" $root }}
component: {{ $values.name | quote }}
heritage: {{ $root.Release.Service }}
release: {{ $root.Release.Name }}
{{- end -}}

{{/* Selector labels: those of Go kiam's chart (selectors are immutable). */}}
{{- define "kiam.selectorLabels" -}}
{{- $root := index . 0 -}}
{{- $values := index . 1 -}}
app: {{ include "kiam.name" $root }}
component: {{ $values.name | quote }}
release: {{ $root.Release.Name }}
{{- end -}}

{{- define "kiam.serviceAccountName.agent" -}}
{{- if .Values.serviceAccounts.agent.create -}}
{{- default (include "kiam.agent.fullname" .) .Values.serviceAccounts.agent.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.agent.name -}}
{{- end -}}
{{- end -}}

{{- define "kiam.serviceAccountName.server" -}}
{{- if .Values.serviceAccounts.server.create -}}
{{- default (include "kiam.server.fullname" .) .Values.serviceAccounts.server.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccounts.server.name -}}
{{- end -}}
{{- end -}}

{{/* The Secret each role mounts. */}}
{{- define "kiam.agent.tlsSecret" -}}
{{- default (include "kiam.agent.fullname" .) .Values.agent.tlsSecret -}}
{{- end -}}
{{- define "kiam.server.tlsSecret" -}}
{{- default (include "kiam.server.fullname" .) .Values.server.tlsSecret -}}
{{- end -}}

{{/*
The image of a role. Go kiam's image runs a different program with other
flags: a values file that still names it fails here, naming the key.
*/}}
{{- define "kiam.image" -}}
{{- $root := index . 0 -}}
{{- $role := index . 1 -}}
{{- $image := (index $root.Values $role).image -}}
{{- if contains "uswitch/kiam" (toString $image.repository) -}}
{{- fail (printf "%s.image.repository is %s, Go kiam's image; this chart runs kiam in Rust: set %s.image.repository and %s.image.tag to your build of it (docs/HELM.md)" $role $image.repository $role $role) -}}
{{- end -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion (toString (default "" $image.tag))) -}}
{{- end -}}

{{/* extraArgs as flags (see values.yaml). */}}
{{- define "kiam.extraArgs" -}}
{{- range $key, $value := . }}
{{- if or (eq (kindOf $value) "invalid") (and (kindIs "bool" $value) $value) (and (kindIs "string" $value) (eq $value "")) }}
- --{{ $key }}
{{- else }}
- {{ printf "--%s=%v" $key $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* imagePullSecrets: a name (Go kiam's chart) or a list. */}}
{{- define "kiam.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- if kindIs "string" . }}
  - name: {{ . }}
{{- else if kindIs "map" . }}
{{- /* Go kiam's default was {}: nothing. */}}
{{- range $k, $v := . }}
  - name: {{ $v }}
{{- end }}
{{- else }}
{{- range . }}
{{- if kindIs "string" . }}
  - name: {{ . }}
{{- else }}
  - {{ toYaml . | nindent 4 | trim }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/*
The probes' client certificate: the agent's (the server's own certificate
may be for serverAuth only), or the server's when there is no agent Secret.
*/}}
{{- define "kiam.probe.useAgentTls" -}}
{{- if or .Values.agent.enabled .Values.agent.tlsSecret -}}true{{- end -}}
{{- end -}}
{{- define "kiam.probe.tlsSecret" -}}
{{- if include "kiam.probe.useAgentTls" . -}}
{{- include "kiam.agent.tlsSecret" . -}}
{{- else -}}
{{- include "kiam.server.tlsSecret" . -}}
{{- end -}}
{{- end -}}

{{/* `kiam health` against this Pod's server, for the exec probes. */}}
{{- define "kiam.server.healthCommand" -}}
{{- $files := .Values.server.tlsCerts -}}
{{- if include "kiam.probe.useAgentTls" . -}}
{{- $files = .Values.agent.tlsCerts -}}
{{- end -}}
- /usr/local/bin/kiam
- health
- --cert=/etc/kiam/probe-tls/{{ $files.certFileName }}
- --key=/etc/kiam/probe-tls/{{ $files.keyFileName }}
- --ca=/etc/kiam/probe-tls/{{ $files.caFileName }}
- --server-address={{ .Values.server.probes.serverAddress }}:{{ .Values.server.service.targetPort }}
- --timeout=5s
- --gateway-timeout-creation={{ .Values.server.gatewayTimeoutCreation }}
{{- end -}}
