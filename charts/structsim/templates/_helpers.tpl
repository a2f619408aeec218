{{/*
Names and labels shared by every template. Object names are capped at 63 characters (DNS labels).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "structsim.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>", or just the release name when it already contains the chart name. */}}
{{- define "structsim.fullname" -}}
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

{{/* The operator's objects are named "<fullname>-operator". */}}
{{- define "structsim.operator.fullname" -}}
{{- printf "%s-operator" (include "structsim.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}

{{/* "structsim-0.1.0", for the helm.sh/chart label. */}}
{{- define "structsim.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change for the life of a release: Deployment and PDB selectors use them. */}}
{{- define "structsim.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "structsim.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object. */}}
{{- define "structsim.labels" -}}
{{ include "structsim.operator.selectorLabels" . }}
app.kubernetes.io/part-of: structsim
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "structsim.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "structsim.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "structsim.operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The tune pods' PriorityClass: the chart's own, an existing one, or none (empty). */}}
{{- define "structsim.tunePriorityClassName" -}}
{{- if .Values.tunePriorityClass.create }}
{{- printf "%s-tune" (include "structsim.fullname" . | trunc 58 | trimSuffix "-") }}
{{- else }}
{{- .Values.tunePriorityClass.name }}
{{- end }}
{{- end }}

{{/* repository@digest, or repository:tag (tag defaults to the chart's appVersion). */}}
{{- define "structsim.operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
RBAC rules on namespaced objects: what the reconciler reads and writes inside the namespaces it
serves. Kept apart from the cluster-scoped rules so that with operator.watchNamespaces they are
granted only in those namespaces.
*/}}
{{- define "structsim.rbac.namespacedRules" -}}
# The resource itself: read and watch it; patch it for kopf's finalizer and progress annotations.
- apiGroups: ["structsim.io"]
  resources: ["similarityservices"]
  verbs: ["get", "list", "watch", "patch"]
# Its status: the operator is the only writer of phase, profiles and conditions.
- apiGroups: ["structsim.io"]
  resources: ["similarityservices/status"]
  verbs: ["get", "patch"]
# Its finalizers: never called, but clusters with the OwnerReferencesPermissionEnforcement admission
# plugin (OpenShift, for one) let only such a client create children whose ownerReference sets
# blockOwnerDeletion, as the operator's do.
- apiGroups: ["structsim.io"]
  resources: ["similarityservices/finalizers"]
  verbs: ["update"]
# The children it owns: one DaemonSet per GPU product (the serving pods).
- apiGroups: ["apps"]
  resources: ["daemonsets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The children it owns: the ClusterIP Service in front of them, and one ConfigMap per GPU type
# holding its tuned profile, which that type's serving pods mount.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The children it owns: one autotune Job per untuned GPU product.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Read-only: the tune Job's pod carries the result (its termination message) and the failure reason.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Events on the resource for every step a user sees in `kubectl describe simsvc` (kopf posts them
# through the core API; newer clients through events.k8s.io).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* RBAC rules on cluster-scoped objects. These always need a ClusterRoleBinding. */}}
{{- define "structsim.rbac.clusterRules" -}}
# Read-only: the GPU product of each node (label nvidia.com/gpu.product) decides which DaemonSets
# and tune Jobs exist; the watch notices a new GPU type joining or the last node of one leaving.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
# kopf's own discovery: it checks that the SimilarityService CRD is installed and follows changes.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# kopf's own discovery: it lists namespaces to resolve which ones it serves.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
