{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: <release>-<chart>, or the release alone if it holds the chart name. */}}
{{- define "finetune-operator.fullname" -}}
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

{{/* fullname-<suffix>, the fullname cut so the whole stays within 63 characters. Call with (list $ "suffix"). */}}
{{- define "finetune-operator.suffixed" -}}
{{- $suffix := index . 1 }}
{{- printf "%s-%s" (include "finetune-operator.fullname" (index . 0) | trunc (int (sub 62 (len $suffix))) | trimSuffix "-") $suffix }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every resource (the generated CRD template includes this one too). */}}
{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest, else repository:tag (tag defaults to appVersion). Call with (list $image $) */}}
{{- define "finetune-operator.imageRef" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{/*
Permissions the operator needs in every namespace it watches: exactly the verbs it uses.
- finetunejobs: watch them; patch/update for kopf's finalizer and its own annotations, never spec.
- finetunejobs/status: phase, conditions, progress. Holding get/patch here is also what lets it
  create each trainer's Role (get/patch on that one FinetuneJob's status): RBAC forbids granting
  more than one holds.
- finetunejobs/finalizers: update only. Children carry ownerReferences with blockOwnerDeletion,
  which apiservers running the OwnerReferencesPermissionEnforcement admission plugin (OpenShift,
  hardened clusters) allow only to whoever may update the owner's finalizers.
- jobs: one training Job per run. pods: read the trainer's state and termination message.
- configmaps: the run config mounted into the trainer. secrets: get only, to check they exist.
- serviceaccounts, roles, rolebindings: a per-job ServiceAccount bound to that Role.
- events: kopf and the operator record what they did (core and events.k8s.io).
- finetunejobs create: a FinetuneSweep's trials are FinetuneJobs the operator creates (never
  deletes: they go with their sweep through garbage collection).
- finetunesweeps (+ status, finalizers, as for finetunejobs): the sweeps it reconciles.
*/}}
{{- define "finetune-operator.namespacedRules" -}}
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunesweeps"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunesweeps/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["finetune.dev"]
  resources: ["finetunesweeps/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# The headless Service of a multi-pod run (its pods' DNS names, for torchrun's rendezvous): get to
# check that an existing one is the run's own, delete to undo a run that could not be created.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "delete", "patch"]
# list: a Job's FailedCreate Events say why it has no pod (quota, admission).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list", "create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* Cluster-scoped reads kopf needs in either mode: it watches CRDs to learn its resources. */}}
{{- define "finetune-operator.crdRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
Only when watching a list of namespaces: kopf lists and watches namespaces to notice the listed ones
appear and disappear (without it, it retries nine times, then assumes they exist). Cluster-wide,
it watches every namespace's objects directly and never reads Namespace objects.
*/}}
{{- define "finetune-operator.namespaceRules" -}}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
