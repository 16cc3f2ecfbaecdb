{{/* Chart name, overridable. */}}
{{- define "callmeback.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<name>", or the release name when it already contains the
chart name. Truncated to 52 so suffixes ("-leader", "-metrics") stay within 63.
*/}}
{{- define "callmeback.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "callmeback.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "callmeback.labels" -}}
helm.sh/chart: {{ include "callmeback.chart" . }}
{{ include "callmeback.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: callmeback
{{- end }}

{{/* Labels selecting the operator pods; never change them (Deployment selectors are immutable). */}}
{{- define "callmeback.selectorLabels" -}}
app.kubernetes.io/name: {{ include "callmeback.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "callmeback.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "callmeback.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image: digest wins over tag; the tag defaults to appVersion. */}}
{{- define "callmeback.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "callmeback.leaseName" -}}
{{- default (printf "%s-leader" (include "callmeback.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}
