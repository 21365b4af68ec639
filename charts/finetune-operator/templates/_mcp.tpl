{{/* The MCP server's names and labels. Its own app.kubernetes.io/name keeps its pods out of the
operator Deployment's and the metrics Service's selectors. */}}
{{- define "finetune-operator.mcp.fullname" -}}
{{- printf "%s-mcp" (include "finetune-operator.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.mcp.selectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-mcp" (include "finetune-operator.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.mcp.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.mcp.selectorLabels" . }}
app.kubernetes.io/component: mcp-server
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{/* Namespaces the MCP tools may touch: mcp.namespaces, else the release namespace. */}}
{{- define "finetune-operator.mcp.namespaces" -}}
{{- if .Values.mcp.namespaces }}{{ join "," .Values.mcp.namespaces }}{{ else }}{{ .Release.Namespace }}{{ end }}
{{- end }}

{{- define "finetune-operator.mcp.tokenSecret" -}}
{{- required "mcp.auth.existingSecret is required with mcp.enabled: the MCP server serves HTTP only with a bearer token (create a Secret with the token and name it here)" .Values.mcp.auth.existingSecret }}
{{- end }}
